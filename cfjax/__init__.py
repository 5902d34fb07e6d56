"""cfjax: counterfactual token generation with a JAX/Flax NNX Llama port.

    lm = cfjax.load("smollm2-135m-instruct")
    trace = cfjax.generate(lm, "Tell me a story about a captain named Ahab.", key=0)
    cf = cfjax.counterfactual(lm, trace, cfjax.ReplaceText("Ahab", "Maeve"))
    posts = cfjax.abduct(lm, prompt, "a text the model did not write", key=0, num_samples=64)
    chat = cfjax.converse(lm, ["Name a colour.", "Why that one?"], key=0)
    cf = cfjax.counterfactual(lm, chat, cfjax.AtTurn(0, cfjax.EditPrompt(prompt="Name a fruit.")))

Layers, each importing only those below it: `cfjax.core` (config, model, cache, the sampling
SCM, the decode kernel and `cfjax.core.sample`: pure, no host state), `cfjax.runtime` (the
`LM` handle, cache stores, request helpers, the chunk driver), `cfjax.tokenizer`,
`cfjax.weights` (load, convert), `cfjax.causal` (traces, interventions, generate /
counterfactual / coupled), `cfjax.models` (steering vectors, LoRA fine-tunes), then the
experiments and the CLI on top.
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

from cfjax.compilation import use_compilation_cache

use_compilation_cache()  # before any program is compiled: JAX reads the setting once

from cfjax import core, sharding
from cfjax.causal import (
    AtTurn,
    AutoIntervention,
    ChangeModel,
    ChangeSampler,
    Conversation,
    DeleteText,
    EditPrompt,
    InsertText,
    ReplaceText,
    ReplaceTokens,
    ReplayWarning,
    Steer,
    Summary,
    Trace,
    abduct,
    attribute,
    converse,
    counterfactual,
    counterfactuals,
    coupled,
    generate,
    interventional,
    interventionals,
    summarize,
)
from cfjax.core import LlamaConfig, RopeScaling, Sampler, preset
from cfjax.models import FineTune, finetune, steering_vector
from cfjax.runtime import LM, forward, quantize
from cfjax.weights import convert, list_models, load, save

__all__ = [
    "LM",
    "AtTurn",
    "AutoIntervention",
    "ChangeModel",
    "ChangeSampler",
    "Conversation",
    "DeleteText",
    "EditPrompt",
    "InsertText",
    "LlamaConfig",
    "ReplaceText",
    "FineTune",
    "ReplaceTokens",
    "ReplayWarning",
    "RopeScaling",
    "Sampler",
    "Steer",
    "Summary",
    "Trace",
    "abduct",
    "attribute",
    "converse",
    "convert",
    "core",
    "counterfactual",
    "counterfactuals",
    "coupled",
    "finetune",
    "forward",
    "generate",
    "interventional",
    "interventionals",
    "list_models",
    "load",
    "preset",
    "quantize",
    "save",
    "sharding",
    "steering_vector",
    "summarize",
]

try:
    __version__ = _version("cfjax")
except PackageNotFoundError:  # a source tree that was not installed
    __version__ = "unknown"
