"""edgeconv-export: checkpoints, ONNX files and PyTorch modules to self-describing ONNX / TensorRT bundles."""

__version__ = "0.1.0"

__all__ = ["ImportRequest", "export_module", "import_onnx"]


def __getattr__(name: str):
    """``edgeconv_export.export_module`` / ``import_onnx`` / ``ImportRequest``, imported on first use (they pull in onnx)."""
    if name == "export_module":
        from .api import export_module

        return export_module
    if name in ("import_onnx", "ImportRequest"):
        from . import importer

        return getattr(importer, name)
    raise AttributeError(f"module 'edgeconv_export' has no attribute {name!r}")
