"""edgeconv-export: checkpoints to self-describing ONNX / TensorRT bundles."""

__version__ = "0.1.0"
