"""Training throughput of chollet_mnist: edgeconv's loop vs a bare PyTorch loop on in-memory tensors.

Both train the same model with the same optimizer and batch size on the 5,000 mnist-5k digits,
interleaved epoch by epoch in one process so machine noise hits both alike. Target: edgeconv
>= 90 % of the bare loop's images/s (the data pipeline must not be the bottleneck).

    python benchmarks/train_throughput.py [--epochs 4] [--batch-size 64]
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from _common import environment, table, write_json  # noqa: E402

from edgeconv.data import load_dataset  # noqa: E402
from edgeconv.models import create_model  # noqa: E402
from edgeconv.training.loaders import InMemoryLoader  # noqa: E402
from edgeconv.training.loop import make_optimizer  # noqa: E402
from edgeconv_runtime.preprocess import Preprocess  # noqa: E402


def bare_epoch(model, opt, x, y, bs, gen):
    """The reference: pre-normalised float tensors, a permutation, slicing, forward/backward."""
    loss_fn = nn.CrossEntropyLoss()
    perm = torch.randperm(len(y), generator=gen)
    t = time.perf_counter()
    for b in range(0, len(y), bs):
        ii = perm[b : b + bs]
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x[ii]), y[ii])
        loss.backward()
        opt.step()
    return len(y) / (time.perf_counter() - t)


def edgeconv_epoch(model, opt, loader):
    """What edgeconv.training.loop runs per step: uint8 gather + normalise, loss/accuracy bookkeeping."""
    loss_fn = nn.CrossEntropyLoss()
    t = time.perf_counter()
    n = correct = 0
    loss_sum = 0.0
    for xb, yb in loader:
        opt.zero_grad(set_to_none=True)
        logits = model(xb)
        loss = loss_fn(logits, yb)
        loss.backward()
        opt.step()
        loss_sum += float(loss.detach()) * len(yb)
        correct += int((logits.argmax(1) == yb).sum())
        n += len(yb)
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    pre = Preprocess(size=(28, 28), channels=1, mean=(0.0,), std=(1.0,))
    ds = load_dataset("mnist-5k", pre, val_fraction=0.1, seed=0)
    x = torch.from_numpy(ds.train.pixels).permute(0, 3, 1, 2).float().div(255).contiguous()
    y = torch.from_numpy(ds.train.labels)
    torch.manual_seed(0)
    m_bare = create_model("chollet_mnist", 10, 1, (28, 28))
    m_ec = create_model("chollet_mnist", 10, 1, (28, 28))
    m_ec.load_state_dict(m_bare.state_dict())
    o_bare = make_optimizer("rmsprop", m_bare.parameters(), 1e-3, 0.0)
    o_ec = make_optimizer("rmsprop", m_ec.parameters(), 1e-3, 0.0)
    loader = InMemoryLoader(ds.train, pre, args.batch_size, shuffle=True, seed=0)
    gen = torch.Generator().manual_seed(0)
    # one warm-up epoch each, then interleave
    bare_epoch(m_bare, o_bare, x, y, args.batch_size, gen)
    edgeconv_epoch(m_ec, o_ec, loader)
    bare, ours = [], []
    for e in range(args.epochs):
        loader.set_epoch(e + 1)
        bare.append(bare_epoch(m_bare, o_bare, x, y, args.batch_size, gen))
        ours.append(edgeconv_epoch(m_ec, o_ec, loader))
    rows = [
        {"loop": "bare PyTorch (in-memory float tensors)", "images/s (median)": f"{np.median(bare):.0f}"},
        {"loop": "edgeconv InMemoryLoader + bookkeeping", "images/s (median)": f"{np.median(ours):.0f}"},
    ]
    ratio = float(np.median(ours) / np.median(bare))
    print(table(rows, ["loop", "images/s (median)"]))
    print(f"ratio edgeconv/bare: {ratio:.3f} (target >= 0.90)  epochs={args.epochs} batch={args.batch_size} threads={torch.get_num_threads()}")
    path = write_json("train_throughput.json", {"bare_images_per_second": bare, "edgeconv_images_per_second": ours, "ratio": ratio, "target": 0.9, "environment": environment()})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
