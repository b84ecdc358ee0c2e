"""edgeconv: train small image classifiers, export them, run them on a device.

Importing the package is cheap: torch, onnx and friends load only in the modules that use them.
"""
from edgeconv_runtime.errors import EdgeconvError

__version__ = "0.1.0"
__all__ = ["EdgeconvError", "__version__"]
