"""edgeconv-runtime: load edgeconv bundles and run them without PyTorch.

Depends on numpy, onnxruntime and pillow only; GPU backends import their packages lazily.
"""
from .errors import BackendUnavailable, EdgeconvError
from .preprocess import Preprocess

__version__ = "0.1.0"
__all__ = ["BackendUnavailable", "EdgeconvError", "Preprocess", "__version__"]
