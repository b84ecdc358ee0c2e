import json
import sys

import numpy as np
import pytest
import torch

from edgeconv import checkpoint as ckpt
from edgeconv.data import load_dataset
from edgeconv.training import TrainConfig, train
from edgeconv.training.loaders import InMemoryLoader
from edgeconv_runtime.preprocess import Preprocess, preprocess_images
from interrupt_helpers import interrupt_when

PRE28 = Preprocess(size=(28, 28), channels=1, mean=(0.0,), std=(1.0,))


@pytest.fixture(scope="module")
def mnist_small(mnist_test_dir):
    """mnist-5k for training, 1,000 official test digits for testing: real and quick."""
    ds = load_dataset("mnist-5k", PRE28, test_data=str(mnist_test_dir), seed=0)
    ds.test = ds.test.subset(np.arange(1000))
    return ds


@pytest.fixture(scope="module")
def mnist_tiny(mnist_small):
    """1,500 training digits: enough to see seeds matter, quick with augmentation."""
    from dataclasses import replace

    return replace(mnist_small, train=mnist_small.train.subset(np.arange(1500)))


def run(tmp_path, ds, name="run", **kw):
    cfg = TrainConfig(data="mnist-5k", model="chollet_mnist", out=str(tmp_path / name), epochs=2, progress=False, **kw)
    return train(cfg, dataset=ds)


def test_training_learns_and_writes_the_output_contract(tmp_path, mnist_small):
    res = run(tmp_path, mnist_small, optimizer="adam", lr=2e-3)
    out = res.out
    for f in ("model.pt", "metrics.json", "history.csv", "history.json", "curves.png"):
        assert (out / f).is_file(), f
    m = json.loads((out / "metrics.json").read_text())
    assert m["test_accuracy"] > 0.9  # chance is 0.1
    assert 0 < m["val_accuracy"] <= 1 and m["epochs_run"] == 2
    assert m["train_seconds"] > 0 and m["train_images_per_second"] > 0
    hist = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2]
    assert (out / "history.csv").read_text().splitlines()[0].startswith("epoch,train_loss,train_acc,val_loss,val_acc")
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpoint_is_self_describing_and_loads_weights_only(tmp_path, mnist_small):
    res = run(tmp_path, mnist_small)
    raw = torch.load(res.out / "model.pt", weights_only=True)  # no code unpickled
    assert raw["format"] == "edgeconv.checkpoint"
    assert raw["model"]["name"] == "chollet_mnist"
    assert raw["classes"] == [str(i) for i in range(10)]
    assert raw["preprocess"]["size"] == [28, 28] and raw["preprocess"]["channels"] == 1
    assert len(raw["data"]["fingerprint"]) == 64
    assert raw["train_config"]["seed"] == 0
    assert raw["versions"]["torch"]
    # the reloaded network reproduces the reported test accuracy
    model, pre = ckpt.model_from_checkpoint(ckpt.load_checkpoint(res.out))
    x = InMemoryLoader(mnist_small.test, pre, 1000).normalize(torch.from_numpy(mnist_small.test.pixels).permute(0, 3, 1, 2))
    with torch.no_grad():
        acc = (model(x).argmax(1).numpy() == mnist_small.test.labels).mean()
    assert acc == pytest.approx(res.metrics["test_accuracy"], abs=1e-9)


def test_same_seed_same_metrics(tmp_path, mnist_tiny):
    a = run(tmp_path, mnist_tiny, "a", seed=7, augment=True)
    b = run(tmp_path, mnist_tiny, "b", seed=7, augment=True)
    c = run(tmp_path, mnist_tiny, "c", seed=8, augment=True)
    assert a.history == [dict(h, seconds=a.history[i]["seconds"], train_images_per_second=a.history[i]["train_images_per_second"]) for i, h in enumerate(b.history)]
    assert a.metrics["test_accuracy"] == b.metrics["test_accuracy"]
    assert [h["train_loss"] for h in a.history] != [h["train_loss"] for h in c.history]


def test_early_stopping_keeps_the_best_epoch(tmp_path, mnist_small):
    # a learning rate this high makes validation loss worse after the first epochs
    res = run(tmp_path, mnist_small, optimizer="sgd", lr=0.9, patience=1)
    m = res.metrics
    assert m["stopped_early"] or m["epochs_run"] == 2
    best = min(res.history, key=lambda h: h["val_loss"])
    assert m["best_epoch"] == best["epoch"]
    assert ckpt.load_checkpoint(res.out)["epoch"] == best["epoch"]


def test_refuses_to_overwrite_a_run_without_force(tmp_path, mnist_small):
    run(tmp_path, mnist_small, "r")
    from edgeconv_runtime.errors import EdgeconvError

    with pytest.raises(EdgeconvError, match="--force"):
        run(tmp_path, mnist_small, "r")


def test_eval_transform_equals_runtime_preprocessing(catsdogs_tiny):
    """Training's pixels + normalisation and the runtime's preprocessing agree on real images."""
    pre = Preprocess(size=(150, 150), channels=3, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    ds = load_dataset(str(catsdogs_tiny), pre)
    files = ds.test.files[:8]
    train_side = InMemoryLoader(ds.test.subset(np.arange(8)), pre, 8).normalize(torch.from_numpy(ds.test.pixels[:8]).permute(0, 3, 1, 2)).numpy()
    runtime_side = preprocess_images(files, pre)
    assert np.abs(train_side - runtime_side).max() <= 1e-5


def test_ctrl_c_keeps_the_best_checkpoint(tmp_path):
    """SIGINT stops training and keeps the best epoch, even in a process that inherited SIGINT as ignored.

    The child's SIGINT disposition is set explicitly to the hardest case, ignored, which is what a
    background job (`cmd &`, nohup, a suite started from one) inherits; `edgeconv train` must install
    its handler itself. Whatever happens, the 200-epoch child is killed before the test returns.
    """
    out = tmp_path / "interrupted"
    cmd = [sys.executable, "-m", "edgeconv", "train", "--data", "mnist-5k", "--model", "chollet_mnist", "--epochs", "200", "--out", str(out)]
    code, err = interrupt_when(cmd, lambda _: (out / "model.pt").exists(), tmp_path / "stderr.txt", not_ready="no checkpoint")
    assert code == 130, err
    assert "Traceback" not in err
    m = json.loads((out / "metrics.json").read_text())
    assert m["interrupted"] is True and m["epochs_run"] < 200
    assert ckpt.load_checkpoint(out)["epoch"] == m["best_epoch"]


def test_a_run_refused_before_training_leaves_no_empty_out(tmp_path, catsdogs_tiny):
    """Weights that do not load are refused after the data is read; the folders --out asked for are not left behind."""
    from edgeconv_runtime.errors import EdgeconvError

    bad = tmp_path / "weights.pth"
    bad.write_bytes(b"not a checkpoint")
    out = tmp_path / "new" / "run"
    cfg = TrainConfig(data=str(catsdogs_tiny), model="timm:resnet10t", weights=str(bad), size=32, out=str(out), epochs=1, progress=False)
    with pytest.raises(EdgeconvError, match="cannot read --weights"):
        train(cfg)
    assert not (tmp_path / "new").exists()
    assert bad.is_file()  # the user's file is untouched
