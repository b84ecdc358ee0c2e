"""Shared fixtures: the real datasets beside the repo (../shared/data) and small real subsets."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(path: Path) -> Path:
    """Real data the test needs: fail loudly under CI, skip on a developer machine without it."""
    if not path.exists():
        msg = f"real test data missing: {path} (see ../shared/data/README.md)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def mnist_test_dir() -> Path:
    return require(SHARED / "mnist")


@pytest.fixture(scope="session")
def catsdogs_dir() -> Path:
    return require(SHARED / "cats_and_dogs_small")


@pytest.fixture(scope="session")
def hymenoptera_dir() -> Path:
    return require(SHARED / "hymenoptera_data")


@pytest.fixture(scope="session")
def catsdogs_tiny(tmp_path_factory, catsdogs_dir) -> Path:
    """A small real subset of cats_and_dogs_small in Chollet's layout (train/validation/test)."""
    root = tmp_path_factory.mktemp("catsdogs_tiny")
    per_split = {"train": 40, "validation": 16, "test": 16}
    for split, n in per_split.items():
        for cls in ("cats", "dogs"):
            src = sorted((catsdogs_dir / split / cls).iterdir())[:n]
            dst = root / split / cls
            dst.mkdir(parents=True)
            for f in src:
                shutil.copy(f, dst / f.name)
    return root


def pytest_collection_modifyitems(config, items):
    """GPU tests skip cleanly, with a reason, where CUDA finds no GPU for this process (gpu_info(), which honours
    CUDA_VISIBLE_DEVICES and works on a Jetson, where there is no /dev/nvidia0)."""
    if not any("gpu" in item.keywords for item in items):
        return
    from edgeconv_runtime.gpu import gpu_info

    if gpu_info() is not None:
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (CUDA/TensorRT); CUDA finds none for this process")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def mnist_run(tmp_path_factory, mnist_test_dir) -> Path:
    """A real chollet_mnist run: 2 epochs on mnist-5k, tested on the official t10k digits."""
    from edgeconv.train import TrainConfig, train

    out = tmp_path_factory.mktemp("runs") / "mnist"
    train(TrainConfig(data="mnist-5k", test_data=str(mnist_test_dir), model="chollet_mnist", out=str(out), epochs=2,
                      optimizer="adam", lr=2e-3, progress=False))
    return out


@pytest.fixture(scope="session")
def mnist_bundle(tmp_path_factory, mnist_run) -> Path:
    """That run exported with FP32, FP16 and INT8 (calibrated on its real training digits)."""
    from edgeconv.exporting import ExportRequest, export_run

    out = tmp_path_factory.mktemp("bundles") / "mnist"
    export_run(ExportRequest(checkpoint=str(mnist_run), out=str(out), precisions=("fp32", "fp16", "int8"), calib_size=200))
    return out


@pytest.fixture(scope="session")
def rgb_bundle(tmp_path_factory, catsdogs_tiny) -> Path:
    """A small RGB model (chollet_catsdogs at 64x64) trained 1 epoch on real cats/dogs, exported FP32."""
    from edgeconv.exporting import ExportRequest, export_run
    from edgeconv.train import TrainConfig, train

    run = tmp_path_factory.mktemp("runs") / "catsdogs"
    train(TrainConfig(data=str(catsdogs_tiny), model="chollet_catsdogs", out=str(run), epochs=1, size=64, progress=False))
    out = tmp_path_factory.mktemp("bundles") / "catsdogs"
    export_run(ExportRequest(checkpoint=str(run), out=str(out)))
    return out
