"""The stability study's workload, side by side: cfjax's study command against the paper's method.

SmolLM2-135M-Instruct float32, `--prompts` of the shipped questions (16) x `--temperatures`
(3) x `--interventions` (2), fixed `--new-tokens` answers (128; stop tokens ignored on both
sides, so the token counts match). cfjax runs `cfjax.experiments.stability.run` as the command
does (factual answers of all prompts and temperatures in one batch, their counterfactuals and
interventional answers in one batch each); the reference (`study_peer.py`, transformers at batch
1 in a child process) regenerates each counterfactual from the prompt with the saved noise, as
the paper's code does. The reference is one answer after another, so `--reference-prompts` of
the prompts are timed and scaled to all of them (the JSON says how many ran).

    python benchmarks/study.py            # table
    python benchmarks/study.py --json     # {"cfjax_s", "paper_method_s", "speedup", ...}
    python benchmarks/study.py --config tiny --prompts 2 --new-tokens 16 --json   # smoke test
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import DEFAULT_MODEL, CompileClock, lm_with_hf_source, provenance, run_peer


def main() -> None:
    """Time both sides; print the table (or the JSON object)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--config", help="random weights of this preset instead (e.g. tiny)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--reference-prompts", type=int, default=4, help="reference prompts timed")
    ap.add_argument("--temperatures", default="0.4,0.7,1.0")
    ap.add_argument("--interventions", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--json", action="store_true", help="print the JSON object only")
    args = ap.parse_args()

    from cfjax.experiments import stability
    from cfjax.experiments.questions import QUESTIONS
    from cfjax.runtime.request import prompt_tokens

    started = time.perf_counter()
    tmp = tempfile.TemporaryDirectory()
    lm, source = lm_with_hf_source(args.model, args.config, Path(tmp.name))
    temperatures = tuple(float(t) for t in args.temperatures.split(","))
    questions = list(QUESTIONS[: args.prompts])
    if lm.tokenizer is None:  # random weights without a tokenizer: token-id prompts
        import numpy as np

        rng = np.random.default_rng(0)
        prompts = [rng.integers(0, lm.config.vocab_size, 40).tolist() for _ in questions]
    else:
        prompts = questions  # text: the study's chat prompts, whose ids the reference gets
    ids = [p if lm.tokenizer is None else prompt_tokens(lm, p, system=stability.SYSTEM)
           for p in prompts]  # fmt: skip
    settings = stability.Settings(
        model_id=lm.model_id, prompts_sha256=stability.prompts_digest(questions),
        n_prompts=len(prompts), temperatures=temperatures, top_p=(), top_k=(),
        mechanisms=("gumbel",), interventions=args.interventions,
        max_new_tokens=args.new_tokens, batch_prompts=len(prompts), ignore_stop=True,
    )  # fmt: skip
    clock = CompileClock()
    with clock.measure() as compile_s:  # warm: the same shapes once, untimed
        stability.run(lm, prompts, settings, Path(tmp.name) / "warm", progress=False)
    lm.caches.clear()
    t = time.perf_counter()
    rows_file = stability.run(lm, prompts, settings, Path(tmp.name) / "timed", progress=False)
    cfjax_s = time.perf_counter() - t
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]

    spec = {"source": source, "new_tokens": args.new_tokens, "temperatures": temperatures,
            "interventions": args.interventions, "prompts": ids[: args.reference_prompts]}  # fmt: skip
    ref = run_peer("study_peer.py", spec)
    paper_s = ref["per_prompt_s"] * len(prompts)
    result = {
        "cfjax_s": round(cfjax_s, 3),
        "paper_method_s": round(paper_s, 3),
        "speedup": round(paper_s / cfjax_s, 2),
        "prompts": len(prompts),
        "temperatures": list(temperatures),
        "interventions": args.interventions,
        "new_tokens": args.new_tokens,
        "rows": len(rows),
        "reference_prompts_timed": ref["prompts"],
        "reference_per_prompt_s": round(ref["per_prompt_s"], 3),
        # Interventions made per prompt on each side (positions whose top-p set holds only the
        # factual token are skipped by both), so that the two did comparable work.
        "cfjax_interventions_per_prompt": round(len(rows) / len(prompts), 2),
        "reference_interventions_per_prompt": round(ref["interventions_done"] / ref["prompts"], 2),
        **provenance(lm, ref, compile_s[0], started),
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"stability workload: {len(prompts)} prompts x {len(temperatures)} temperatures x "
          f"{args.interventions} interventions, {args.new_tokens}-token answers ({lm.model_id})")  # fmt: skip
    print(f"  cfjax (the study command)         {cfjax_s:8.2f} s  ({len(rows)} rows)")
    print(f"  paper's method (HF, batch 1)      {paper_s:8.2f} s  "
          f"({ref['prompts']} prompts timed, {ref['per_prompt_s']:.2f} s each)")  # fmt: skip
    print(f"  speedup                           {paper_s / cfjax_s:8.2f}x")


if __name__ == "__main__":
    main()
