"""Interventions on the model: activation steering vectors and LoRA fine-tunes (quantized
variants are `cfjax.runtime.lm.quantize`). Each gives params for the same decode path
(`ChangeModel`, `Steer`, or a model of its own).
"""

from cfjax.models.lora import FineTune, finetune
from cfjax.models.steering import steering_vector

__all__ = ["FineTune", "finetune", "steering_vector"]
