"""The run directory: preparing it, the resumable state and its RNG, history files and curves."""
from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgeconv_runtime.errors import EdgeconvError
from edgeconv_runtime.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text

from .. import checkpoint as ckpt

log = logging.getLogger("edgeconv.train")

STATE_NAME = "state.pt"
PREV_STATE_NAME = "state.prev.pt"


def prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise EdgeconvError(f"--out {out} is a file; choose a directory")
    if (out / ckpt.CHECKPOINT_NAME).exists() and not force:
        raise EdgeconvError(f"{out} already holds a trained model; pass --force to overwrite it, --resume {out} to continue it, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    for stale in (STATE_NAME, PREV_STATE_NAME):
        (out / stale).unlink(missing_ok=True)


def save_state(out: Path, state: dict) -> None:
    """The resumable state of the epoch just finished; the one before it is kept as a fallback.

    The new file is complete on disk (temp + fsync + rename) before the old one is rotated, so
    a crash or a full disk at any moment leaves at least one good state.
    """
    buf = io.BytesIO()
    torch.save(state, buf)
    tmp = out / f".{STATE_NAME}.new"
    atomic_write_bytes(tmp, buf.getvalue())
    if (out / STATE_NAME).exists():
        os.replace(out / STATE_NAME, out / PREV_STATE_NAME)
    os.replace(tmp, out / STATE_NAME)


def load_state(out: Path) -> dict:
    """The newest readable state in ``out``; falls back to the previous one with a warning."""
    errors = []
    for name in (STATE_NAME, PREV_STATE_NAME):
        p = out / name
        if not p.exists():
            continue
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
            if name == PREV_STATE_NAME:
                log.warning("%s is unreadable (%s); resuming from the previous epoch's state", STATE_NAME, errors[-1] if errors else "missing")
            return state
        except Exception as exc:  # truncated/corrupt file: try the older one
            errors.append(f"{name}: {type(exc).__name__} {(str(exc).splitlines() or [''])[0][:80]}")
    raise EdgeconvError(f"no resumable state in {out} ({'; '.join(errors) or 'no state.pt'}); it was not written by `edgeconv train`, or no epoch finished")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every generator a resumed run must continue: torch (augmentation), numpy, python."""
    _, keys, pos, _, _ = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(keys.astype(np.int64)), "numpy_pos": int(pos),
            "python": list(random.getstate()[1])}


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(("MT19937", st["numpy"].numpy().astype(np.uint32), st["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(st["python"]), None))


def write_history(out: Path, history: list) -> None:
    atomic_write_json(out / "history.json", history)
    if history:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(history[0]))
        w.writeheader()
        w.writerows(history)
        atomic_write_text(out / "history.csv", buf.getvalue())


def plot_history(out: Path, history: list, title: str) -> None:
    """The book's training/validation accuracy and loss charts, side by side, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "acc", "accuracy"), (axes[1], "loss", "loss")):
        ax.plot(ep, [h[f"train_{key}"] for h in history], "bo-", ms=3, label=f"training {label}")
        ax.plot(ep, [h[f"val_{key}"] for h in history], "r.-", label=f"validation {label}")
        ax.set_xlabel("epoch")
        ax.set_title(f"Training and validation {label}")
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(out / "curves.png", buf.getvalue())


def write_shard_record(out: Path, ctx, shard_log: dict, model: nn.Module) -> None:
    """Under torchrun: which samples this rank saw each epoch, and a digest of its final weights."""
    digest = hashlib.sha256(b"".join(v.detach().contiguous().numpy().tobytes() for v in model.state_dict().values())).hexdigest()
    atomic_write_json(out / f"shards.rank{ctx.rank}.json", {"rank": ctx.rank, "world_size": ctx.world_size, "backend": ctx.backend,
                                                           "epochs": shard_log, "final_weights_sha256": digest})
