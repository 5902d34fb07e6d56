"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import threading
from pathlib import Path


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` through a hidden sibling renamed into place."""
    write_bytes(path, text.encode("utf-8"))


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a hidden sibling renamed into place."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        tmp.write_bytes(data)
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


def check_writable_folder(path: str | os.PathLike, *, inputs: tuple = ()) -> Path:
    """Raise before any work if files cannot be written in the folder `path` (made later, by the
    writer, if it does not exist yet) or if it holds one of `inputs`, which a write could
    overwrite. Creates nothing."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path}: is a file, not a folder to write in")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"{path}: cannot write in {existing}")
    for src in inputs:
        if src is not None and path.resolve() in Path(src).expanduser().resolve().parents:
            raise ValueError(f"{path}: holds the input {src}; write the results to another folder")
    return path


@contextlib.contextmanager
def deferred_interrupts():
    """Hold SIGINT and SIGTERM until the block ends, then raise KeyboardInterrupt.

    For writes that must not be cut mid-way (orbax's save threads abort the process when the
    main thread is interrupted under them); the caller's cleanup then runs as for any error.
    Only the main thread can set handlers: elsewhere the block runs as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    old = {s: signal.signal(s, lambda n, _f: caught.append(n)) for s in _HELD}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    if caught:
        raise KeyboardInterrupt


_HELD = (signal.SIGINT, signal.SIGTERM)


def remove_stale_partials(path: str | os.PathLike) -> None:
    """Remove hidden `.NAME.partial-PID-*` siblings of `path` left by processes that are gone
    (killed before they could clean up)."""
    path = Path(path)
    for tmp in path.parent.glob(f".{path.name}.partial-*-*"):
        try:
            pid = int(tmp.name.rsplit("-", 2)[-2])
        except ValueError:
            continue
        if pid != os.getpid() and not _alive(pid):
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
