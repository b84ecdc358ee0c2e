"""Model registry: ``create_model(name, ...)``, ``list_models()``, ``get_model_entry(name)``."""
from ._registry import ModelEntry, count_parameters, create_model, get_model_entry, list_models, register_model
from .preprocess import build_preprocess
from . import chollet, efficientnet_lite, timm_backbones, torchvision_backbones  # noqa: F401  (register their models)

__all__ = ["ModelEntry", "build_preprocess", "count_parameters", "create_model", "get_model_entry", "list_models", "register_model"]
