"""Plain nn.Modules: no distribution, precision policy, checkpoint format or CLI in here."""

from vlkit.models.classifier import ViTClassifier
from vlkit.models.clip import CLIPModel
from vlkit.models.factory import MODEL_CLASSES, create_model, model_config_dict, resolve_model_config
from vlkit.models.llama import LlamaDecoder, LlamaForCausalLM
from vlkit.models.neva import NevaModel
from vlkit.models.text import TextTransformer
from vlkit.models.vit import VisionTransformer

__all__ = [
    "MODEL_CLASSES",
    "CLIPModel",
    "LlamaDecoder",
    "LlamaForCausalLM",
    "NevaModel",
    "TextTransformer",
    "ViTClassifier",
    "VisionTransformer",
    "create_model",
    "model_config_dict",
    "resolve_model_config",
]
