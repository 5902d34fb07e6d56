"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never half of one."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` through a hidden sibling renamed into place."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(f"{path}: cannot write ({e.strerror})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_writable(path: str | os.PathLike, *, inputs: tuple = ()) -> Path:
    """Raise before any work if `path` cannot be written as a file, or is one of `inputs`."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a folder, not a file to write")
    parent = path.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"{path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{path}: the folder {parent} is not writable")
    for src in inputs:
        if src is not None and Path(src).expanduser().resolve() == path.resolve():
            raise ValueError(f"{path}: is the input; write the result to another file")
    return path
