"""Conversations (issue 34): turns with their own noise, counterfactuals addressed to a turn.

References: `generate` with the turn's key (a one-turn conversation is its trace), the chat
template rendered by hand over the earlier messages, and each step's noise drawn directly as
`gumbel(fold_in(fold_in(key, turn), step))` against a cache-less forward (the mechanism check
of `test_counterfactual`). Tiny model, the trained sentencepiece tokenizer with its Llama 2
chat template, 12 tokens a turn.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_counterfactual import _train_spm, mechanism_violations

import cfjax
from cfjax import AtTurn, ChangeSampler, Conversation, EditPrompt, ReplaceTokens, Sampler
from cfjax.causal.conversation import load
from cfjax.core.model import init_params

SAMPLER = Sampler(temperature=1.0, top_k=64, top_p=0.9)
SCRIPT = ["the captain sailed", "a calm sea with her crew", "the dog named Alice"]
STEPS = 12


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return _train_spm(tmp_path_factory.mktemp("spm"), seed=0)


def _lm(tok, dtype):
    config = cfjax.preset("tiny")
    params = init_params(config, jax.random.key(0), scale=4.0)
    params = jax.tree.map(lambda x: x.astype(dtype), params)
    return cfjax.LM(config, params, model_id=f"tiny-{jnp.dtype(dtype).name}").replace(tokenizer=tok)  # fmt: skip


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def lm(tok, request):
    return _lm(tok, request.param)


@pytest.fixture(scope="module")
def conv(lm):
    c = cfjax.converse(lm, SCRIPT, key=3, sampler=SAMPLER, max_new_tokens=STEPS)
    assert [len(t.tokens) for t in c.turns] == [STEPS] * 3, "fixture: a turn stopped early"
    return c


def follows_noise(lm, trace, key) -> None:
    """Every step of `trace` is the mechanism's choice with the noise of `key`: against the
    cache-less forward in float32 (whose bfloat16 rounding differs from the cached path's), and
    in both dtypes as `generate` of the same prompt tokens with that key."""
    if lm.model_id.endswith("float32"):
        assert not mechanism_violations(lm, trace, 0, lambda j: j, key=key)
    again = cfjax.generate(lm, trace.prompt_tokens, key=key, sampler=trace.sampler,
                           max_new_tokens=trace.max_new_tokens)  # fmt: skip
    assert again.tokens == trace.tokens


def same_turn(a, b):
    assert a.to_dict() == b.to_dict()  # tokens, log-prob values, prompt, key, noise, records


def test_one_turn_is_the_trace_of_generate_with_the_turn_key(lm):
    one = cfjax.converse(lm, SCRIPT[:1], key=3, sampler=SAMPLER, max_new_tokens=STEPS)
    key = jax.random.fold_in(jax.random.key(3), 0)
    trace = cfjax.generate(lm, SCRIPT[0], key=key, sampler=SAMPLER, max_new_tokens=STEPS)
    same_turn(one.turns[0], trace)
    d = one.to_dict()
    assert {k: d[k] for k in trace.to_dict()} == trace.to_dict()  # the trace's fields, plus...
    assert set(d) - set(trace.to_dict()) == {"turns", "conversation_key", "conversation_interventions"}  # fmt: skip


def test_turns_render_the_chat_so_far_and_use_their_own_noise(lm, tok, conv):
    for k, t in enumerate(conv.turns):
        messages = []
        for j in range(k):
            messages += [{"role": "user", "content": SCRIPT[j]},
                         {"role": "assistant", "content": conv.turns[j].text}]  # fmt: skip
        assert t.prompt_tokens == tok.chat(messages + [{"role": "user", "content": SCRIPT[k]}])
        key = jax.random.fold_in(jax.random.key(3), k)
        np.testing.assert_array_equal(jax.random.key_data(t.key), jax.random.key_data(key))
        follows_noise(lm, t, key)
    assert [m["role"] for m in conv.messages] == ["user", "assistant"] * 3


def test_null_edit_reproduces_every_turn_exactly(lm, conv):
    token = conv.turns[1].tokens[4]
    null = cfjax.counterfactual(lm, conv, AtTurn(1, ReplaceTokens(4, [token])))
    assert null.turns[0] is conv.turns[0]  # before the edit: kept as it was
    for a, b in zip(null.turns[1:], conv.turns[1:], strict=True):
        assert a.tokens == b.tokens and a.text == b.text and a.prompt_tokens == b.prompt_tokens
        assert np.array_equal(np.float32(a.logprobs), np.float32(b.logprobs))  # bit for bit
    assert null.interventions == [AtTurn(1, ReplaceTokens(4, [token])).record()]


def test_edit_at_turn_2_keeps_the_earlier_turns(lm, conv):
    cf = cfjax.counterfactual(lm, conv, AtTurn(2, EditPrompt(prompt="a small dog named Bob")))
    assert cf.turns[:2] == conv.turns[:2]
    assert cf.turns[2].prompt == "a small dog named Bob" and cf.turns[2].history == conv.turns[2].history  # fmt: skip
    assert cf.turns[2].tokens != conv.turns[2].tokens
    assert cf.user_messages == [*SCRIPT[:2], "a small dog named Bob"]


def test_later_turns_replay_with_their_factual_noise(lm, tok, conv):
    """After an edit of the first message, turn 1 and 2 answer the script after the new history,
    each step with gumbel(fold_in(fold_in(key, turn), step)) (checked against the forward)."""
    cf = cfjax.counterfactual(lm, conv, AtTurn(0, EditPrompt(prompt="the brave sailor")))
    assert cf.turns[0].tokens != conv.turns[0].tokens
    for k in (1, 2):
        t = cf.turns[k]
        assert t.prompt == SCRIPT[k] and t.history[-1]["content"] == cf.turns[k - 1].text
        assert t.prompt_tokens == tok.chat([*t.history, {"role": "user", "content": SCRIPT[k]}])
        assert t.noise_index == list(range(len(t.tokens)))
        key = jax.random.fold_in(jax.random.key(3), k)
        follows_noise(lm, t, key)
    # The factual noise, not fresh noise: the interventional turns follow fresh keys instead.
    iv = cfjax.interventional(lm, conv, AtTurn(0, EditPrompt(prompt="the brave sailor")), key=5)
    assert iv.turns[1].tokens != cf.turns[1].tokens
    fresh = jax.random.fold_in(jax.random.key(5), 1)
    np.testing.assert_array_equal(jax.random.key_data(iv.turns[1].key), jax.random.key_data(fresh))  # fmt: skip
    follows_noise(lm, iv.turns[1], fresh)


def test_a_sampler_change_holds_from_its_turn_on(lm, conv):
    cf = cfjax.counterfactual(lm, conv, AtTurn(1, ChangeSampler(temperature=0.5)))
    assert cf.turns[0] is conv.turns[0]
    assert [t.sampler.temperature for t in cf.turns] == [1.0, 0.5, 0.5]


def test_batched_equals_one_by_one(lm, conv):
    ivs = [
        AtTurn(0, EditPrompt(prompt="the brave sailor")),
        AtTurn(1, ReplaceTokens(3, [7])),
        [AtTurn(1, ChangeSampler(temperature=0.7)), AtTurn(2, EditPrompt(prompt="a storm"))],
    ]
    batch = cfjax.counterfactuals(lm, conv, ivs)
    for iv, row in zip(ivs, batch, strict=True):
        alone = cfjax.counterfactual(lm, conv, iv)
        for a, b in zip(row.turns, alone.turns, strict=True):
            same_turn(a, b)
    # Conversations of different lengths as one batch, each as if alone.
    scripts = [SCRIPT[:2], ["a quiet harbor", "the old map", "gold", "the lighthouse"]]
    both = cfjax.converse(lm, scripts, key=jax.random.split(jax.random.key(1), 2), sampler=SAMPLER, max_new_tokens=STEPS)  # fmt: skip
    for b, script in enumerate(scripts):
        alone = cfjax.converse(lm, script, key=both[b].key, sampler=SAMPLER, max_new_tokens=STEPS)
        assert len(alone.turns) == len(both[b].turns) == len(script)
        for x, y in zip(both[b].turns, alone.turns, strict=True):
            same_turn(x, y)


def test_json_round_trip_and_checks(lm, conv, tmp_path):
    cf = cfjax.counterfactual(lm, conv, AtTurn(0, EditPrompt(prompt="the brave sailor")))
    path = tmp_path / "conv.json"
    cf.to_json(path)
    back = load(path)
    assert isinstance(back, Conversation) and back.to_dict() == cf.to_dict()
    assert cfjax.Trace.from_json(path).to_dict() == cf.turns[-1].to_dict()  # a reader of traces
    # The round-tripped conversation replays as the original (null edit).
    token = back.turns[2].tokens[0]
    again = cfjax.counterfactual(lm, back, AtTurn(2, ReplaceTokens(0, [token])))
    assert again.turns[2].tokens == cf.turns[2].tokens
    d = cf.to_dict()
    d["turns"][1]["history"][1]["content"] = "not what turn 0 said"
    with pytest.raises(ValueError, match="turn 1: its history is not the turns before it"):
        Conversation.from_dict(d)


def test_bad_interventions_are_refused(lm, conv):
    with pytest.raises(ValueError, match=r"wrap it as AtTurn\(turn, EditPrompt"):
        cfjax.counterfactual(lm, conv, EditPrompt(prompt="x"))
    with pytest.raises(ValueError, match="turns 0 to 2"):
        cfjax.counterfactual(lm, conv, AtTurn(3, EditPrompt(prompt="x")))
    with pytest.raises(ValueError, match="address EditPrompt.system=.... to turn 0"):
        AtTurn(1, EditPrompt(system="be brief"))
    with pytest.raises(ValueError, match="single answer"):
        cfjax.counterfactual(lm, conv.turns[0], AtTurn(0, EditPrompt(prompt="x")))
    with pytest.raises(ValueError, match="resume_at"):
        cfjax.counterfactual(lm, conv, AtTurn(0, ReplaceTokens(0, [5])), resume_at=2)
