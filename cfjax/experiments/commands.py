"""`cfjax experiment ...`: the studies as commands (stability, census, census-report, coupled)."""

from __future__ import annotations

import dataclasses
import json
import sys
import warnings
from pathlib import Path

from cfjax import arguments as arg
from cfjax.experiments.folder import check_study
from cfjax.weights.loader import DEFAULT_MODEL


def add_experiment_parsers(sub, parser_class) -> None:
    """The `experiment` command and its studies, on the CLI's subparsers."""
    e = sub.add_parser("experiment", help="the paper's studies")
    studies = e.add_subparsers(dest="study", required=True, parser_class=parser_class)
    st = studies.add_parser("stability", help="edit distance of counterfactual answers (§4.2)")
    st.add_argument("--model", default=DEFAULT_MODEL, help="name, model dir or .gguf")
    st.add_argument("--prompts", type=Path, default=None, help="one per line (default: shipped)")
    st.add_argument("--limit", type=arg.positive, default=None, help="the first N prompts only")
    st.add_argument("--temperatures", default="0,0.2,0.4,0.6,0.8,1.0", help="the temperature grid")
    st.add_argument("--top-p", default="0.75,0.9,0.95,0.99,0.999", help="at τ 0.6; '' for none")
    st.add_argument("--top-k", default="2,3,5,10,100", help="at τ 0.6; '' for none")
    st.add_argument(
        "--mechanisms", default="gumbel,inverse-cdf", help="sampling mechanisms compared"
    )
    st.add_argument("--interventions", type=arg.positive, default=2, help="positions per answer")
    st.add_argument("--max-new-tokens", type=arg.positive, default=128, help="answer budget")
    st.add_argument("--seed", type=arg.seed, default=42, help="the study's seed")
    st.add_argument("--batch-prompts", type=arg.positive, default=8, help="prompts per batch")
    st.add_argument(
        "--out", type=Path, required=True, help="the study folder (resumed if it exists)"
    )
    st.add_argument("--plot", action="store_true", help="draw the figures as PNG into --out")
    c = studies.add_parser(
        "census", help="census records and their Sex / Race counterfactuals (§4.3)"
    )
    c.add_argument("--model", default=DEFAULT_MODEL, help="name, model dir or .gguf")
    c.add_argument("--seeds", type=arg.seeds, default="0,1,2", help="one census per seed")
    c.add_argument(
        "--people", type=arg.positive, default=50, help="people asked for in each census"
    )
    c.add_argument(
        "--temperature", type=arg.temperature, default=0.8, help="sampling temperature (> 0)"
    )
    c.add_argument(
        "--max-new-tokens", type=arg.positive, default=None, help="default: 120 a person + 64"
    )
    c.add_argument("--attributes", default="Sex,Race", help="attributes intervened on")
    c.add_argument("--effects", default="total,direct", help="effects measured")
    c.add_argument("--one-shot", action="store_true",
                   help="begin the response with the paper's first record (for small models)")  # fmt: skip
    c.add_argument(
        "--out", type=Path, required=True, help="the study folder (resumed if it exists)"
    )
    cp = studies.add_parser("coupled", help="coupled evaluation of several models (Benz et al.)")
    cp.add_argument("--models", nargs="+", required=True,
                    help="names, paths or ids: NAME@bfloat16, NAME@int8, a saved fine-tune")  # fmt: skip
    cp.add_argument("--questions", type=Path, default=None, help="JSON lines (default: shipped)")
    cp.add_argument("--limit", type=arg.positive, default=None, help="the first N questions only")
    cp.add_argument(
        "--samples", type=arg.positive, default=10, help="answers per question and noise"
    )
    cp.add_argument(
        "--temperature", type=arg.temperature, default=1.0, help="sampling temperature (> 0)"
    )
    cp.add_argument("--max-new-tokens", type=arg.positive, default=4, help="answer budget")
    cp.add_argument("--seed", type=arg.seed, default=0, help="the study's seed")
    cp.add_argument("--batch-questions", type=arg.positive, default=10, help="questions per batch")
    cp.add_argument(
        "--out", type=Path, required=True, help="the study folder (resumed if it exists)"
    )
    cp.add_argument("--json", action="store_true", help="print the summary as JSON")
    sm = studies.add_parser("summary", help="any study folder's table, with n and 95%% intervals")
    sm.add_argument("dir", type=Path, help="a stability, census or coupled study folder")
    sm.add_argument("--json", action="store_true", help="print the table as JSON")
    r = studies.add_parser("census-report", help="the census study's tables and figures")
    r.add_argument("dir", nargs="?", type=Path, help="a census study folder (its rows.jsonl)")
    r.add_argument("--paper-data", type=Path, help="the paper's *_cf_changes.json folder instead")
    r.add_argument("--out", type=Path, default=None, help="write report.md and PNGs here")
    r.add_argument("--json", action="store_true", help="print the income table as JSON rows")


def _numbers(text: str, kind, name: str) -> tuple:
    try:
        return tuple(kind(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--{name}: not a comma-separated list of numbers: {text!r}") from None


def cmd_stability(args) -> int:
    """`cfjax experiment stability`: run or resume the study, optionally plot it."""
    from cfjax.core.scm import MECHANISMS
    from cfjax.experiments import stability

    prompts = stability.read_prompts(args.prompts)[: args.limit]
    mechanisms = tuple(m.strip() for m in args.mechanisms.split(",") if m.strip())
    bad = [m for m in mechanisms if m not in MECHANISMS]
    if bad or not mechanisms:
        raise ValueError(f"--mechanisms: unknown {bad}; valid: {', '.join(MECHANISMS)}")
    settings = dict(
        prompts_sha256=stability.prompts_digest(prompts),
        n_prompts=len(prompts), temperatures=_numbers(args.temperatures, float, "temperatures"),
        top_p=_numbers(args.top_p, float, "top-p"), top_k=_numbers(args.top_k, int, "top-k"),
        mechanisms=mechanisms, interventions=args.interventions,
        max_new_tokens=args.max_new_tokens, seed=args.seed, batch_prompts=args.batch_prompts,
    )  # fmt: skip
    for m in mechanisms:  # every sampler validated before the model load and any write
        stability.Settings(model_id="", **settings).samplers(m)
    check_study(args.out, dataclasses.asdict(stability.Settings(model_id="", **settings)),
                inputs=(args.prompts,), later=("model_id",))  # fmt: skip
    from cfjax.weights import load

    lm = load(args.model)
    rows_file = stability.run(
        lm, prompts, stability.Settings(model_id=lm.model_id, **settings), args.out
    )
    print(f"rows: {rows_file}", file=sys.stderr)
    _print_summary(args.out)
    if args.plot:
        from cfjax.experiments.census import read_rows

        with warnings.catch_warnings(record=True) as caught:  # one readable line each
            warnings.simplefilter("always")
            pngs = stability.plot(read_rows(rows_file), args.out, lm.model_id)
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
        for png in pngs:
            print(f"figure: {png}", file=sys.stderr)
    return 0


def cmd_census(args) -> int:
    """`cfjax experiment census`: run or resume the study."""
    from cfjax.core.scm import MIN_TEMPERATURE
    from cfjax.experiments import census_study

    words = lambda text: tuple(w.strip() for w in text.split(",") if w.strip())  # noqa: E731
    people = args.people
    if not args.temperature >= MIN_TEMPERATURE:
        raise ValueError(f"--temperature must be > 0 (the study samples), got {args.temperature}")
    max_new = args.max_new_tokens
    settings = dict(
        seeds=args.seeds, people=people, temperature=args.temperature,
        max_new_tokens=max_new or 120 * people + 64, attributes=words(args.attributes),
        effects=words(args.effects), one_shot=args.one_shot,
    )  # fmt: skip
    unloaded = census_study.Settings(model_id="", **settings)  # validated before the model load
    check_study(args.out, dataclasses.asdict(unloaded), later=("model_id",))
    from cfjax.weights import load

    lm = load(args.model)
    rows_file = census_study.run(
        lm, census_study.Settings(model_id=lm.model_id, **settings), args.out
    )
    print(f"rows: {rows_file}", file=sys.stderr)
    _print_summary(args.out)
    print(f"report: cfjax experiment census-report {args.out} --out {args.out}", file=sys.stderr)
    return 0


def cmd_coupled(args) -> int:
    """`cfjax experiment coupled`: run or resume, then write and print the report."""
    from cfjax.atomic import write_text
    from cfjax.core.scm import MIN_TEMPERATURE
    from cfjax.experiments import coupled_eval
    from cfjax.experiments.folder import to_json

    if len(args.models) < 2:
        raise ValueError("--models: give at least two models to compare")
    questions = coupled_eval.read_questions(args.questions)[: args.limit]
    samples = args.samples
    if not args.temperature >= MIN_TEMPERATURE:
        raise ValueError(f"--temperature must be > 0 (the answers are sampled), got {args.temperature}")  # fmt: skip
    settings = coupled_eval.Settings(
        models=tuple(args.models), questions_sha256=coupled_eval.questions_digest(questions),
        n_questions=len(questions), samples=samples, temperature=args.temperature,
        max_new_tokens=args.max_new_tokens, seed=args.seed,
        batch_questions=args.batch_questions,
    )  # fmt: skip
    check_study(args.out, dataclasses.asdict(settings), inputs=(args.questions,))
    from cfjax.weights import load

    models = [load(m) for m in args.models]
    rows_file = coupled_eval.run(models, questions, settings, args.out)
    from cfjax.experiments.census import read_rows

    summary = coupled_eval.summarize(read_rows(rows_file), args.models)
    write_text(args.out / "summary.json", to_json(summary, indent=1))
    write_text(args.out / "report.md", coupled_eval.markdown(summary))
    print(to_json(summary) if args.json else coupled_eval.markdown(summary))
    return 0


def cmd_summary(args) -> int:
    """`cfjax experiment summary DIR`: the study's table, markdown or JSON."""
    from cfjax.experiments import summary
    from cfjax.experiments.folder import to_json

    table, text = summary.summarize(args.dir)
    print(to_json(table) if args.json else text)
    return 0


def _print_summary(out: Path) -> None:
    """The study's table, at the end of its run."""
    from cfjax.experiments import summary

    print(summary.summarize(out)[1])


def run_experiment(args) -> int:
    """`cfjax experiment stability | census | census-report | coupled | summary`."""
    from cfjax.experiments import census, report

    if args.study == "stability":
        return cmd_stability(args)
    if args.study == "census":
        return cmd_census(args)
    if args.study == "coupled":
        return cmd_coupled(args)
    if args.study == "summary":
        return cmd_summary(args)

    if (args.dir is None) == (args.paper_data is None):
        raise ValueError("give a study folder or --paper-data DIR (one of them)")
    if args.out is not None:  # a study folder takes its report; the paper's data folder does not
        from cfjax.atomic import check_writable_folder

        out = check_writable_folder(args.out).resolve()
        data = args.paper_data.expanduser().resolve() if args.paper_data else None
        if data is not None and (out == data or data in out.parents):
            raise ValueError(f"{args.out}: inside the paper's data folder {args.paper_data}; write the report to another folder")  # fmt: skip
    rows = census.read_rows(args.dir) if args.dir else census.read_paper_data(args.paper_data)
    if args.json:
        print(json.dumps(census.income_table(rows)))
    if args.out is not None:
        model = "Llama 3 8B-Instruct (the paper's data)" if args.paper_data else _model_of(args.dir)
        print(f"report: {report.write(rows, args.out, model)}", file=sys.stderr)
    elif not args.json:
        print(report.markdown(rows))
    return 0


def _model_of(folder) -> str:
    """The model id a study folder's `config.json` records ("" without one)."""
    config = Path(folder) / "config.json"
    return str(json.loads(config.read_text(encoding="utf-8")).get("model_id", "")) if config.is_file() else ""  # fmt: skip
