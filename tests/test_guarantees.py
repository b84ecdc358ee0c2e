"""The guarantees a one-line change to the product could break unseen (issue 17's mutation table): each test
here fails when its guarantee is removed (checked by making that change; see benchmarks/results/mutation.json)."""
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from edgeconv.checkpoint import load_checkpoint, model_from_checkpoint, weights_sha256
from edgeconv.data import load_dataset
from edgeconv.training import TrainConfig, train
from edgeconv_export.bundle import ExportInputs, ExportOptions, _gate, export_bundle
from edgeconv_runtime.errors import EdgeconvError
from edgeconv_runtime.parity import parity_report
from edgeconv_runtime.preprocess import Preprocess, normalize

PRE28 = Preprocess(size=(28, 28), channels=1, mean=(0.0,), std=(1.0,))


# ---------------------------------------------------------------------------------------------- export gates
class ExportDrift(torch.nn.Module):
    """A real trained model whose traced ONNX graph adds ``shift`` to every logit: a broken export that keeps
    every top-1 and a cosine of ~1, so only the FP32 max-abs-diff limit can refuse it."""

    def __init__(self, inner, shift: float):
        super().__init__()
        self.inner, self.shift = inner, shift

    def forward(self, x):
        y = self.inner(x)
        return y + self.shift if torch.onnx.is_in_onnx_export() else y


def _export_inputs(mnist_run, mnist_bundle, shift: float) -> ExportInputs:
    model, pre = model_from_checkpoint(load_checkpoint(mnist_run))
    ref = mnist_bundle / "reference"
    return ExportInputs(model=ExportDrift(model, shift), name="drift", classes=[str(i) for i in range(10)], preprocess=pre,
                        val_x=np.load(ref / "inputs.npy"), val_y=np.load(ref / "labels.npy"))


def test_fp32_parity_gate_refuses_an_export_that_drifts_from_pytorch(mnist_run, mnist_bundle, tmp_path):
    ok = export_bundle(_export_inputs(mnist_run, mnist_bundle, 0.0), tmp_path / "ok", ExportOptions())
    assert ok.artifacts[0].parity["max_abs_diff"] <= 1e-4  # the wrapper alone exports faithfully
    with pytest.raises(EdgeconvError, match="FP32 ONNX disagrees with PyTorch"):
        export_bundle(_export_inputs(mnist_run, mnist_bundle, 5e-4), tmp_path / "drift", ExportOptions())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]  # nothing shipped, nothing left behind


def test_accuracy_drop_gate_refuses_a_loss_and_accepts_a_gain(mnist_bundle):
    """An FP16/INT8 artifact may lose at most --max-accuracy-drop points against FP32; winning points is never refused."""
    logits = np.load(mnist_bundle / "reference" / "outputs.npy").astype(np.float64)
    labels = logits.argmax(1)  # FP32 right on all 8 images
    worse = logits.copy()
    worse[0] = np.roll(worse[0], 1)  # one image of 8 now wrong: 12.5 points lost
    lost = parity_report(logits, worse, labels)
    with pytest.raises(EdgeconvError, match="12.50 points below FP32"):
        _gate("int8", dict(lost), fp32_accuracy=1.0, max_drop=10.0)
    _gate("fp16", dict(lost), fp32_accuracy=1.0, max_drop=15.0)  # within the allowance
    gained = parity_report(worse, logits, labels)  # the candidate beats the reference by 12.5 points
    record = dict(gained)
    _gate("int8", record, fp32_accuracy=0.875, max_drop=0.0)
    assert record["accuracy_drop_points"] == -12.5


def test_an_artifact_that_would_fail_verify_on_its_own_reference_images_is_not_shipped(mnist_run, mnist_bundle, tmp_path, monkeypatch):
    """The accuracy-drop gate looks at accuracy only; the bundle's reference images are also judged with the device's
    tolerance, as `verify` will judge them. Here FP16 is held to a cosine no output can reach (1.01) to see the refusal."""
    from edgeconv_runtime import parity

    inputs = _export_inputs(mnist_run, mnist_bundle, 0.0)
    ok = export_bundle(inputs, tmp_path / "ok", ExportOptions(precisions=("fp32", "fp16")))
    fp16 = next(a for a in ok.artifacts if a.precision == "fp16").parity
    assert fp16["cosine_min"] >= 0.999  # passes the real limit, so only the raised one below refuses it
    monkeypatch.setitem(parity.TOLERANCES, "fp16", dict(parity.TOLERANCES["fp16"], cosine_min=1.01))
    with pytest.raises(EdgeconvError, match=r"fp16 would fail `verify` on the bundle's own 8 reference images \(min cosine"):
        export_bundle(inputs, tmp_path / "strict", ExportOptions(precisions=("fp32", "fp16")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]


def test_recorded_accuracy_drop_is_fp32_minus_the_artifact(mnist_bundle):
    m = json.loads((mnist_bundle / "manifest.json").read_text())
    fp32 = next(a for a in m["artifacts"] if a["precision"] == "fp32")["parity"]["accuracy"]
    for a in m["artifacts"]:
        if a["precision"] != "fp32":
            assert a["parity"]["accuracy_drop_points"] == round(100 * (fp32 - a["parity"]["accuracy"]), 3), a["file"]


# ---------------------------------------------------------------------------------------------- checkpoints
def test_weights_hash_refuses_a_state_dict_entry_that_is_not_a_tensor():
    assert len(weights_sha256({"w": torch.zeros(2)})) == 64
    with pytest.raises(TypeError, match="'step' is int, not a tensor"):
        weights_sha256({"w": torch.zeros(2), "step": 3})


def test_an_empty_or_newer_checkpoint_is_refused_by_name(mnist_run, tmp_path):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(EdgeconvError, match="the file is empty, 0 bytes"):
        load_checkpoint(empty)
    ck = torch.load(mnist_run / "model.pt", map_location="cpu", weights_only=True)
    ck["version"] += 1
    torch.save(ck, tmp_path / "newer.pt")
    with pytest.raises(EdgeconvError, match=f"written by a newer edgeconv \\(checkpoint version {ck['version']}\\); upgrade edgeconv"):
        load_checkpoint(tmp_path / "newer.pt")


class _RunsCode:
    """Unpickling this creates ``path``: a stand-in for a checkpoint that carries code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        import os

        return os.mkdir, (self.path,)


def test_a_checkpoint_carrying_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"format": "edgeconv.checkpoint", "version": 1, "payload": _RunsCode(marker)}, tmp_path / "evil.pt")
    with pytest.raises(EdgeconvError, match="is not a readable edgeconv checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def digits():
    """600 real mnist-5k training digits and its 500 validation digits: quick to train on."""
    ds = load_dataset("mnist-5k", PRE28, seed=0)
    return replace(ds, train=ds.train.subset(np.arange(600)))


def _config(out, epochs: int, lr: float = 2e-3, augment: bool = False, lr_schedule: str = "none") -> TrainConfig:
    return TrainConfig(data="mnist-5k", model="chollet_mnist", out=str(out), epochs=epochs, optimizer="adam", lr=lr, augment=augment,
                       lr_schedule=lr_schedule, progress=False)


def _val_loss(run_dir, val) -> float:
    model, pre = model_from_checkpoint(load_checkpoint(run_dir))
    with torch.no_grad():
        logits = model(torch.from_numpy(normalize(val.pixels, pre)))
    return float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(val.labels)))


def test_model_pt_holds_the_best_epochs_weights_not_the_last(digits, tmp_path):
    """200 digits and a learning rate this high overfit at once: validation loss is best after epoch 1 and many
    times worse by epoch 3. model.pt must carry epoch 1's weights, and its validation loss the one reported."""
    few = replace(digits, train=digits.train.subset(np.arange(200)))
    res = train(_config(tmp_path / "run", 3, lr=1e-2), dataset=few)
    m = res.metrics
    assert m["best_epoch"] < m["epochs_run"] == 3, res.history
    last = res.history[-1]["val_loss"]
    assert last > 1.5 * m["val_loss"], res.history
    saved = _val_loss(res.out, few.val)
    assert saved == pytest.approx(m["val_loss"], rel=1e-4), (saved, m["val_loss"], last)
    assert load_checkpoint(res.out)["epoch"] == m["best_epoch"]
    # a fresh run's training time is its epochs' own: no carried-over seconds (each epoch's figure also holds validation)
    assert 0 < m["train_seconds"] <= sum(h["seconds"] for h in res.history) + 0.005, (m["train_seconds"], res.history)


def test_early_stopping_stops_after_patience_epochs_without_improvement(digits, tmp_path):
    few = replace(digits, train=digits.train.subset(np.arange(200)))
    res = train(replace(_config(tmp_path / "run", 5, lr=1e-2), patience=2), dataset=few)
    m = res.metrics
    assert m["stopped_early"] and m["best_epoch"] == 1 and m["epochs_run"] == 3, res.history


def test_run_directory_guards_come_before_any_training(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(EdgeconvError, match="is a file; choose a directory"):
        train(_config(tmp_path / "file", 1))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model.pt").write_bytes(b"a trained model")
    with pytest.raises(EdgeconvError, match="already holds a trained model; pass --force"):
        train(_config(tmp_path / "run", 1))
    with pytest.raises(EdgeconvError, match=r"no resumable state in .* \(no state.pt\)"):
        train(_config(tmp_path / "run", 1), resume=True)


def test_resume_continues_from_the_saved_weights(digits, tmp_path, caplog):
    """A 2-epoch run stopped once epoch 1's state was saved, then resumed, ends exactly where the uninterrupted run
    ends (with augmentation and a cosine schedule, so the random generators and the schedule must continue too, not
    only the weights and the optimizer)."""
    whole = train(_config(tmp_path / "whole", 2, augment=True, lr_schedule="cosine"), dataset=digits)
    assert whole.metrics["train_images_seen"] == 2 * len(digits.train)
    part = tmp_path / "part"  # the run directory as a kill after epoch 1 leaves it: epoch 1's state is the latest
    part.mkdir()
    shutil.copyfile(whole.out / "state.prev.pt", part / "state.pt")
    shutil.copyfile(whole.out / "model.pt", part / "model.pt")  # the best epoch's weights: epoch 1's (asserted below), as a kill leaves them
    state = torch.load(part / "state.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 1 and state["images_seen"] == len(digits.train)
    resumed = train(TrainConfig(data="mnist-5k", model="chollet_mnist", out=str(part), progress=False), dataset=digits, resume=True)
    assert resumed.metrics["resumed"] and [h["epoch"] for h in resumed.history] == [1, 2]
    assert f"resuming {part} at epoch 2 of 2" in caplog.text
    assert resumed.metrics["train_images_seen"] == 2 * len(digits.train)
    assert resumed.metrics["best_epoch"] == whole.metrics["best_epoch"] == 1
    for key in ("train_loss", "val_loss", "val_acc", "lr"):
        assert resumed.history[1][key] == pytest.approx(whole.history[1][key], abs=1e-5), (key, resumed.history, whole.history)
    final = torch.load(part / "state.pt", map_location="cpu", weights_only=True)["model"]
    reference = torch.load(whole.out / "state.pt", map_location="cpu", weights_only=True)["model"]
    for name, tensor in reference.items():
        assert torch.allclose(final[name], tensor, atol=1e-5), name
    with pytest.raises(EdgeconvError, match="already finished its 2 epochs"):
        train(TrainConfig(data="mnist-5k", model="chollet_mnist", out=str(part), progress=False), dataset=digits, resume=True)
