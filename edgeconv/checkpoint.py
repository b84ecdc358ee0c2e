"""Self-describing checkpoints that load without unpickling code (``weights_only=True``)."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch

from edgeconv_runtime.errors import EdgeconvError
from edgeconv_runtime.fileio import atomic_write_bytes
from edgeconv_runtime.preprocess import Preprocess

FORMAT = "edgeconv.checkpoint"
VERSION = 1
CHECKPOINT_NAME = "model.pt"


def library_versions() -> dict:
    import platform

    import numpy
    import torchvision

    return {"python": platform.python_version(), "torch": str(torch.__version__), "torchvision": str(torchvision.__version__), "numpy": str(numpy.__version__)}


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, meta: dict) -> None:
    """Write ``meta`` (plain JSON-able values) and the model's weights atomically."""
    payload = {"format": FORMAT, "version": VERSION, **meta, "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}}
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A run directory or a checkpoint file -> the checkpoint file."""
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT_NAME
    if not p.is_file():
        raise EdgeconvError(f"checkpoint not found: {p}; pass a run directory written by `edgeconv train` or its {CHECKPOINT_NAME}")
    return p


def load_checkpoint(path: str | os.PathLike) -> dict:
    p = resolve_checkpoint(path)
    try:
        ck = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        raise EdgeconvError(f"{p} is not a readable edgeconv checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") from exc
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise EdgeconvError(f"{p} is not an edgeconv checkpoint (no '{FORMAT}' header); pass a model.pt written by `edgeconv train`")
    if ck.get("version", 0) > VERSION:
        raise EdgeconvError(f"{p} was written by a newer edgeconv (checkpoint version {ck['version']}); upgrade edgeconv")
    return ck


def model_from_checkpoint(ck: dict) -> tuple:
    """Rebuild the network of a loaded checkpoint; returns (model in eval mode, Preprocess)."""
    from .models import create_model

    m = ck["model"]
    pre = Preprocess.from_dict(ck["preprocess"])
    kwargs = dict(m.get("kwargs", {}))
    from .models import get_model_entry

    if get_model_entry(m["name"]).pretrained:
        kwargs["pretrained"] = False  # the weights come from the checkpoint, not ImageNet
    model = create_model(m["name"], num_classes=len(ck["classes"]), in_channels=pre.channels, input_size=pre.size, **kwargs)
    model.load_state_dict(ck["state_dict"])
    model.eval()
    return model, pre


def describe(ck: dict) -> dict[str, Any]:
    return {k: v for k, v in ck.items() if k != "state_dict"}
