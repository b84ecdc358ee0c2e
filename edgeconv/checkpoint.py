"""Self-describing checkpoints that load without unpickling code (``weights_only=True``)."""
from __future__ import annotations

import io
import os
from pathlib import Path

import torch

from edgeconv_runtime.errors import EdgeconvError
from edgeconv_runtime.fileio import atomic_write_bytes
from edgeconv_runtime.preprocess import Preprocess

FORMAT = "edgeconv.checkpoint"
VERSION = 1
CHECKPOINT_NAME = "model.pt"


def weights_sha256(state_dict: dict) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order: what a flipped bit changes."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state_dict entry {name!r} is {type(t).__name__}, not a tensor")
        t = t.detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode("utf-8"))
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, meta: dict) -> None:
    """Write ``meta`` (plain JSON-able values), the model's weights and their sha256 atomically."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    payload = {"format": FORMAT, "version": VERSION, **meta, "weights_sha256": weights_sha256(state), "state_dict": state}
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
    if p.stat().st_size == 0:
        raise EdgeconvError(f"{p} is not a readable edgeconv checkpoint (the file is empty, 0 bytes); restore it from a backup or retrain")
    try:
        ck = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or foreign file (some with an empty message)
        detail = (str(exc).strip().splitlines() or [""])[0][:120]
        raise EdgeconvError(f"{p} is not a readable edgeconv checkpoint ({type(exc).__name__}: {detail or 'truncated or damaged'}); "
                            "restore it from a backup or retrain") from exc
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise EdgeconvError(f"{p} is not an edgeconv checkpoint (no '{FORMAT}' header); pass a model.pt written by `edgeconv train`")
    if ck.get("version", 0) > VERSION:
        raise EdgeconvError(f"{p} was written by a newer edgeconv (checkpoint version {ck['version']}); upgrade edgeconv")
    state = ck.get("state_dict")
    if not isinstance(state, dict) or not state or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise EdgeconvError(f"{p} holds no weights (its 'state_dict' is missing or not a dict of tensors); retrain or restore the checkpoint")
    for key, typ in (("model", dict), ("classes", list), ("preprocess", dict)):
        if not isinstance(ck.get(key), typ):
            raise EdgeconvError(f"{p} has no valid {key!r} field; it was not written by `edgeconv train` (retrain or restore it)")
    stored = ck.get("weights_sha256")  # absent in checkpoints written before it existed: those load unchecked
    if stored is not None and stored != weights_sha256(state):
        raise EdgeconvError(f"{p} is corrupted: its weights do not match the sha256 stored in it; restore it from a backup or retrain")
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
    try:
        model.load_state_dict(ck["state_dict"])
    except (RuntimeError, KeyError, ValueError) as exc:  # torch lists every bad tensor over many lines: keep the first
        detail = " ".join(str(exc).split())[:240]
        raise EdgeconvError(f"checkpoint weights do not fit model {m['name']!r} with {len(ck['classes'])} classes ({detail}); "
                            "the checkpoint is damaged or was edited: retrain or restore it") from exc
    model.eval()
    return model, pre
