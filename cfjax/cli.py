"""The `cfjax` command: counterfactual token generation from the command line.

Subcommands: generate, converse, counterfactual, attribute, abduct, experiment, convert, models,
serve, demo.

Every failure the user can cause (a bad argument, a missing file, an edit that does not apply)
ends with one readable line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import signal
import socket
import sys
import threading
import time
import warnings

from cfjax.atomic import check_writable, check_writable_folder, write_text
from cfjax.cli_parser import parser
from cfjax.experiments.commands import run_experiment
from cfjax.present import printable


def _load(spec: str, dtype: str | None = None):
    from cfjax.weights import load

    return load(spec, dtype=dtype)


def _sampler(args, base=None):
    from cfjax.core import Sampler

    if base is None:
        return Sampler(args.temperature, args.top_k, args.top_p, args.mechanism)
    from cfjax.causal import ChangeSampler

    changes = {
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "mechanism": args.mechanism,
    }
    changes = {k: v for k, v in changes.items() if v is not None}
    return ChangeSampler(**changes) if changes else None


def cmd_generate(args) -> int:
    """`cfjax generate`: stream the response, save the trace."""
    from cfjax.causal import generate

    sampler = _sampler(args)  # validate arguments before the (slow) model load
    if args.out is not None:
        check_writable(args.out)
    lm = _load(args.model, args.dtype)
    trace = generate(
        lm,
        args.prompt,
        key=args.seed,
        sampler=sampler,
        max_new_tokens=args.max_new_tokens,
        chat=not args.no_chat,
        system=args.system,
        stream=lambda s: print(printable(s), end="", flush=True),
    )
    print()
    if args.out:
        trace.to_json(args.out)
        print(f"trace: {args.out} ({len(trace.tokens)} tokens)", file=sys.stderr)
    return 0


_NO_INTERVENTION = (
    "no intervention given: use --replace, --at/--token, --prompt, --system, --auto-at or a "
    "sampler option"
)


def _check_edit_flags(args, change) -> None:
    """What the edit flags say, checked before the (slow) model load."""
    if (args.at is None) != (args.token is None):
        raise ValueError("--at needs --token TEXT" if args.token is None else "--token needs --at POS")  # fmt: skip
    if args.token == "":
        raise ValueError("--token is empty")
    edits = (args.replace, args.at, args.prompt, args.system, args.auto_at, change)
    if all(e is None for e in edits):
        raise ValueError(_NO_INTERVENTION)


def _interventions(args, lm, trace, change) -> list:
    """The interventions the arguments ask for; `change` is the sampler change (or None)."""
    from cfjax.causal import interventions as iv

    out: list = []
    if args.replace is not None:
        old, new = args.replace
        out.append(iv.ReplaceText(old, new, args.occurrence))
    if args.at is not None:
        if lm.tokenizer is None:
            raise ValueError("--token needs a model with a tokenizer")
        tokens = lm.tokenizer.encode(args.token)
        if not tokens:
            raise ValueError("--token is empty")
        out.append(iv.ReplaceTokens(args.at, tokens, count=1))  # the token at POS, as the explorer
    if args.prompt is not None or args.system is not None:
        out.append(iv.EditPrompt(prompt=args.prompt, system=args.system))
    if args.auto_at is not None:
        out.append(iv.AutoIntervention(args.auto_at))
    if change is not None:
        out.append(change)
    if not out:
        raise ValueError(_NO_INTERVENTION)
    return out


def _replay_model(trace, model: str | None, dtype: str | None):
    """The model that made `trace`: loaded from its id, or from `model`, another location of
    the same weights (then labelled with the trace's id, so that the trace is accepted)."""
    from cfjax.weights import model_location

    if model is None:
        return _load(trace.model_id, dtype)
    lm = _load(model, dtype or model_location(trace.model_id)[1])
    variant = lambda model_id: model_id.split("@")[1:]  # noqa: E731 ("@int8", "@bfloat16")
    if variant(lm.model_id) != variant(trace.model_id):  # other weights: never relabelled
        raise ValueError(
            f"--model {model} loads {lm.model_id!r}, another variant than the trace's model "
            f"{trace.model_id!r}: give a location of the same weights in the same dtype"
        )
    return lm.replace(model_id=trace.model_id)


def cmd_counterfactual(args) -> int:
    """`cfjax counterfactual`: apply interventions to a saved trace and show the diff."""
    from rich.console import Console

    from cfjax import present
    from cfjax.causal import counterfactual, interventional
    from cfjax.causal.conversation import Conversation, load

    trace = load(args.trace)
    conversation = trace if isinstance(trace, Conversation) else None
    if conversation is not None:
        if args.turn is None:
            raise ValueError(f"{args.trace} is a conversation: say which turn the intervention changes with --turn K")  # fmt: skip
        if args.resume_at is not None or args.html is not None:
            raise ValueError("--resume-at and --html apply to a single answer, not a conversation")  # fmt: skip
        if args.turn >= len(conversation.turns):
            raise ValueError(f"--turn {args.turn}: the conversation has turns 0 to {len(conversation.turns) - 1}")  # fmt: skip
        if args.system is not None and args.turn != 0:
            raise ValueError("--system: the system message precedes every turn; give it with --turn 0")  # fmt: skip
        trace = conversation.turns[args.turn]
    elif args.turn is not None:
        raise ValueError(f"--turn: {args.trace} is a single answer, not a conversation")
    change = _sampler(args, base=trace.sampler)
    _check_edit_flags(args, change)
    for out in (args.out, args.html):  # before the work, so that a bad path loses nothing
        if out is not None:
            check_writable(out, inputs=(args.trace,))
    if args.out is not None and args.html is not None and args.out.resolve() == args.html.resolve():
        raise ValueError(f"{args.out}: given as both --out and --html")
    if args.interventional and args.resume_at is not None:
        raise ValueError("--resume-at aligns the factual noise; --interventional draws fresh noise")
    t0 = time.perf_counter()
    lm = _replay_model(trace, args.model, args.dtype)
    ivs = _interventions(args, lm, trace, change)
    if conversation is not None:
        from cfjax.cli_chat import counterfactual_conversation

        return counterfactual_conversation(args, conversation, lm, ivs)
    t1 = time.perf_counter()
    if args.interventional:
        result = interventional(lm, trace, ivs, key=args.seed)
        label, noise = "interventional", "fresh noise"
    else:
        result = counterfactual(lm, trace, ivs, resume_at=args.resume_at)
        label, noise = "counterfactual", "same noise"
    t2 = time.perf_counter()
    console = Console()
    what = "; ".join(present.describe(r, lm.tokenizer) for r in result.interventions)
    present.show(console, lm.tokenizer, trace, [(f"{label}: {what}, {noise}", result)])
    console.print(f"[dim]load {t1 - t0:.1f}s, {label} {t2 - t1:.1f}s[/dim]")
    if args.out:
        result.to_json(args.out)
        console.print(f"trace: {args.out}", soft_wrap=True, markup=False)
    if args.html:
        write_text(args.html, present.html_diff(lm.tokenizer, trace, {label: result}))
        console.print(f"side-by-side diff: {args.html}", soft_wrap=True, markup=False)
    return 0


def cmd_abduct(args) -> int:
    """`cfjax abduct`: posterior samples of observed text, a counterfactual of each, counted."""
    from rich.console import Console

    from cfjax import present
    from cfjax.causal import ChangeSampler, abduct, counterfactuals, summarize

    sampler = _sampler(args)  # validate arguments before the (slow) model load
    new = {"temperature": args.new_temperature, "top_k": args.new_top_k, "top_p": args.new_top_p}
    new = {k: v for k, v in new.items() if v is not None}
    change = ChangeSampler(**new) if new else None
    _check_edit_flags(args, change)
    if args.response_file is not None:
        try:
            response = args.response_file.read_text(encoding="utf-8")
        except OSError as e:
            raise FileNotFoundError(f"{args.response_file}: cannot read ({e.strerror})") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{args.response_file}: not UTF-8 text (byte {e.start})") from None
    else:
        response = args.response
    if args.out is not None:  # before the work, so that a bad folder loses nothing
        check_writable_folder(args.out, inputs=(args.response_file,))
    lm = _load(args.model, args.dtype)
    posts = abduct(
        lm, args.observed_prompt, response, key=args.seed, sampler=sampler,
        num_samples=args.samples, full_support=args.full_support,
        max_new_tokens=args.max_new_tokens, chat=not args.no_chat, system=args.observed_system,
    )  # fmt: skip
    ivs = _interventions(args, lm, posts[0], change)
    cfs = counterfactuals(lm, posts, [ivs] * len(posts))
    summary = summarize(cfs, contains=args.contains)
    console = Console()
    console.print(f"[bold]{len(cfs)} counterfactuals, {len(summary.counts)} distinct[/bold]")
    for text, count in summary.counts:
        console.print(f"{count:>5}  {text!r}", markup=False, highlight=False)
    if args.contains is not None:
        console.print(f"{summary.share:.1%} contain {args.contains!r}", markup=False)
    top = next(c for c in cfs if c.text == summary.counts[0][0])
    left, right = present.terminal_diff(lm.tokenizer, posts[0], top)
    console.print("\n[bold]observed[/bold]")
    console.print(left)
    console.print("\n[bold]most frequent counterfactual[/bold]")
    console.print(right)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        for i, (post, cf) in enumerate(zip(posts, cfs, strict=True)):
            post.to_json(args.out / f"sample-{i:03d}.json")
            cf.to_json(args.out / f"counterfactual-{i:03d}.json")
        print(f"traces: {args.out} ({2 * len(cfs)} files)", file=sys.stderr)
    return 0


def cmd_convert(args) -> int:
    """`cfjax convert SRC DST`."""
    from cfjax.weights import convert

    dst = convert(args.src, args.dst, dtype=args.dtype, force=args.force)
    print(f"converted {args.src} -> {dst}")
    return 0


def cmd_models(args) -> int:
    """`cfjax models`: known names and what is converted."""
    from cfjax.weights import list_models

    for m in list_models():
        print(printable("  ".join(f"{k}={v}" for k, v in m.items())))
    return 0


def cmd_demo(args) -> int:
    """`cfjax demo`."""
    from cfjax.demo import run

    return run(seed=args.seed, html=args.html)


def cmd_serve(args) -> int:
    """`cfjax serve`: load the model, then serve the explorer until Ctrl-C."""
    try:
        import uvicorn

        from cfjax.serve.app import create_app
    except ImportError as e:
        raise ImportError(
            f"cfjax serve needs the web extra: pip install 'cfjax[serve]' ({e})"
        ) from None
    limits = {k: getattr(args, k) for k in ("max_new_tokens", "max_prompt_tokens", "max_samples")}
    extra = [h.strip() for h in args.allowed_hosts.split(",") if h.strip()]
    hosts = ("127.0.0.1", "localhost", args.host.strip("[]"), *extra)
    with _listening(args.host, args.port) as sock:  # a bad --host or a port in use: refused first
        app = create_app(_load(args.model), allowed_hosts=tuple(dict.fromkeys(hosts)), **limits)
        import logging

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        print(f"cfjax explorer: http://{args.host}:{args.port}/", file=sys.stderr)
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning")
        uvicorn.Server(config).run(sockets=[sock])
    return 0


def _listening(host: str, port: int) -> socket.socket:
    """A TCP socket bound to `host`:`port`, made before the model loads, for the server to
    listen on: a name that does not resolve, an address not on this machine or a port in use
    is one line (`OSError`) and no model load."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise OSError(f"--host {host!r}: cannot listen there ({e.strerror or e})") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise OSError(f"--host {host!r} --port {port}: cannot listen there ({e.strerror or e})") from None  # fmt: skip
    return sock


def cmd_converse(args) -> int:
    from cfjax.cli_chat import cmd_converse as converse

    return converse(args, _load, _sampler)


def cmd_attribute(args) -> int:
    from cfjax.cli_attribute import cmd_attribute as attribute

    if args.unit is None:
        args.unit = "word" if args.over == "prompt" else "token"
    return attribute(args, _replay_model)


COMMANDS = {
    "generate": cmd_generate,
    "converse": cmd_converse,
    "attribute": cmd_attribute,
    "counterfactual": cmd_counterfactual,
    "abduct": cmd_abduct,
    "experiment": run_experiment,
    "convert": cmd_convert,
    "models": cmd_models,
    "demo": cmd_demo,
    "serve": cmd_serve,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `cfjax` console script."""
    try:
        args = parser(__doc__.splitlines()[0]).parse_args(argv)
    except SystemExit as e:  # --help, or a bad argument (one line printed by `_Parser.error`)
        return e.code
    previous = _signals_interrupt()
    try:
        with warnings.catch_warnings():  # restores the caller's display when main returns
            warnings.showwarning = _one_line_warning
            return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("cfjax: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, KeyError, ImportError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"cfjax: error: {printable(message)}", file=sys.stderr)
        return 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one escaped line (e.g. a trace made on another machine, `ReplayWarning`),
    not Python's file, line number and source line."""
    text = str(message).strip().splitlines()[0] if str(message).strip() else category.__name__
    print(f"cfjax: warning: {printable(text)}", file=sys.stderr)


def _signals_interrupt() -> dict:
    """SIGINT and SIGTERM end a command as Ctrl-C does, so that its cleanup runs (a conversion
    removes its partial folder). SIGINT too, because a process started with SIGINT ignored (a
    background job of a non-interactive shell, some CI runners) would otherwise finish a
    conversion it was told to stop. Returns the handlers it replaced (none off the main thread).
    """
    if threading.current_thread() is not threading.main_thread():
        return {}

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    return {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)}


def console() -> int:
    """The `cfjax` console script (the persistent compilation cache is on: `import cfjax`)."""
    return main()


if __name__ == "__main__":
    sys.exit(console())
