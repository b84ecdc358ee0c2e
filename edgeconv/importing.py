"""``edgeconv import``: an ONNX file, or a torchvision / timm model by name, to a checked bundle."""
from __future__ import annotations

from typing import Optional

from edgeconv_runtime.errors import EdgeconvError
from edgeconv_runtime.preprocess import Preprocess, resolve_preprocess

NAMED_PREFIXES = ("torchvision:", "timm:")


def import_model(onnx_file: Optional[str], model_name: Optional[str], weights: Optional[str], **kw):
    """Import ``onnx_file`` (``edgeconv_export.import_onnx``), or build ``model_name`` and export it like a user's module."""
    from edgeconv_export.importer import ImportRequest, import_onnx

    if bool(onnx_file) == bool(model_name):
        raise EdgeconvError("pass an ONNX file or --model torchvision:NAME / timm:NAME (one of them)")
    if weights and not model_name:
        raise EdgeconvError("--weights goes with --model; an ONNX file carries its own weights")
    req = ImportRequest(onnx=onnx_file or "", **kw)
    if onnx_file:
        return import_onnx(req)
    return import_named(model_name, weights, req)


def named_preprocess(entry, req) -> Preprocess:
    """The model's own preprocessing (its hub's transforms), with what the user passed on top (``resolve_preprocess``)."""
    return resolve_preprocess(entry, None, {"size": req.size, "resize": req.resize, "scale": req.scale, "mean": req.mean, "std": req.std})


def import_named(model_name: str, weights: Optional[str], req):
    """A registry model (torchvision:NAME, timm:NAME) with its hub or local weights, exported with its own preprocessing."""
    from edgeconv_export.api import export_module
    from edgeconv_export.importer import check_request, default_precisions, read_labels

    from .models import create_model, get_model_entry

    if not model_name.startswith(NAMED_PREFIXES):
        raise EdgeconvError(f"--model {model_name!r}: edgeconv import takes torchvision:NAME or timm:NAME "
                            "(edgeconv's own models are trained with `edgeconv train`)")
    check_request(req)
    classes = read_labels(req.labels, None)
    entry = get_model_entry(model_name)
    pre = named_preprocess(entry, req)
    module = create_model(model_name, num_classes=len(classes), in_channels=3, input_size=pre.size, pretrained=True, weights=weights)
    return export_module(module, classes, pre, req.calib_data, req.out, val_images=req.val_data, precisions=default_precisions(req),
                         name=req.name or model_name.split(":", 1)[1], calib_size=req.calib_size, val_size=req.val_size,
                         max_accuracy_drop=req.max_accuracy_drop, calibration_method=req.calib_method, force=req.force,
                         int8_options={"max_agreement_drop": req.max_agreement_drop, "max_float_nodes": req.max_float_nodes},
                         source={"model": model_name, "weights": weights})
