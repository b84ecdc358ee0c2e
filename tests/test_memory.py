"""Memory guards (issue 16, point 5): images are held once, as uint8, and only the ones a job uses are decoded."""
from __future__ import annotations

import numpy as np
import torch

import edgeconv.data as data_mod
from edgeconv.data import inspect_source, load_dataset, load_export_images
from edgeconv.models import build_preprocess
from edgeconv.training.loaders import InMemoryLoader
from edgeconv_export.bundle import NormalizedImages
from edgeconv_runtime.preprocess import normalize


def _pre(root):
    return build_preprocess("efficientnet_lite0", inspect_source(str(root)), 32)


def test_export_decodes_only_the_parity_split_and_the_calibration_sample(catsdogs_tiny, monkeypatch):
    pre = _pre(catsdogs_tiny)
    full = load_dataset(str(catsdogs_tiny), pre)  # train 80, val 32, test 32
    decoded = []
    real = data_mod.load_pixels
    monkeypatch.setattr(data_mod, "load_pixels", lambda p, *a, **k: decoded.append(p) or real(p, *a, **k))
    imgs = load_export_images(str(catsdogs_tiny), pre, calib_size=10)
    assert len(decoded) == 32 + 10  # no test image, 10 of the 80 training images
    assert imgs.classes == full.classes and np.array_equal(imgs.val.pixels, full.val.pixels) and imgs.val.files == full.val.files
    # the same sample the export always took: rng(0).choice over the decoded training split
    idx = np.sort(np.random.default_rng(0).choice(80, 10, replace=False))
    assert np.array_equal(imgs.calibration, full.train.pixels[idx])
    assert imgs.calibration_source.endswith("(train split, 10 of 80)")
    assert load_export_images(str(catsdogs_tiny), pre).calibration is None


def test_normalized_images_slice_into_the_runtime_normalisation(catsdogs_tiny):
    pre = _pre(catsdogs_tiny)
    px = load_export_images(str(catsdogs_tiny), pre).val.pixels
    x = NormalizedImages(px, pre)
    assert len(x) == 32
    got = x[5:21]
    assert got.dtype == np.float32 and got.shape == (16, 3, 32, 32)
    assert np.array_equal(got, normalize(px[5:21], pre))


def test_loader_shares_the_split_pixels_and_batches_as_before(catsdogs_tiny):
    pre = _pre(catsdogs_tiny)
    split = load_dataset(str(catsdogs_tiny), pre).val
    loader = InMemoryLoader(split, pre, 8, shuffle=True, seed=3)
    assert np.shares_memory(loader.x.numpy(), split.pixels)  # no copy of the split
    order = loader.order()
    xb, yb = next(iter(loader))
    assert torch.equal(xb, torch.from_numpy(normalize(split.pixels[order[:8].numpy()], pre)))
    assert torch.equal(yb, torch.from_numpy(split.labels[order[:8].numpy()]))
