"""The causal layer over the core: traces, interventions, factual and counterfactual runs.

(Named `causal`, not `counterfactual`, so that no module shadows the public function
`cfjax.counterfactual`.)
"""

from cfjax.causal.abduction import Summary, abduct, posterior_noise, summarize
from cfjax.causal.attribution import attribute
from cfjax.causal.conversation import Conversation, converse
from cfjax.causal.coupling import coupled
from cfjax.causal.environment import ReplayWarning
from cfjax.causal.factual import generate
from cfjax.causal.interventions import (
    AutoIntervention,
    ChangeModel,
    ChangeSampler,
    DeleteText,
    EditPrompt,
    InsertText,
    Intervention,
    ReplaceText,
    ReplaceTokens,
    Steer,
)
from cfjax.causal.replay import counterfactual, counterfactuals, interventional, interventionals
from cfjax.causal.trace import Trace
from cfjax.causal.turns import AtTurn

__all__ = [
    "AtTurn",
    "AutoIntervention",
    "Conversation",
    "ChangeModel",
    "ChangeSampler",
    "DeleteText",
    "EditPrompt",
    "InsertText",
    "Intervention",
    "ReplaceText",
    "ReplaceTokens",
    "ReplayWarning",
    "Steer",
    "Summary",
    "Trace",
    "abduct",
    "attribute",
    "converse",
    "counterfactual",
    "coupled",
    "counterfactuals",
    "generate",
    "interventional",
    "interventionals",
    "posterior_noise",
    "summarize",
]
