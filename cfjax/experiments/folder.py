"""A study's output folder: its settings (`config.json`), its rows (`rows.jsonl`) and the items
of every finished unit (`finished.jsonl`).

Rows are appended as each unit of work finishes, flushed and synced, then the unit's items are
recorded, so a crash or Ctrl-C loses no finished row and the same command resumes after the last
finished unit, without redoing a unit that yielded no row. A folder made with other settings is
refused, naming what differs.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def finite(value: Any) -> Any:
    """`value` with every NaN or infinite float replaced by None: JSON has no NaN/Infinity, and
    a reader of `summary.json` or `rows.jsonl` should not meet them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def to_json(value: Any, **kwargs) -> str:
    """Strict JSON of `value` (non-finite floats as null)."""
    return json.dumps(finite(value), allow_nan=False, ensure_ascii=False, **kwargs)


def parse_rows(file: Path, text: str) -> list[dict]:
    """The rows of a `rows.jsonl` text; a bad line is named by file and line number."""
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as e:
                raise ValueError(f"{file}:{n}: not a JSON row ({getattr(e, 'msg', 'nested too deeply')})") from None  # fmt: skip
            if not isinstance(row, dict):
                raise ValueError(f"{file}:{n}: a row is a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


FINISHED = "finished.jsonl"


def _complete_lines(file: Path) -> str:
    """The file's text up to its last newline (a line cut by a crash is dropped from the file)."""
    text = file.read_text(encoding="utf-8")
    complete = text[: text.rfind("\n") + 1]
    if len(complete) != len(text):
        file.write_text(complete, encoding="utf-8")
    return complete


def finished(out: Path) -> set[tuple]:
    """The items (as tuples) of every finished unit, those that yielded no row too."""
    file = out / FINISHED
    if not file.exists():
        return set()
    lines = _complete_lines(file).splitlines()
    try:
        return {tuple(item) for line in lines if line.strip() for item in json.loads(line)}
    except (json.JSONDecodeError, TypeError):
        raise ValueError(f"{file}: not a list of finished items per line") from None


def check_study(out: Path, settings: dict[str, Any], *, inputs: tuple = (), later: tuple = ()) -> None:  # fmt: skip
    """Before the model loads and anything is written: raise if the study folder `out` cannot be
    written, holds one of `inputs`, or was made with other settings (those in `later`, known
    once the model is loaded, are compared by `open_study`)."""
    from cfjax.atomic import check_writable_folder

    check_writable_folder(out, inputs=inputs)
    _check_settings(out, settings, ignore=later)


def _check_settings(out: Path, settings: dict[str, Any], ignore: tuple = ()) -> None:
    """Raise if `out` holds a `config.json` whose settings (but `ignore`) differ."""
    config = out / "config.json"
    if not config.exists():
        return
    try:
        theirs = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{config}: unreadable study settings ({e})") from None
    if not isinstance(theirs, dict):
        raise ValueError(f"{config}: not a study's settings (a JSON {type(theirs).__name__})")
    mine = json.loads(json.dumps(settings))  # tuples as lists, as read back
    diff = sorted(k for k in (set(mine) | set(theirs)) - set(ignore) if mine.get(k) != theirs.get(k))  # fmt: skip
    if diff:
        raise ValueError(f"{out}: a study made with other settings ({', '.join(diff)} differ); use another --out folder")  # fmt: skip


def open_study(out: Path, settings: dict[str, Any]) -> list[dict]:
    """Create or resume the study folder `out`; the rows it already holds."""
    _check_settings(out, settings)
    out.mkdir(parents=True, exist_ok=True)
    config = out / "config.json"
    if not config.exists():
        from cfjax.atomic import write_text

        write_text(config, json.dumps(settings, indent=1))
    rows = out / "rows.jsonl"
    if not rows.exists():
        return []
    return parse_rows(rows, _complete_lines(rows))


def process(
    out: Path,
    units: Sequence[Any],
    work: Callable[[Any, Callable[[float], None]], list[dict]],
    *,
    items: Callable[[Any], list[tuple]],
    size: Callable[[Any], int] = lambda _unit: 1,
    desc: str,
    unit: str,
    progress: bool | None = None,
    on_unit: Callable[[int], None] | None = None,
) -> Path:
    """Do each unit of work and append its rows to `out/rows.jsonl` durably as it finishes, then
    its `items(unit)` (the keys a resumed run skips) to `finished.jsonl`, with a progress bar
    counting `size(unit)` items of each; returns the rows file. `work(unit, tick)` may call
    `tick(fraction)` as it goes, so that the bar moves (and estimates) within a unit.
    `on_unit(n)` is called after unit n (a test's hook to interrupt a run)."""
    from tqdm import tqdm

    bar = tqdm(total=sum(map(size, units)), desc=desc, unit=unit, disable=progress is False)
    with open(out / "rows.jsonl", "a", encoding="utf-8") as f, open(out / FINISHED, "a", encoding="utf-8") as g:  # fmt: skip
        for n, u in enumerate(units):
            shown = [0.0]

            def tick(fraction: float, u=u, shown=shown) -> None:
                bar.update(size(u) * min(max(fraction, 0.0), 1.0) - shown[0])
                shown[0] = size(u) * min(max(fraction, 0.0), 1.0)

            rows = work(u, tick)
            for file, text in ((f, "".join(to_json(r) + "\n" for r in rows)), (g, to_json(items(u)) + "\n")):  # fmt: skip
                file.write(text)
                file.flush()
                os.fsync(file.fileno())
            tick(1.0)
            if on_unit is not None:
                on_unit(n)
    bar.close()
    return out / "rows.jsonl"
