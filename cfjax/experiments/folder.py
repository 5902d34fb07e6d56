"""A study's output folder: its settings (`config.json`) and its rows (`rows.jsonl`).

Rows are appended as each unit of work finishes, flushed and synced, so a crash or Ctrl-C loses
no finished row and the same command resumes after the last finished unit. A folder made with
other settings is refused, naming what differs.
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


def open_study(out: Path, settings: dict[str, Any]) -> list[dict]:
    """Create or resume the study folder `out`; the rows it already holds."""
    out.mkdir(parents=True, exist_ok=True)
    config = out / "config.json"
    mine = json.loads(json.dumps(settings))  # tuples as lists, as read back
    if config.exists():
        theirs = json.loads(config.read_text(encoding="utf-8"))
        if theirs != mine:
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise ValueError(
                f"{out}: a study made with other settings ({', '.join(diff)} differ); use "
                "another --out folder"
            )
    else:
        from cfjax.atomic import write_text

        write_text(config, json.dumps(mine, indent=1))
    rows = out / "rows.jsonl"
    if not rows.exists():
        return []
    text = rows.read_text(encoding="utf-8")
    complete = text[: text.rfind("\n") + 1]  # a line cut by a crash is dropped
    if len(complete) != len(text):
        rows.write_text(complete, encoding="utf-8")
    return parse_rows(rows, complete)


def process(
    out: Path,
    units: Sequence[Any],
    work: Callable[[Any], list[dict]],
    *,
    size: Callable[[Any], int] = lambda _unit: 1,
    desc: str,
    unit: str,
    progress: bool | None = None,
    on_unit: Callable[[int], None] | None = None,
) -> Path:
    """Do each unit of work and append its rows to `out/rows.jsonl` durably as it finishes,
    with a progress bar counting `size(unit)` items of each; returns the rows file.
    `on_unit(n)` is called after unit n (a test's hook to interrupt a run)."""
    from tqdm import tqdm

    bar = tqdm(total=sum(map(size, units)), desc=desc, unit=unit, disable=progress is False)
    with open(out / "rows.jsonl", "a", encoding="utf-8") as f:
        for n, u in enumerate(units):
            rows = work(u)
            f.write("".join(to_json(r) + "\n" for r in rows))
            f.flush()
            os.fsync(f.fileno())
            bar.update(size(u))
            if on_unit is not None:
                on_unit(n)
    bar.close()
    return out / "rows.jsonl"
