"""`cfjax attribute TRACE`: the effect of each word of the prompt (or token of the response) on
the answer, as a table, a JSON file and a heatmap."""

from __future__ import annotations

import json
import time

from cfjax.atomic import check_writable, write_bytes, write_text
from cfjax.present import printable

PLOT_FORMATS = (".png", ".svg", ".pdf")


def cmd_attribute(args, replay_model) -> int:
    from rich.console import Console
    from rich.table import Table

    from cfjax.causal import Trace
    from cfjax.causal.attribution import Auto, attribute

    trace = Trace.from_json(args.trace)
    if args.auto and args.replace is not None:
        raise ValueError("give --replace TEXT or --auto, not both")
    if args.plot is not None and args.plot.suffix.lower() not in PLOT_FORMATS:
        raise ValueError(f"--plot {args.plot}: name a {', '.join(PLOT_FORMATS)} file")
    for out in (args.out, args.plot):  # before the work, so that a bad path loses nothing
        if out is not None:
            check_writable(out, inputs=(args.trace,))
    if args.out is not None and args.plot is not None and args.out.resolve() == args.plot.resolve():
        raise ValueError(f"{args.out}: given as both --out and --plot")
    lm = replay_model(trace, args.model, args.dtype)
    t0 = time.perf_counter()
    effects = attribute(
        lm, trace, unit=args.unit, over=args.over,
        replace=Auto(seed=args.seed) if args.auto else args.replace, contains=args.contains,
        interventional=not args.no_interventional, key=args.seed, batch_size=args.batch_size,
    )  # fmt: skip
    elapsed = time.perf_counter() - t0
    console = Console()
    table = Table(title=f"attribution over the {args.over} ({len(effects)} units, {elapsed:.1f}s)")
    for name in ("unit", "text", "instead", "distance", "kept", "fresh noise") + (("contains",) if args.contains else ()):  # fmt: skip
        table.add_column(name, justify="left" if name in ("text", "instead") else "right")
    for e in effects:
        row = [str(e.unit), printable(e.text), printable(e.replacement) or "(removed)",
               f"{e.distance:.2f}", f"{e.kept_share:.0%}",
               "-" if e.interventional_distance is None else f"{e.interventional_distance:.2f}"]  # fmt: skip
        table.add_row(*row, *([str(e.contains)] if args.contains else []))
    console.print(table)
    top = max(effects, key=lambda e: e.distance)
    console.print(f"largest effect: {printable(top.text)!r} (unit {top.unit}): "
                  f"{printable(top.trace.text)!r}", soft_wrap=True, markup=False, highlight=False)  # fmt: skip
    if args.out is not None:
        write_text(args.out, json.dumps([e.to_dict() for e in effects], ensure_ascii=False, indent=1))  # fmt: skip
        console.print(f"rows: {args.out}", soft_wrap=True, markup=False)
    if args.plot is not None:
        _plot(effects, args.plot, f"{trace.model_id}: effect of each {args.unit} of the {args.over}")  # fmt: skip
        console.print(f"plot: {args.plot}", soft_wrap=True, markup=False)
    return 0


def _plot(effects, path, title: str) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cfjax.experiments.plots import attribution_heatmap

    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(effects) + 2.5), 2.8), constrained_layout=True)  # fmt: skip
    attribution_heatmap(ax, effects, title=title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format=path.suffix.lower().lstrip("."), dpi=150)
    plt.close(fig)
    write_bytes(path, buffer.getvalue())
