"""`cfjax converse` and `cfjax counterfactual` on a conversation file: a chat's turns, and what
every later turn would have said under an intervention addressed to one turn."""

from __future__ import annotations

import sys
import time

from cfjax.atomic import check_writable
from cfjax.present import printable


def cmd_converse(args, load_model, sampler_of) -> int:
    """`cfjax converse --user MSG --user MSG ...`: answer each message in turn, save the chat."""
    from cfjax.causal import converse

    sampler = sampler_of(args)  # validate arguments before the (slow) model load
    if args.out is not None:
        check_writable(args.out)
    lm = load_model(args.model, args.dtype)
    conv = converse(lm, args.user, key=args.seed, sampler=sampler,
                    max_new_tokens=args.max_new_tokens, system=args.system)  # fmt: skip
    if conv.system is not None:
        print(f"system: {printable(conv.system)}")
    for k, turn in enumerate(conv.turns):
        print(f"user {k}: {printable(turn.prompt)}")
        print(f"assistant {k}: {printable(turn.text)}")
    if args.out:
        conv.to_json(args.out)
        print(f"conversation: {args.out} ({len(conv.turns)} turns)", file=sys.stderr)
    return 0


def counterfactual_conversation(args, conv, lm, interventions) -> int:
    """The counterfactual (or interventional) conversation of `conv` under `interventions` at
    turn `args.turn`, shown turn by turn beside the factual one."""
    from rich.console import Console

    from cfjax import present
    from cfjax.causal import AtTurn, counterfactual, interventional

    t0 = time.perf_counter()
    iv = AtTurn(args.turn, interventions)
    if args.interventional:
        result, label = interventional(lm, conv, iv, key=args.seed), "interventional"
    else:
        result, label = counterfactual(lm, conv, iv), "counterfactual"
    elapsed = time.perf_counter() - t0
    console = Console()
    console.print(f"{label} at turn {args.turn}: {present.describe(iv.record(), lm.tokenizer)}",
                  soft_wrap=True, markup=False)  # fmt: skip
    for k, (fact, other) in enumerate(zip(conv.turns, result.turns, strict=True)):
        console.print(f"\nuser {k}: {printable(other.prompt)}", soft_wrap=True, markup=False)
        if k < args.turn:
            console.print(f"assistant {k} (before the intervention, unchanged): "
                          f"{printable(fact.text)}", soft_wrap=True, markup=False)  # fmt: skip
        else:
            present.show(console, lm.tokenizer, fact, [(f"{label} turn {k}", other)])
    console.print(f"[dim]{label} {elapsed:.1f}s[/dim]")
    if args.out:
        result.to_json(args.out)
        console.print(f"conversation: {args.out}", soft_wrap=True, markup=False)
    return 0
