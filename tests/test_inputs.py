"""Issue 35: no input gives a silent wrong result, a traceback or work past a limit.

Targeted tests for each class the adversarial run found, then property tests (hypothesis,
derandomised and bounded) over trace JSON fields, every numeric CLI flag of every subcommand
and the numeric arguments of the public functions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cfjax
from cfjax import (
    AutoIntervention,
    ChangeSampler,
    DeleteText,
    EditPrompt,
    InsertText,
    ReplaceText,
    ReplaceTokens,
    Sampler,
    Steer,
    Trace,
)
from cfjax.core.model import init_params

PROMPT = [1, 5, 9, 33]


@pytest.fixture(scope="module")
def lm():
    config = cfjax.preset("tiny")
    return cfjax.LM(config, init_params(config, jax.random.key(0), scale=4.0), model_id="tiny")


@pytest.fixture(scope="module")
def capped(lm):
    """A response cut by its budget (16 tokens, no stop token)."""
    trace = cfjax.generate(
        lm, PROMPT, key=3, sampler=Sampler(1.0), max_new_tokens=16, stop_tokens=()
    )
    assert len(trace.tokens) == trace.max_new_tokens == 16
    return trace


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_null_edit_of_a_capped_responses_last_token_reproduces_it(lm, dtype):
    lm = lm.replace(params=jax.tree.map(lambda x: x.astype(dtype), lm.params), model_id=dtype)
    fact = cfjax.generate(
        lm, PROMPT, key=3, sampler=Sampler(1.0), max_new_tokens=16, stop_tokens=()
    )
    for pos in (0, 15):
        cf = cfjax.counterfactual(lm, fact, ReplaceTokens(pos, [fact.tokens[pos]]))
        assert cf.tokens == fact.tokens and cf.max_new_tokens == 16
        np.testing.assert_array_equal(cf.logprobs, fact.logprobs)
    longer = cfjax.counterfactual(lm, fact, ReplaceTokens(15, [fact.tokens[15], 7], count=1))
    assert longer.tokens == [*fact.tokens, 7]  # a forced span past the budget is kept, no more


def _trace_dict(trace: Trace) -> dict:
    return json.loads(trace.to_json())


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.pop("logprobs"), "missing fields ['logprobs']"),
        (lambda d: d.update(logprobs=[]), "logprobs must be a list of 16 numbers"),
        (lambda d: d["noise_index"].__setitem__(3, 2**31), "noise_index must be 16 integers in [0, 2**31)"),
    ],
)  # fmt: skip
def test_a_trace_missing_or_overflowing_a_field_is_refused_by_name(capped, edit, message):
    d = _trace_dict(capped)
    edit(d)
    with pytest.raises(ValueError, match=re.escape(message)):
        Trace.from_dict(d)


@pytest.mark.parametrize(
    "text, message",
    [
        ("null", "a JSON NoneType"),
        ("[[1, 2]]", "a JSON list"),
        ("[" * 100_000, "nested too deeply"),
        ('{"prompt": ', "trace is not valid JSON"),
        ("{}", "missing fields"),
        (b"\x47\x47\x55\x46\xc3\x28", "not UTF-8 text (byte 4)"),
    ],
)
def test_trace_json_that_is_not_an_object_is_refused(tmp_path, text, message):
    """Each error names the file first; a trace given as JSON text has no file to name."""
    path = tmp_path / "t.json"
    path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: .*{re.escape(message)}"):
        Trace.from_json(path)
    if text == "{}":
        with pytest.raises(ValueError, match=r"^not a cfjax trace: missing fields"):
            Trace.from_json(text)


def test_a_replay_refuses_what_is_not_a_trace_or_an_intervention(lm, capped):
    # A str was taken for a list of interventions ("not an intervention: 'e'"), and None for a
    # trace failed with an AttributeError.
    with pytest.raises(TypeError, match=r"not an intervention: 'edit' \(give an Intervention"):
        cfjax.counterfactual(lm, capped, "edit")
    with pytest.raises(TypeError, match="trace 0: a Trace or a Conversation, not a NoneType"):
        cfjax.counterfactual(lm, None, EditPrompt(tokens=[3]))
    with pytest.raises(TypeError, match="trace 1: a Trace or a Conversation, not a dict"):
        cfjax.counterfactuals(lm, [capped, {}], [EditPrompt(tokens=[3])] * 2)
    with pytest.raises(TypeError, match="trace 0: a Trace or a Conversation, not a str"):
        cfjax.interventional(lm, "trace.json", EditPrompt(tokens=[3]), key=0)


def test_an_out_of_vocabulary_posterior_token_is_refused_on_replay(lm, capped):
    post = cfjax.abduct(lm, PROMPT, capped.tokens[:4], key=0, num_samples=1, stop_tokens=())[0]
    d = _trace_dict(post)
    d["posterior"]["tokens"][1] = 10**6
    with pytest.raises(ValueError, match=r"posterior.tokens: token id 1000000 at position \(1,\)"):
        cfjax.counterfactual(lm, Trace.from_dict(d), ReplaceTokens(0, [3]))


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: ReplaceTokens(2, "123"), TypeError, "not text '123'"),
        (lambda: ReplaceTokens(2, [1.5]), TypeError, "integer token ids"),
        (lambda: ReplaceTokens(-1, [1]), ValueError, "position must be an integer >= 0"),
        (lambda: EditPrompt(prompt="a", tokens=[1, 2]), ValueError, "not both"),
        (lambda: AutoIntervention(1, seed=2**32), ValueError, r"seed must be an integer in \[0, 4294967296\)"),
        (lambda: AutoIntervention(1, seed=2**70), ValueError, "seed must be"),
        (lambda: AutoIntervention(1, seed=-1), ValueError, "seed must be"),
        (lambda: AutoIntervention(1, top_p=math.nan), ValueError, "top_p must be a finite number"),
        (lambda: Steer(0, [1.0], scale=math.nan), ValueError, "scale must be a finite number"),
        (lambda: Steer(0, [1.0], scale=math.inf), ValueError, "scale must be a finite number"),
        (lambda: Steer(0, [1.0], at="prompt"), ValueError, "'response' or 'all'"),
        (lambda: ReplaceText("", "x"), ValueError, "ReplaceText: the text to find is empty"),
        (lambda: DeleteText(""), ValueError, "DeleteText: the text to find is empty"),
        (lambda: InsertText("x", after=""), ValueError, "InsertText: the text to find is empty"),
        (lambda: ReplaceText("a", "b", occurrence=0), ValueError, "ReplaceText occurrence must be an integer >= 1"),
        (lambda: ReplaceText("a", "b", occurrence=1.0), TypeError, "ReplaceText occurrence must be an integer"),
        (lambda: ReplaceText(3, "b"), TypeError, "ReplaceText old must be text, got 3"),
        (lambda: InsertText(None, after="a"), TypeError, "InsertText text must be text, got None"),
        (lambda: ChangeSampler(temperature=-1), ValueError, "temperature must be 0"),
        (lambda: ChangeSampler(temperature="hot"), ValueError, "temperature must be 0"),
        (lambda: ChangeSampler(top_p=2), ValueError, r"top_p must be in \(0, 1\]"),
        (lambda: ChangeSampler(top_k=0.5), ValueError, "top_k must be an integer"),
        (lambda: ChangeSampler(mechanism="softmax"), ValueError, "unknown mechanism 'softmax'"),
        (lambda: ChangeSampler(Sampler(0.3), top_k=3), ValueError, "a whole Sampler or the fields"),
    ],
)  # fmt: skip
def test_interventions_refuse_bad_values_when_made(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_change_sampler_given_a_sampler_replaces_every_field():
    whole = ChangeSampler(Sampler(0.3, top_k=4))
    assert whole == ChangeSampler(temperature=0.3, top_k=4, top_p=None, mechanism="gumbel")
    assert whole.apply(Sampler(2.0, top_p=0.5, mechanism="inverse-cdf")) == Sampler(0.3, top_k=4)
    # Fields are kept as the Sampler normalises them: the record is plain JSON.
    record = ChangeSampler(temperature=1, top_k=np.int64(3)).record()
    assert json.dumps(record) == '{"type": "ChangeSampler", "temperature": 1.0, "top_k": 3}'


def test_library_calls_refuse_bad_numbers_and_empty_batches(lm, capped):
    config = lm.config
    with pytest.raises(TypeError, match="integer token ids"):
        cfjax.generate(lm, [1.9, 2.2], key=0, max_new_tokens=2)
    with pytest.raises(ValueError, match="batch must be an integer >= 1"):
        cfjax.sharding.memory(config, batch=-1, context=8)
    with pytest.raises(ValueError, match="data must be an integer >= 1"):
        cfjax.sharding.memory(config, batch=1, context=8, data=0)
    with pytest.raises(ValueError, match="no rows"):
        cfjax.counterfactuals(lm, [], [])
    with pytest.raises(ValueError, match="no rows"):
        cfjax.interventionals(lm, [], [], keys=0)
    with pytest.raises(ValueError, match="no intervention given"):
        cfjax.counterfactual(lm, capped, [])
    with pytest.raises(ValueError, match="learning_rate must be a finite number > 0"):
        cfjax.finetune(lm, ["a b"], learning_rate=math.nan, steps=1)
    with pytest.raises(ValueError, match=rf"stop_tokens: token id 99999 at position \(1,\) is outside the vocabulary \[0, {config.vocab_size}\)"):  # fmt: skip
        cfjax.generate(lm, PROMPT, key=0, max_new_tokens=2, stop_tokens=[3, 99_999])
    with pytest.raises(TypeError, match="stop_tokens must be a flat sequence of integer token ids"):
        cfjax.generate(lm, PROMPT, key=0, max_new_tokens=2, stop_tokens=[2.5])
    for chunk, message in [(0, "chunk must be an integer >= 1, got 0"), (-3, "got -3"), (2.5, "got 2.5"),
                           (10**6, f"chunk 1000000 is above the model's max_seq_len {config.max_seq_len}")]:  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(message)):
            cfjax.generate(lm, PROMPT, key=0, max_new_tokens=2, chunk=chunk)


def _wrong_kinds(lm, trace):
    """(call, error, message) for arguments of the wrong kind, each found failing inside with
    Python's own message ("'float' object is not iterable", an AttributeError, a template's
    concatenation error) or taken silently (a truthy "maybe", a NaN steering vector)."""
    from cfjax.causal.attribution import Auto

    gen = lambda **kw: cfjax.generate(lm, **{"prompt": PROMPT, "key": 0, "max_new_tokens": 2, **kw})  # noqa: E731
    nan_vector = np.full(lm.config.dim, np.nan, np.float32)
    return [
        (lambda: gen(prompt=None), TypeError, "prompt must be text, a sequence of token ids, or a list of either, got None"),
        (lambda: gen(prompt=5), TypeError, "prompt must be text, a sequence of token ids, or a list of either, got 5"),
        (lambda: gen(sampler=0.5), ValueError, "sampler: give one Sampler or one per row (1), got 0.5"),
        (lambda: gen(prompt=[PROMPT] * 2, key=[0, 1, 2]), ValueError, "key: got 3 keys for a batch of 2 prompts"),
        (lambda: gen(chat="maybe"), TypeError, "chat must be True or False, got 'maybe'"),
        (lambda: gen(system=5), TypeError, "system must be a text or None, got 5"),
        (lambda: gen(stream=5), TypeError, "stream must be a function of the new text, got 5"),
        (lambda: gen(draft="int8"), TypeError, "draft must be a loaded model (cfjax.load or cfjax.quantize), not a str"),
        (lambda: cfjax.coupled([lm, "x"], PROMPT, key=0), TypeError, "coupled: model 1 is a str, not a loaded model (cfjax.load)"),
        (lambda: cfjax.converse(lm, [None], key=0), ValueError, "messages of conversation 0: give one non-empty text per user turn"),
        (lambda: cfjax.summarize(["a"]), TypeError, "summarize takes Traces, got a str"),
        (lambda: cfjax.summarize([trace], contains=5), TypeError, "contains must be a text, got 5"),
        (lambda: cfjax.attribute(lm, trace, replace=5), TypeError, "replace must be None, a text, a mapping of texts or Auto(), got 5"),
        (lambda: cfjax.attribute(lm, trace, replace={"a": 1}), TypeError, "replace must be None, a text, a mapping of texts or Auto(), got {'a': 1}"),
        (lambda: cfjax.attribute(lm, trace, contains=5), TypeError, "contains must be a text, got 5"),
        (lambda: cfjax.attribute(lm, [trace]), TypeError, "attribute takes one answer's Trace, not a list"),
        (lambda: Auto(top_p=2), ValueError, "Auto top_p must be in (0, 1], got 2"),
        (lambda: cfjax.counterfactual(lm, trace, Steer(0, nan_vector)), ValueError, "Steer: the vector holds nan at index 0 (it must be finite)"),
        (lambda: cfjax.counterfactual(lm, dataclasses.replace(trace, stop_tokens=(2, 99_999)), ReplaceTokens(2, [7])),
         ValueError, f"the trace's stop_tokens: token id 99999 at position (1,) is outside the vocabulary [0, {lm.config.vocab_size})"),
        (lambda: cfjax.load(""), ValueError, "model: give a model name, a folder or a .gguf file, got ''"),
        (lambda: cfjax.load(None), ValueError, "model: give a model name, a folder or a .gguf file, got None"),
        (lambda: cfjax.load("tiny", mesh="x"), ValueError, "mesh must be a Mesh with axes ('data', 'model') (cfjax.sharding.mesh), got a str"),
        (lambda: lm.replace(pad_batch="no"), TypeError, "pad_batch must be True or False, got 'no'"),
    ]  # fmt: skip


def test_public_functions_refuse_arguments_of_the_wrong_kind_by_name(lm, capped):
    for call, error, message in _wrong_kinds(lm, capped):
        with pytest.raises(error, match=f"^{re.escape(message)}$"):
            call()


# --- property tests ------------------------------------------------------------------------------

_JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
    st.text(max_size=5), st.lists(st.integers(-3, 2**33), max_size=4),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)  # fmt: skip
_FIELDS = ["model_id", "prompt_tokens", "tokens", "key", "sampler", "max_new_tokens",
           "noise_index", "logprobs", "stop_tokens", "chat", "prompt", "interventions",
           "alignment", "posterior", "text"]  # fmt: skip


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(
    changes=st.lists(
        st.tuples(st.sampled_from(_FIELDS), st.one_of(st.just("<drop>"), _JUNK)), max_size=3
    )
)
def test_any_trace_json_is_read_or_refused_with_a_named_error(capped, changes):
    d = _trace_dict(capped)
    for field, value in changes:
        if value == "<drop>":
            d.pop(field, None)
        else:
            d[field] = value
    try:
        trace = Trace.from_dict(d)
    except (ValueError, TypeError) as e:
        assert str(e) and "Traceback" not in str(e)
        return
    assert trace.tokens == capped.tokens or "tokens" in dict(changes)


def _actions() -> list[tuple[tuple[str, ...], argparse.Action]]:
    """(subcommand path, action) of every argument of every subcommand, from the parser."""
    from cfjax.cli_parser import parser

    found = []

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, [*path, name])
            else:
                found.append((tuple(path), action))

    walk(parser("cfjax"), [])
    return found


def _numeric_flags() -> list[tuple[tuple[str, ...], str, object]]:
    """(subcommand path, flag, type) of every option parsed by a type."""
    return [(p, a.option_strings[0], a.type) for p, a in _actions() if a.option_strings and a.type is not None]  # fmt: skip


def test_every_argument_has_help_text():
    """`--help` explains every flag, with its default (ArgumentDefaultsHelpFormatter)."""
    bare = [(p, a.dest) for p, a in _actions() if not a.help]
    assert bare == []


NUMERIC_TYPES = {"seed", "seeds", "positive", "natural", "temperature", "probability", "port"}


def test_every_numeric_flag_is_checked_by_an_argument_type():
    """No option parses a number with bare int/float: each uses a checking type."""
    flags = _numeric_flags()
    assert len(flags) > 30
    bare = [(p, f) for p, f, t in flags if t in (int, float)]
    assert bare == []
    assert {t.__name__ for _, _, t in flags} - {"Path", "text", "replacement"} <= NUMERIC_TYPES


_BAD = {
    "seed": ["-1", "4294967296", "1.5", "x", "nan"],
    "seeds": ["", "-1", "0,x", "4294967296"],
    "positive": ["0", "-3", "2.5", "inf", "many"],
    "natural": ["-1", "1.5", "x"],
    "temperature": ["-1", "nan", "inf", "-inf", "x"],
    "probability": ["0", "1.5", "nan", "-0.1"],
    "port": ["0", "65536", "x"],
}
_REQUIRED = {
    ("generate",): ["--prompt", "hi"],
    ("abduct",): ["--prompt", "hi", "--response", "ab"],
    ("experiment", "stability"): ["--out", "{out}"],
    ("experiment", "census"): ["--out", "{out}"],
    ("experiment", "coupled"): ["--models", "a", "b", "--out", "{out}"],
}


@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(data=st.data())
def test_any_bad_numeric_flag_is_one_line_before_any_load_or_write(tmp_path, capsys, data):
    from cfjax.cli import main

    path, flag, kind = data.draw(
        st.sampled_from([f for f in _numeric_flags() if f[2].__name__ in _BAD])
    )
    value = data.draw(st.sampled_from(_BAD[kind.__name__]))
    out = tmp_path / f"out-{data.draw(st.integers(0, 10**9))}"
    extra = [a.format(out=out) for a in _REQUIRED.get(path, [])]
    positional = ["trace.json"] if path == ("counterfactual",) else []
    # A model that does not exist: a check made after the load would report it instead.
    model = [] if path in ((), ("models",), ("convert",)) else ["--model", "/no/such/model"]
    if path == ("counterfactual",):
        model = []
    argv = [*path, *positional, *model, *extra, f"{flag}={value}"]
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and err[0].startswith("cfjax: error:"), (argv, err)
    assert f"argument {flag}" in err[0], (argv, err)
    assert not out.exists()


def test_core_sample_checks_concrete_values_and_checkify_reports_traced_ones(lm):
    from jax.experimental import checkify

    from cfjax.core import decode

    V = lm.config.vocab_size

    def sample(prompt, prompt_length=3, forced=None):
        return decode.sample(lm.config, lm.params, jnp.asarray(prompt, jnp.int32), prompt_length,
                             jax.random.key(0), Sampler(1.0), max_new_tokens=4, forced=forced)  # fmt: skip

    bad = [
        (dict(prompt=[1, 2, V + 5, 0]), rf"prompt: token id {V + 5} at position \(2,\)"),
        (dict(prompt=[1, 2, 3, 0], prompt_length=0), r"prompt_length 0 is outside \[1, 4\]"),
        (dict(prompt=[1, 2, 3, 0], prompt_length=jnp.int32(5)), r"prompt_length 5 is outside"),
        (dict(prompt=[1, 2, 3, 0], forced=jnp.array([-1, V, -1, -1])), f"token id {V} at step 1"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            sample(**kwargs)
    # Traced: checkify names the out-of-vocabulary id instead of a silent garbage token.
    traced = checkify.checkify(jax.jit(lambda p, f: sample(p, forced=f).tokens), errors=checkify.index_checks)  # fmt: skip
    err, _ = traced(jnp.array([1, 2, V + 5, 0], jnp.int32), jnp.full((4,), -1, jnp.int32))
    assert f"index {V + 5} is out of bounds" in err.get()
    err, _ = traced(jnp.array([1, 2, 3, 0], jnp.int32), jnp.array([-1, V, -1, -1], jnp.int32))
    assert f"index {V} is out of bounds" in err.get()
    err, tokens = traced(jnp.array([1, 2, 3, 0], jnp.int32), jnp.full((4,), -1, jnp.int32))
    assert err.get() is None and tokens.tolist() == sample([1, 2, 3, 0]).tokens.tolist()


# --- studies: files named by line, strict JSON ---------------------------------------------------


def test_a_corrupted_row_is_named_by_file_and_line(tmp_path):
    from cfjax.experiments import census, folder

    (tmp_path / "rows.jsonl").write_text('{"a": 1}\n{"a": \n{"a": 3}\n')
    with pytest.raises(ValueError, match=r"rows.jsonl:2: not a JSON row"):
        folder.open_study(tmp_path, {"x": 1})
    with pytest.raises(ValueError, match=r"rows.jsonl:2: not a JSON row"):
        census.read_rows(tmp_path)
    (tmp_path / "rows.jsonl").write_text('{"a": 1}\n[1]\n')
    with pytest.raises(ValueError, match=r"rows.jsonl:2: a row is a JSON object"):
        census.read_rows(tmp_path)


def test_census_report_names_a_row_without_an_intervention(tmp_path, capsys):
    from cfjax.cli import main

    (tmp_path / "rows.jsonl").write_text('{"intervened_attribute": "Sex", "effect": "total"}\n')
    assert main(["experiment", "census-report", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "row 1 is not a census row: no intervention" in err[0]


def test_study_json_is_strict(tmp_path):
    from cfjax.experiments import folder

    value = {"mean": math.nan, "n": [1.0, math.inf, -math.inf], "ok": 0.5}
    text = folder.to_json(value)
    assert json.loads(text) == {"mean": None, "n": [1.0, None, None], "ok": 0.5}
    assert "NaN" not in text and "Infinity" not in text
    folder.open_study(tmp_path, {"x": 1})
    folder.process(tmp_path, [0], lambda _u, _tick: [value], items=lambda u: [(u,)], desc="t", unit="u", progress=False)  # fmt: skip
    assert json.loads((tmp_path / "rows.jsonl").read_text()) == json.loads(text)


@pytest.fixture(scope="module")
def gguf_parts(tmp_path_factory):
    from conftest import hf_llama
    from test_weights import HEADS, KV_HEADS, state

    root = tmp_path_factory.mktemp("gguf")
    ref = hf_llama(root / "hf", num_attention_heads=HEADS, num_key_value_heads=KV_HEADS)
    return state(ref), ref.config.to_dict() | {"rope_theta": 10000.0}, root


@pytest.mark.parametrize(
    "key, value, kind, message",
    [
        ("llama.attention.head_count", 0, "uint32", "n_heads must be an integer >= 1, got 0"),
        ("llama.block_count", 2.0, "float32", "n_layers must be an integer >= 1, got 2.0"),
        ("llama.context_length", 0, "uint32", "max_seq_len must be an integer >= 1, got 0"),
    ],
)
def test_a_gguf_with_bad_sizes_is_named_at_load(gguf_parts, key, value, kind, message):
    from test_weights import write_gguf

    sd, cfg, root = gguf_parts
    file = root / f"{key}-{value}.gguf"

    def bad(writer):
        import gguf

        writer.add_key_value(key, value, gguf.GGUFValueType[kind.upper()])

    write_gguf(file, sd, cfg, metadata=bad)
    with pytest.raises(ValueError, match=re.escape(f"config {file}: {message}")):
        cfjax.load(file)


def test_overlapping_edits_are_judged_the_same_in_any_order(lm, capped):
    t = capped.tokens
    insert, replace = ReplaceTokens(5, [7], count=0), ReplaceTokens(5, [t[5]])
    a = cfjax.counterfactual(lm, capped, [insert, replace])
    b = cfjax.counterfactual(lm, capped, [replace, insert])
    assert a.tokens == b.tokens and a.tokens[:7] == [*t[:5], 7, t[5]]
    for pair in ([ReplaceTokens(4, [1, 2]), ReplaceTokens(5, [3])], [insert, ReplaceTokens(5, [9], count=0)]):  # fmt: skip
        for edits in (pair, pair[::-1]):
            with pytest.raises(ValueError, match="two response edits overlap"):
                cfjax.counterfactual(lm, capped, edits)


def _public_calls(lm, trace):
    """(name, call taking one value) for the numeric arguments of the public functions."""
    from cfjax import ReplaceText, sharding

    gen = lambda **kw: cfjax.generate(lm, PROMPT, key=0, **{"max_new_tokens": 2, **kw})  # noqa: E731
    cf = lambda iv=None, **kw: cfjax.counterfactual(lm, trace, iv or ReplaceTokens(2, [7]), **kw)  # noqa: E731
    return {
        "generate max_new_tokens": ("count", lambda v: gen(max_new_tokens=v)),
        "generate key": ("seed", lambda v: gen(key=v)),
        "generate chunk": (
            "count",
            lambda v: gen(chunk=v),
        ),  # 0 and -3 were taken (-3 failing in zip)
        "counterfactual chunk": ("count", lambda v: cf(chunk=v)),
        "Sampler temperature": ("temperature", lambda v: Sampler(v)),
        "Sampler top_k": ("count", lambda v: Sampler(1.0, top_k=v)),
        "Sampler top_p": ("probability", lambda v: Sampler(1.0, top_p=v)),
        "ReplaceTokens position": ("position", lambda v: cf(ReplaceTokens(v, [7]))),
        "ReplaceTokens count": ("position", lambda v: cf(ReplaceTokens(2, [7], count=v))),
        "ReplaceText occurrence": ("count", lambda v: cf(ReplaceText("x", "y", occurrence=v))),
        "AutoIntervention position": ("position", lambda v: cf(AutoIntervention(v))),
        "AutoIntervention seed": ("seed", lambda v: AutoIntervention(1, seed=v)),
        "Steer scale": ("real", lambda v: Steer(0, [1.0], scale=v)),
        "counterfactual resume_at": ("position", lambda v: cf(resume_at=v)),
        "counterfactual max_new_tokens": ("cap", lambda v: cf(max_new_tokens=v)),  # a cap: any size
        "abduct num_samples": (
            "count",
            lambda v: cfjax.abduct(lm, PROMPT, [3, 4], key=0, num_samples=v),
        ),  # fmt: skip
        "memory batch": ("cap", lambda v: sharding.memory(lm.config, batch=v, context=8)),
        "memory model": (
            "count",
            lambda v: sharding.memory(lm.config, batch=1, context=8, model=v),
        ),
    }


_BAD_VALUES = {
    "count": [0, -1, 2.5, math.nan, math.inf, True, "3", 2**70],
    "cap": [0, -1, 2.5, math.nan, math.inf, True, "3"],
    "seed": [-1, 2**32, 2**70, 1.5, math.nan, True],
    "temperature": [-1.0, math.nan, math.inf, -math.inf, "1"],
    "probability": [0.0, 1.5, -0.1, math.nan, math.inf],
    "position": [-1, 10**9, 2.5, math.nan, True, 2**70],
    "real": [math.nan, math.inf, -math.inf, "1", None],
}


@settings(max_examples=80, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(data=st.data())
def test_public_functions_refuse_bad_numbers_by_name(lm, capped, data):
    calls = _public_calls(lm, capped)
    name = data.draw(st.sampled_from(sorted(calls)))
    kind, call = calls[name]
    value = data.draw(st.sampled_from(_BAD_VALUES[kind]))
    with pytest.raises((ValueError, TypeError), match="."):  # a message, never an empty one
        call(value)


def test_progress_moves_within_a_unit(tmp_path, monkeypatch):
    """A unit's `tick(fraction)` moves the bar by that share of the unit's items, and the unit
    ends at its full size (ticks past 1 or backwards are clamped)."""
    import tqdm

    from cfjax.experiments import folder

    positions = []

    class Bar:
        def __init__(self, total, **kw):
            self.n, self.total = 0.0, total

        def update(self, k):
            self.n += k
            positions.append(round(self.n, 6))

        def close(self):
            pass

    monkeypatch.setattr(tqdm, "tqdm", Bar)

    def work(u, tick):
        tick(1 / 3)
        tick(2 / 3)
        tick(5.0)  # clamped to the unit's end
        return [{"unit": u}]

    folder.open_study(tmp_path, {"x": 1})
    folder.process(tmp_path, ["a", "b"], work, items=lambda u: [(u,)], size=lambda u: 3, desc="t", unit="u")  # fmt: skip
    assert positions == [1, 2, 3, 3, 4, 5, 6, 6]


def test_a_unit_without_rows_is_finished_and_not_redone(tmp_path):
    from cfjax.experiments import folder

    folder.open_study(tmp_path, {"x": 1})
    work = lambda u, _tick: [] if u == "empty" else [{"unit": u}]  # noqa: E731
    folder.process(tmp_path, ["a", "empty"], work, items=lambda u: [(u, 0)], desc="t", unit="u", progress=False)  # fmt: skip
    assert (tmp_path / "rows.jsonl").read_text().count("\n") == 1
    with open(tmp_path / "finished.jsonl", "a") as f:
        f.write('[["cut", 0')  # a line cut by a crash
    assert folder.finished(tmp_path) == {("a", 0), ("empty", 0)}
