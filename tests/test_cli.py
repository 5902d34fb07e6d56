"""The `cfjax` command end to end on the embedded SmolLM2, and its one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cfjax.causal.trace import Trace
from cfjax.cli import main


def run_cli(*args: str, cache: str = "") -> subprocess.CompletedProcess:
    """The console script in a child process; `cache`: its compilation cache folder (off)."""
    return subprocess.run(
        [sys.executable, "-m", "cfjax.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "CFJAX_COMPILATION_CACHE": cache},
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["counterfactual", "no-such-trace.json", "--replace", "a=>b"], "no-such-trace.json"),
        (["generate", "--prompt", "hi", "--temperature", "-1"], "temperature must be"),
        (["generate", "--prompt", "hi", "--model", "no-such-model"], "no-such-model"),
        (["convert", "no-such-dir", "out"], "no-such-dir"),
    ],
)
def test_errors_are_one_line(args, message):
    proc = run_cli(*args)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("cfjax: error:") and message in lines[0]
    assert "Traceback" not in proc.stderr


def test_bad_argument_value_exits_nonzero(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--prompt", "x", "--max-new-tokens", "many"])
    assert e.value.code != 0
    assert "invalid int value: 'many'" in capsys.readouterr().err


@pytest.mark.slow
def test_generate_then_counterfactual(tmp_path):
    trace_path, cf_path, html = tmp_path / "t.json", tmp_path / "cf.json", tmp_path / "d.html"
    prompt = "Tell me a short story about a ship captain named Ahab."
    generate = (
        "generate", "--prompt", prompt, "--seed", "0", "--temperature", "0.8",
        "--max-new-tokens", "24", "--out", str(trace_path),
    )  # fmt: skip
    cache = tmp_path / "xla"
    proc = run_cli(*generate, cache=str(cache))
    assert proc.returncode == 0, proc.stderr
    # The compiled decode chunk was kept, and a run that loads it prints the same response.
    assert any(p.name.startswith("jit__run_chunk") for p in cache.iterdir())
    again = run_cli(*generate, cache=str(cache))
    assert again.returncode == 0 and again.stdout == proc.stdout
    trace = Trace.from_json(trace_path)
    assert trace.model_id == "smollm2-135m-instruct" and len(trace.tokens) == 24
    assert proc.stdout.strip() == trace.text.strip()  # the streamed text is the response
    assert "Ahab" in trace.text

    proc = run_cli(
        "counterfactual", str(trace_path), "--replace", "Ahab=>Maeve",
        "--out", str(cf_path), "--html", str(html),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    cf = json.loads(cf_path.read_text())
    assert cf["interventions"][0] == {"type": "ReplaceText", "old": "Ahab", "new": "Maeve"} | {
        "occurrence": 1
    }
    before = trace.text[: trace.text.index("Ahab")]
    assert cf["text"].startswith(before + "Maeve")
    assert "factual" in proc.stdout and "counterfactual" in proc.stdout
    page = html.read_text()
    assert "<html>" in page and "Maeve" in page

    proc = run_cli(
        "counterfactual", str(trace_path), "--replace", "Ahab=>Maeve", "--occurrence", "9"
    )
    assert proc.returncode == 1 and "occurs" in proc.stderr and "not 9" in proc.stderr
