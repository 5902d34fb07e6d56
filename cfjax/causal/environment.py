"""Where a trace was computed: the software and the chip whose rounding made its logits.

A trace replays anywhere, but its log-probs are the rounding of the machine that made it: XLA
rounds float32 sums differently on an AMD EPYC than on an Intel Xeon, a GPU otherwise again, and
a model run with `batch_invariant=False` or `model_blocks=n` otherwise on any of them.
Tokens at a near-tie (a margin of ~1e-5 between two scored tokens) can then go the other way, so
a null intervention reproduces a trace bit for bit only where it was made. Each trace records its
`made_on` (see `environment`), and replaying one made elsewhere warns (`ReplayWarning`), once
per calling line.

The package's version does not move when its arithmetic does, so `made_on` also carries
`NUMERICS`, the generation of cfjax's own rounding: a trace made before a change of results in
cfjax itself warns like one made on another chip.
"""

from __future__ import annotations

import functools
import platform
import sys
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import jax

# The generation of cfjax's arithmetic. Bumped with every change to cfjax that moves a bit of
# the golden runs (`tests/golden_runs.py`, which records it and refuses to re-record results
# under an unchanged value; `tests/test_golden.py` checks the record against it).
NUMERICS = "1"


class ReplayWarning(UserWarning):
    """A trace made by other software, on another chip or in another numerics mode than the
    replay runs in."""


def environment(lm: Any) -> dict[str, str]:
    """`{"cfjax", "cfjax_numerics", "jax", "jaxlib", "platform", "device"}` of the chip that
    holds `lm`'s first param array (the default device for host arrays; on a CPU `device` names
    the processor model), and how `lm` computes: `"batch_invariant"` ("true"/"false") and
    `"model_blocks"`, which round otherwise too (see `LM.replace`). Strings, as JSON keeps them."""
    leaf = next((x for x in jax.tree.leaves(lm.params) if isinstance(x, jax.Array)), None)
    device = min(leaf.devices(), key=lambda d: d.id) if leaf is not None else jax.devices()[0]
    return {
        **_environment(device.platform, device.device_kind),
        "batch_invariant": str(lm.config.batch_invariant).lower(),
        "model_blocks": str(lm.config.model_blocks),
    }


@functools.lru_cache(maxsize=8)
def _environment(platform_name: str, device_kind: str) -> dict[str, str]:
    if platform_name == "cpu":
        device_kind = _processor()
    return {
        "cfjax": _version("cfjax"),
        "cfjax_numerics": NUMERICS,
        "jax": jax.__version__,
        "jaxlib": _version("jaxlib"),
        "platform": platform_name,
        "device": device_kind,
    }


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def _processor() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def check(made_on: Any, what: str) -> dict[str, str] | None:
    """A trace file's `made_on`: null, or an object of strings (other fields kept, for newer
    writers); a ValueError naming `what` otherwise."""
    if made_on is None:
        return None
    if not isinstance(made_on, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in made_on.items()
    ):
        raise ValueError(
            f"{what} must be an object of strings (jax, platform, device, ...) or null"
        )
    return made_on


def warn_if_elsewhere(made_on: dict[str, str] | None, lm: Any) -> None:
    """A `ReplayWarning` when a trace was made with other software, on another chip or in
    another numerics mode than `lm` runs in: the replay's tokens after its edits are this
    machine's, and a near-tie may round otherwise (a null intervention then differs from it)."""
    if made_on is None:
        return
    here = environment(lm)
    differ = [k for k in here if k in made_on and made_on[k] != here[k]]
    if differ:
        there = ", ".join(f"{k} {made_on[k]!r}" for k in differ)
        now = ", ".join(f"{k} {here[k]!r}" for k in differ)
        warnings.warn(
            f"the trace was made with {there}; this replay runs with {now}: its logits round "
            "as this machine rounds them, so a token at a near-tie may differ from the trace's "
            "(even under a null intervention)",
            ReplayWarning,
            stacklevel=_outside_cfjax(),
        )


def _outside_cfjax() -> int:
    """The `stacklevel` of the first caller outside the package: the warning names the user's
    line (and shows once per such line), not the engine's."""
    package = str(Path(__file__).resolve().parents[1])
    level, frame = 2, sys._getframe(2)  # 1: warn_if_elsewhere, 2: its caller
    while frame is not None and frame.f_code.co_filename.startswith(package):
        level, frame = level + 1, frame.f_back
    return level
