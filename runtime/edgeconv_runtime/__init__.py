"""edgeconv-runtime: load edgeconv bundles and run them without PyTorch.

Depends on numpy, onnxruntime and pillow only; GPU backends import their packages lazily.
"""
from .errors import BackendUnavailable, EdgeconvError
from .preprocess import Preprocess

__version__ = "0.1.0"
__all__ = ["BackendUnavailable", "EdgeconvError", "Model", "Prediction", "Preprocess", "available_backends", "__version__"]


def __getattr__(name):  # keep `import edgeconv_runtime` cheap: onnxruntime loads on first use
    if name in ("Model", "Prediction"):
        from . import model

        return getattr(model, name)
    if name == "available_backends":
        from .backends import available_backends

        return available_backends
    raise AttributeError(name)
