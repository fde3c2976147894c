"""Model zoo: BackdoorBench's names and timm models behind one ``create_model``."""

from fire_adapters.models.preact_resnet import PreActBlock, PreActResNet
from fire_adapters.models.zoo import MODELS, TIMM_PREFIX, create_model, list_models, load_model_state

__all__ = [
    "MODELS",
    "TIMM_PREFIX",
    "PreActBlock",
    "PreActResNet",
    "create_model",
    "list_models",
    "load_model_state",
]
