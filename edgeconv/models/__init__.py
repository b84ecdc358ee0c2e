"""Model registry: ``create_model(name, ...)``, ``list_models()``, ``get_model_entry(name)``."""
from ._registry import ModelEntry, count_parameters, create_model, get_model_entry, list_models, register_model
from . import chollet, efficientnet_lite, torchvision_backbones  # noqa: F401  (register their models)

__all__ = ["ModelEntry", "count_parameters", "create_model", "get_model_entry", "list_models", "register_model"]
