"""cfjax: counterfactual token generation with a JAX/Flax NNX Llama port.

    lm = cfjax.load("smollm2-135m-instruct")
    trace = cfjax.generate(lm, "Tell me a story about a captain named Ahab.", key=0)
    cf = cfjax.counterfactual(lm, trace, cfjax.ReplaceText("Ahab", "Maeve"))

The functions `generate` and `counterfactual` share their names with the modules that define
them; import module-level helpers as `from cfjax.generate import ...`.
"""

from cfjax.config import LlamaConfig, RopeScaling, preset
from cfjax.counterfactual import counterfactual, counterfactuals, interventional
from cfjax.generate import generate
from cfjax.interventions import (
    AutoIntervention,
    ChangeModel,
    ChangeSampler,
    DeleteText,
    EditPrompt,
    InsertText,
    ReplaceText,
    ReplaceTokens,
)
from cfjax.lm import LM, forward
from cfjax.scm import Sampler
from cfjax.trace import Trace
from cfjax.weights import load

__all__ = [
    "LM",
    "AutoIntervention",
    "ChangeModel",
    "ChangeSampler",
    "DeleteText",
    "EditPrompt",
    "InsertText",
    "LlamaConfig",
    "ReplaceText",
    "ReplaceTokens",
    "RopeScaling",
    "Sampler",
    "Trace",
    "counterfactual",
    "counterfactuals",
    "forward",
    "generate",
    "interventional",
    "load",
    "preset",
]
