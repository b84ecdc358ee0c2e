"""Model registry: ``create_model(name, ...)``, ``list_models()``, ``get_model_entry(name)``."""
from ._registry import ModelEntry, count_parameters, create_model, get_model_entry, list_models, register_model
from . import chollet  # noqa: F401  (registers the book's convnets)

__all__ = ["ModelEntry", "count_parameters", "create_model", "get_model_entry", "list_models", "register_model"]
