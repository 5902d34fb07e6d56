"""Issue 21: hand-edited traces, bad keys and counts get a clear error that names the problem;
a tiny temperature never reaches a token or a log-prob as NaN; random bad CLI input never ends
in a traceback (a bounded hypothesis search)."""

from __future__ import annotations

import json
import re
import warnings

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cfjax
from cfjax.causal import Trace, counterfactual, environment, generate
from cfjax.causal.interventions import ChangeSampler
from cfjax.core.model import init_params

PROMPT = [1, 5, 9, 33]


@pytest.fixture(scope="module")
def lm():
    config = cfjax.preset("tiny")
    return cfjax.LM(config, init_params(config, jax.random.key(0)), model_id="tiny")


@pytest.fixture(scope="module")
def fact(lm):
    return generate(lm, PROMPT, key=2, max_new_tokens=8, stop_tokens=())


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(noise_index=d["noise_index"][:-1]), "noise_index must be 8 integers"),
        (
            lambda d: d["noise_index"].__setitem__(2, -3),
            "noise_index must be 8 integers in [0, 2**31)",
        ),
        (lambda d: d["tokens"].__setitem__(1, -1), "tokens must be a list of token ids >= 0"),
        (lambda d: d.update(model_id=""), "model_id must name the model"),
        (lambda d: d.update(key=[1, 2, 3]), "trace field key: raw key data must be"),
        (lambda d: d.update(key=[1, 2**33]), "trace field key: raw key data must hold words"),
        (lambda d: d.update(key="abc"), "trace field key"),
        (lambda d: d.update(max_new_tokens=3), "max_new_tokens must be an integer >= 8"),
        (lambda d: d.update(max_new_tokens=True), "max_new_tokens must be an integer"),
        (lambda d: d.update(logprobs=[0.0]), "logprobs must be a list of 8 numbers"),
        (lambda d: d.update(prompt_tokens=[]), "prompt_tokens"),
        (lambda d: d.update(chat="yes"), "chat must be true or false"),
        (lambda d: d.update(sampler={"temperature": -1}), "trace field sampler: temperature"),
        (lambda d: d.update(stop_tokens=["x"]), "stop_tokens must be a list of token ids"),
        (lambda d: d.update(made_on="cpu"), "trace field made_on must be an object of strings"),
        (lambda d: d["made_on"].update(jax=10), "trace field made_on must be an object of strings"),
    ],
)
def test_hand_edited_traces_are_refused_naming_the_field(fact, edit, message):
    d = json.loads(fact.to_json())
    edit(d)
    with pytest.raises(ValueError, match=re.escape(message)):
        Trace.from_dict(d)


def test_a_trace_records_where_it_was_made_and_warns_when_replayed_elsewhere(lm, fact):
    """`made_on`: this process's jax, jaxlib and platform, the CPU's model as /proc/cpuinfo names
    it, and the numerics mode; a trace made elsewhere replays with a `ReplayWarning` that names
    both machines, and one made here, or in an older file without the field, replays silently."""
    import jaxlib

    from cfjax import ReplayWarning

    made = fact.to_dict()["made_on"]
    assert made["jax"] == jax.__version__ and made["jaxlib"] == jaxlib.__version__
    assert made["platform"] == "cpu" and made["cfjax"] == cfjax.__version__
    assert made["cfjax_numerics"] == environment.NUMERICS
    names = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")]  # fmt: skip
    assert made["device"] == names[0]
    assert (made["batch_invariant"], made["model_blocks"]) == ("true", "1")  # how it computed
    assert Trace.from_json(fact.to_json()).made_on == made
    edit = ChangeSampler(temperature=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReplayWarning)
        here = counterfactual(lm, Trace.from_json(fact.to_json()), edit)
        d = fact.to_dict()
        del d["made_on"]
        older = Trace.from_dict(d)
        assert older.made_on is None and counterfactual(lm, older, edit).tokens == here.tokens
    d["made_on"] = {**made, "platform": "gpu", "device": "NVIDIA H200", "extra": "kept"}
    elsewhere = Trace.from_dict(d)
    with pytest.warns(ReplayWarning, match="platform 'gpu', device 'NVIDIA H200'.*platform 'cpu'") as seen:  # fmt: skip
        cf = counterfactual(lm, elsewhere, edit)
    assert seen[0].filename == __file__  # the caller's line, not the engine's
    assert cf.tokens == here.tokens and cf.made_on == made  # computed here, recorded as here
    assert Trace.from_json(elsewhere.to_json()).made_on["extra"] == "kept"
    # Another numerics mode on this machine rounds otherwise too.
    with pytest.warns(ReplayWarning, match="batch_invariant 'true'; .* batch_invariant 'false'"):
        counterfactual(lm.replace(batch_invariant=False), fact, edit)
    # So does cfjax's own arithmetic before a change of results (its version string unmoved).
    d["made_on"] = {**made, "cfjax_numerics": "0"}
    now = re.escape(f"cfjax_numerics {environment.NUMERICS!r}")
    with pytest.warns(ReplayWarning, match=f"made with cfjax_numerics '0'; .* runs with {now}"):
        counterfactual(lm, Trace.from_dict(d), edit)


def test_a_trace_token_outside_the_vocabulary_is_refused_on_replay(lm, fact):
    d = json.loads(fact.to_json())
    d["tokens"][3] = 10_000
    with pytest.raises(ValueError, match="the trace's response: token id 10000 at position"):
        counterfactual(lm, Trace.from_dict(d), ChangeSampler(temperature=0.5))


@pytest.mark.parametrize(
    "key, error, message",
    [
        (1.5, TypeError, "key must be an int seed"),
        ("0", TypeError, "key must be an int seed"),
        (True, TypeError, "key must be an int seed"),
        (-1, ValueError, r"seed -1 is outside \[0, 2\*\*32\)"),
        (2**32, ValueError, r"is outside \[0, 2\*\*32\)"),
        ([1, 2, 3], ValueError, "raw key data must be unsigned 32-bit words of shape"),
        (np.asarray([0.5, 1.0]), ValueError, "raw key data must be unsigned 32-bit words"),
    ],
)
def test_bad_keys_name_the_problem(lm, key, error, message):
    with pytest.raises(error, match=message):
        generate(lm, PROMPT, key=key, max_new_tokens=2)


def test_counts_take_numpy_integers_and_refuse_bools(lm, fact):
    t = generate(lm, PROMPT, key=2, max_new_tokens=np.int64(8), stop_tokens=())
    assert t.tokens == fact.tokens and type(t.max_new_tokens) is int
    json.dumps(t.to_dict())
    for bad in (True, 2.0, 0):
        with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
            generate(lm, PROMPT, key=2, max_new_tokens=bad)


def test_system_messages_need_a_chat_template(lm):
    with pytest.raises(ValueError, match="token ids are used as given"):
        generate(lm, PROMPT, key=0, system="Be brief.", max_new_tokens=2)


# --- a bounded adversarial search over the CLI ------------------------------------------------

_FLAGS = st.sampled_from(
    [
        ["--temperature", "nan"], ["--temperature", "1e-40"], ["--temperature", "-0"],
        ["--temperature", "0"], ["--top-k", "0"], ["--top-k", "3"], ["--top-p", "1.5"],
        ["--top-p", "0.3"], ["--seed", "-5"], ["--seed", "4294967296"], ["--seed", "7"],
        ["--max-new-tokens", "0"], ["--max-new-tokens", "3"], ["--mechanism", "gumbel-rank"],
        ["--at", "-1", "--token", "w5"], ["--at", "99", "--token", "w5"], ["--at", "1"],
        ["--replace", "w1"], ["--replace", "w9=>w3"], ["--resume-at", "-2"], ["--interventional"],
        ["--system", "x"], ["--prompt", ""], ["--auto-at", "0"], ["--occurrence", "0"],
    ]
)  # fmt: skip
_MUTATIONS = st.sampled_from(
    [
        ("tokens", [0, -1]), ("noise_index", [0]), ("key", [0]), ("key", [0, -7]),
        ("sampler", {"temperature": 1e-45}), ("sampler", {"top_k": 0}), ("max_new_tokens", -1),
        ("prompt_tokens", [300]), ("logprobs", ["x"]), ("model_id", 5), ("stop_tokens", None),
        ("interventions", "x"), ("posterior", {"key": [0, 0]}),
        *[(None, None)] * 6,  # as often as not, the trace is intact and the flags are tried
    ]
)  # fmt: skip


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(command=st.sampled_from(["generate", "counterfactual"]), flags=st.lists(_FLAGS, max_size=3),
       mutation=_MUTATIONS)  # fmt: skip
def test_random_bad_cli_input_never_ends_in_a_traceback(
    command, flags, mutation, sources_for_search, capsys
):
    from cfjax.cli import main

    src, fact_path, tmp = sources_for_search
    args = [a for f in flags for a in f]
    out = tmp / "out.json"
    out.unlink(missing_ok=True)
    if command == "generate":
        argv = [
            "generate",
            "--model",
            str(src),
            "--prompt",
            "w1 w2",
            "--no-chat",
            "--out",
            str(out),
        ]
        argv += [a for a in args if a not in ("--interventional",)]
    else:
        d = json.loads(fact_path.read_text())
        field, value = mutation
        if field is not None:
            d[field] = value
        trace = tmp / "in.json"
        trace.write_text(json.dumps(d))
        argv = ["counterfactual", str(trace), "--model", str(src), "--out", str(out), *args]
    rc = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if rc == 0:
        result = json.loads(out.read_text())
        assert all(x is None or np.isfinite(x) for x in result["logprobs"])
        assert all(0 <= t < 256 for t in result["tokens"])
    else:
        lines = err.strip().splitlines()
        assert rc == 1 and len(lines) == 1 and lines[0].startswith("cfjax: error:"), err


@pytest.fixture(scope="module")
def sources_for_search(tmp_path_factory):
    """A tiny HF model with a word tokenizer, and a trace it wrote."""
    from conftest import hf_llama
    from test_cli import _word_tokenizer

    from cfjax.cli import main

    root = tmp_path_factory.mktemp("search")
    hf_llama(root / "hf", vocab_size=256)
    _word_tokenizer(root / "hf" / "tokenizer.json")
    fact_path = root / "fact.json"
    rc = main(["generate", "--model", str(root / "hf"), "--prompt", "w1 w2 w3", "--no-chat",
               "--seed", "1", "--max-new-tokens", "6", "--out", str(fact_path)])  # fmt: skip
    assert rc == 0
    return root / "hf", fact_path, root


_MANY_SHAPES = """
import json, os, jax, cfjax
from cfjax.core.model import init_params
from cfjax.runtime import programs
config = cfjax.preset("tiny")
lm = cfjax.LM(config, init_params(config, jax.random.key(0), scale=4.0), model_id="tiny")
run = lambda b: [t.tokens for t in cfjax.generate(lm, [[1, 2, 3]] * b, key=0, max_new_tokens=3, stop_tokens=())]
first = run(1)
os.environ[programs.ENV] = str(programs.maps_in_use() + 700)  # room for ~2 more batch shapes
used, tokens = [], []
for b in [2, 3, 4, 5, 6, 1]:
    tokens.append(run(b))
    used.append(programs.maps_in_use())
print(json.dumps({"first": first, "tokens": tokens, "used": used,
                  "budget": int(os.environ[programs.ENV])}))
"""


@pytest.mark.slow  # ~30 s: seven batch shapes compiled in a child process
def test_a_process_that_compiles_many_batch_shapes_keeps_its_memory_maps_bounded(tmp_path):
    # XLA:CPU maps every compiled program into the process (~300 maps per batch shape here);
    # a fuzz run of ~200 shapes in one process passed vm.max_map_count (65,530) and crashed
    # ("LLVM compilation error: Cannot allocate memory", then a segfault). With a small
    # budget the maps stay near it, and programs compiled again give the same tokens.
    import os
    import subprocess
    import sys

    env = {**os.environ, "CFJAX_COMPILATION_CACHE": str(tmp_path / "xla")}
    env.pop("CFJAX_MAP_BUDGET", None)
    proc = subprocess.run([sys.executable, "-c", _MANY_SHAPES], capture_output=True, text=True,
                          env=env, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    # Each run may compile past the budget before the next run clears (one shape's maps).
    assert max(out["used"]) < out["budget"] + 700, out
    assert min(out["used"][1:]) < out["used"][0], out  # cleared at least once
    assert out["tokens"][-1] == out["first"]  # batch 1 again, compiled again: the same tokens


def test_the_map_budget_setting_is_checked(monkeypatch):
    from cfjax.runtime import programs

    monkeypatch.setenv(programs.ENV, "lots")
    with pytest.raises(ValueError, match="CFJAX_MAP_BUDGET must be a number of memory maps >= 1, got 'lots'"):  # fmt: skip
        programs.budget()
    monkeypatch.setenv(programs.ENV, "123")
    assert programs.budget() == 123
    monkeypatch.delenv(programs.ENV)
    limit = int(open("/proc/sys/vm/max_map_count").read())
    assert programs.budget() == limit * 3 // 4
