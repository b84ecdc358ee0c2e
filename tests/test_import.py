"""`edgeconv import` and `edgeconv_export.export_module`: classifiers edgeconv did not train, to normal checked bundles.

The source is torchvision's real mobilenet_v3_small (no hub weights offline: its BatchNorm statistics are taken from
real cats/dogs images and its last layer fitted to them by least squares, so its logits are those of a working model,
not the ~1e-11 of a fresh init), saved with a plain `torch.onnx.export` (no metadata, fixed batch 1, input `input.1`).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SIZE = 128
MEAN, STD = "0.485,0.456,0.406", "0.229,0.224,0.225"
NORM = ["--mean", MEAN, "--std", STD]


def edgeconv(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "edgeconv", *map(str, args)], capture_output=True, text=True, timeout=timeout)


def runtime(*args):
    return subprocess.run([sys.executable, "-m", "edgeconv_runtime", *map(str, args)], capture_output=True, text=True, timeout=300)


def recalibrated_mobilenet(train_dir: Path, num_classes: int):
    """torchvision mobilenet_v3_small with BatchNorm statistics from 120 real training images: (model, images, labels +-1)."""
    import torch
    import torchvision

    torch.manual_seed(0)
    m = torchvision.models.mobilenet_v3_small(weights=None, num_classes=num_classes)
    files = sorted(train_dir.glob("*/*.jpg"))[::16]
    x = torch.from_numpy(_pixels(files))
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.momentum = None
            mod.reset_running_stats()
    m.train()
    with torch.no_grad():
        m(x)
    return m.eval(), x, np.array([f.parent.name == "dogs" for f in files], dtype=np.float64) * 2 - 1


def fitted_mobilenet(train_dir: Path):
    """The recalibrated mobilenet with 2 classes, its last layer fitted to the training images by least squares."""
    import torch

    m, x, y = recalibrated_mobilenet(train_dir, 2)
    with torch.no_grad():
        f = m.classifier[:-1](torch.flatten(m.avgpool(m.features(x)), 1)).double().numpy()
        f1 = np.c_[f, np.ones(len(f))]
        w = np.linalg.solve(f1.T @ f1 + 10 * np.eye(f1.shape[1]), f1.T @ y)
        fc = m.classifier[-1]
        fc.weight[:] = torch.tensor(np.stack([-w[:-1], w[:-1]]) * 2)
        fc.bias[:] = torch.tensor([-w[-1], w[-1]]) * 2 + 3  # + 3: logits, like a trained model's, are not centred on 0
    return m


def plain_export(module, path: Path, example_shape, opset=17, dynamic=None):
    """What a user without edgeconv writes: torch.onnx.export with its defaults (no names, fixed batch)."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.zeros(*example_shape),), str(path), opset_version=opset, dynamo=False,
                          **({"input_names": ["x"], "dynamic_axes": {"x": dynamic}} if dynamic else {}))
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory, catsdogs_dir):
    """The fitted mobilenet and its twins taking NHWC input, BGR input, or giving softmax (opset 11, dynamic H/W)."""
    import torch

    root = tmp_path_factory.mktemp("import_src")
    m = fitted_mobilenet(catsdogs_dir / "train")

    class Twin(torch.nn.Module):
        """The same network behind an NHWC input, a BGR input, or with a softmax on its logits."""

        def __init__(self, kind: str):
            super().__init__()
            self.m, self.kind = m, kind

        def forward(self, x):
            if self.kind == "softmax":
                return torch.softmax(self.m(x), 1)
            return self.m(x.permute(0, 3, 1, 2) if self.kind == "nhwc" else x.flip(1))

    (root / "labels.txt").write_text("cats\ndogs\n")
    return {
        "model": m,
        "rgb": plain_export(m, root / "rgb.onnx", (1, 3, SIZE, SIZE)),
        "nhwc": plain_export(Twin("nhwc"), root / "nhwc.onnx", (1, SIZE, SIZE, 3)),
        "bgr": plain_export(Twin("bgr"), root / "bgr.onnx", (1, 3, SIZE, SIZE)),
        "softmax": plain_export(Twin("softmax"), root / "softmax.onnx", (1, 3, SIZE, SIZE), opset=11, dynamic={0: "n", 2: "h", 3: "w"}),
        "labels": root / "labels.txt",
    }


def _pixels(files) -> np.ndarray:
    """The images as the bundles' preprocessing gives them (runtime decoder, bilinear resize, ImageNet mean/std)."""
    from edgeconv_runtime.preprocess import Preprocess, preprocess_images

    return preprocess_images(files, Preprocess(size=(SIZE, SIZE), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)))


def _logits(bundle: Path, files, precision="fp32") -> np.ndarray:
    from edgeconv_runtime import Model

    with Model.load(bundle, backend="onnxruntime-cpu", precision=precision) as model:
        return model.run(model.preprocess_images(files))


def test_import_mobilenet_calibrated_and_verified(sources, catsdogs_dir, tmp_path):
    out = tmp_path / "bundle"
    r = edgeconv("import", sources["rgb"], "--out", out, "--labels", sources["labels"], *NORM, "--calib-data", catsdogs_dir / "train",
                 "--calib-size", 200, "--val-data", catsdogs_dir / "validation", "--val-size", 100, "--max-accuracy-drop", 5)
    assert r.returncode == 0, r.stderr
    print(r.stdout)
    m = json.loads((out / "manifest.json").read_text())
    assert m["classes"] == ["cats", "dogs"] and m["input"]["shape"] == ["batch", 3, SIZE, SIZE]
    assert m["source"]["input"] == {"name": "input.1", "shape": f"[1, 3, {SIZE}, {SIZE}]", "layout": "NCHW", "channel_order": "RGB"}
    assert m["parity"]["reference"].startswith("the source ONNX") and m["source"]["parity_labels"] == "class folders"
    arts = {(a["precision"], a["variant"]): a for a in m["artifacts"]}
    assert set(arts) >= {("fp32", "default"), ("fp16", "default"), ("int8", "default")}  # portable / tensorrt: each judged on its own
    assert arts[("fp32", "default")]["parity"]["max_abs_diff"] <= 1e-4 and m["calibration"]["images"] == 200
    int8 = arts[("int8", "default")]["parity"]
    print(f"INT8 vs source FP32 on {int8['n']} real validation images: top-1 agreement {int8['top1_agreement']:.4f}, "
          f"min cosine {int8['cosine_min']:.5f}, accuracy {int8['accuracy']:.4f} (FP32 {m['parity']['pytorch_accuracy']:.4f}); "
          f"sizes MB " + ", ".join(f"{a['file']} {a['bytes'] / 1e6:.2f}" for a in m["artifacts"]))
    assert int8["top1_agreement"] >= 0.9
    for precision in ("fp32", "fp16", "int8"):
        v = runtime("verify", out, "--precision", precision)
        assert v.returncode == 0 and v.stdout.startswith("verify OK"), v.stdout + v.stderr
    assert (out / "MODEL_CARD.md").read_text().startswith("# Model card: rgb (imported)")
    # the bundle answers like the source file run on its own
    import onnxruntime as ort

    files = sorted((catsdogs_dir / "test" / "dogs").iterdir())[:4]
    sess = ort.InferenceSession(str(sources["rgb"]), providers=["CPUExecutionProvider"])
    want = np.concatenate([sess.run(None, {"input.1": x[None]})[0] for x in _pixels(files)])
    np.testing.assert_allclose(_logits(out, files), want, atol=1e-4)


@pytest.mark.parametrize("kind,flags", [("nhwc", ["--layout", "nhwc"]), ("bgr", ["--channel-order", "bgr"])])
def test_nhwc_and_bgr_models_answer_like_their_twin(sources, hymenoptera_dir, tmp_path, kind, flags):
    """Photos of any shape, letterboxed; no class folders named like the labels: parity labels are the source's top-1."""
    val = hymenoptera_dir / "val"
    twin, other, wrong = tmp_path / "twin", tmp_path / kind, tmp_path / "wrong"
    common = ["--labels", sources["labels"], *NORM, "--val-data", val, "--val-size", 24, "--precision", "fp32,fp16", "--resize", "letterbox"]
    assert edgeconv("import", sources["rgb"], "--out", twin, *common).returncode == 0
    r = edgeconv("import", sources[kind], "--out", other, *common, *flags)
    assert r.returncode == 0, r.stderr
    m = json.loads((other / "manifest.json").read_text())
    assert m["input"]["shape"] == ["batch", 3, SIZE, SIZE] and m["preprocess"]["resize"] == "letterbox"
    assert m["source"]["parity_labels"].startswith("the reference's top-1")
    grey = (114 / 255 - 0.485) / 0.229  # the letterbox bars, normalised
    assert (np.abs(np.load(other / "reference" / "inputs.npy")[:, 0] - grey) < 1e-5).mean() > 0.05
    assert runtime("verify", other).returncode == 0  # the device's decode + letterbox matches the reference inputs
    files = sorted((val / "ants").iterdir())[:6]
    np.testing.assert_allclose(_logits(other, files), _logits(twin, files), atol=1e-4)
    np.testing.assert_allclose(_logits(other, files, "fp16"), _logits(twin, files, "fp16"), atol=2e-3)
    if kind == "bgr":  # without the flag the bundle is still self-consistent, but answers differently: the flag matters
        assert edgeconv("import", sources[kind], "--out", wrong, *common).returncode == 0
        assert np.abs(_logits(wrong, files) - _logits(twin, files)).max() > 1e-3


def test_softmax_old_opset_dynamic_size(sources, catsdogs_dir, tmp_path):
    """A final Softmax is removed (the runtime applies its own), opset 11 is upgraded and said so, dynamic H/W need --size."""
    out = tmp_path / "soft"
    common = ["--labels", sources["labels"], *NORM, "--calib-data", catsdogs_dir / "train", "--val-size", 30, "--precision", "fp32,fp16"]
    r = edgeconv("import", sources["softmax"], "--out", out, *common)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--size" in r.stderr and not out.exists(), r.stderr
    r = edgeconv("import", sources["softmax"], "--out", out, *common, "--size", f"{SIZE},{SIZE}")
    assert r.returncode == 0, r.stderr
    assert "note: upgraded opset 11" in r.stdout and "Softmax: removed" in r.stdout
    m = json.loads((out / "manifest.json").read_text())
    assert m["source"]["output"]["kind"] == "probabilities" and m["artifacts"][0]["details"]["opset"] == 17
    from edgeconv_runtime import Model

    files = sorted((catsdogs_dir / "test" / "dogs").iterdir())[:4]
    import torch

    with torch.no_grad():
        want = torch.softmax(sources["model"](torch.from_numpy(_pixels(files))), 1).numpy()
    with Model.load(out, backend="onnxruntime-cpu") as model:
        got = np.array([p.probabilities for p in model.predict(files, top_k=2)])
        idx = np.array([p.indices for p in model.predict(files, top_k=2)])
    np.testing.assert_allclose(np.take_along_axis(want, idx, 1), got, atol=1e-4)
    assert runtime("verify", out, "--precision", "fp16").returncode == 0


@pytest.fixture(scope="module")
def bad_sources(tmp_path_factory):
    import torch

    root = tmp_path_factory.mktemp("bad")

    class TwoHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)

        def forward(self, x):
            f = self.conv(x).mean((2, 3))
            return f[:, :2], f[:, 2:]

    return {"two_outputs": plain_export(TwoHeads(), root / "two.onnx", (1, 3, 32, 32)),
            "tabular": plain_export(torch.nn.Linear(10, 2), root / "tabular.onnx", (1, 10)),
            "dynamic": plain_export(torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()),
                                    root / "dynamic.onnx", (1, 3, 32, 32), dynamic={0: "n", 2: "h", 3: "w"})}


@pytest.mark.parametrize("case,labels,expect", [
    ("two_outputs", "cats\ndogs\n", "has 2 outputs"),
    ("tabular", "cats\ndogs\n", "not an image batch"),
    ("dynamic", "cats\ndogs\n", "dynamic height/width"),
    ("dynamic_labels", "cats\ndogs\nbirds\n", "has 3 class names but the model outputs 2 classes"),
])
def test_bad_input_one_line_nothing_written(bad_sources, catsdogs_dir, tmp_path, case, labels, expect):
    (tmp_path / "labels.txt").write_text(labels)
    src = bad_sources["dynamic" if case == "dynamic_labels" else case]
    size = ["--size", "32,32"] if case == "dynamic_labels" else []
    out = tmp_path / "out"
    r = edgeconv("import", src, "--out", out, "--labels", tmp_path / "labels.txt", *NORM, *size, "--val-data", catsdogs_dir / "validation")
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert expect in r.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "labels.txt"]


def test_export_module_same_bundle_kind(catsdogs_tiny, tmp_path):
    """A user's own small nn.Module through the Python API: the same artifacts, gates, reference I/O and verify."""
    import torch

    from edgeconv_export import export_module
    from edgeconv_runtime.preprocess import Preprocess

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3, stride=2),
                                 torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 2))
    with torch.no_grad():
        module[-1].weight.mul_(30)  # logits of a trained model's magnitude
    out = tmp_path / "mine"
    pre = Preprocess(size=(48, 48), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    manifest = export_module(module, ["cats", "dogs"], pre, catsdogs_tiny / "train", out, val_images=catsdogs_tiny / "validation",
                             max_accuracy_drop=100)
    assert {(a.precision, a.variant) for a in manifest.artifacts} >= {("fp32", "default"), ("fp16", "default"), ("int8", "default")}
    assert manifest.parity["reference"] == "PyTorch" and manifest.source["module"].endswith("Sequential")
    assert manifest.reference["n"] == 8 and len(manifest.reference["images"]) == 8 and manifest.calibration["images"] == 80
    for precision in ("fp32", "int8"):
        v = runtime("verify", out, "--precision", precision)
        assert v.returncode == 0, v.stdout + v.stderr
    files = sorted((catsdogs_tiny / "test" / "cats").iterdir())[:3]
    from edgeconv_runtime.preprocess import preprocess_images

    with torch.no_grad():
        want = module(torch.from_numpy(preprocess_images(files, pre))).numpy()
    np.testing.assert_allclose(_logits(out, files), want, atol=1e-4)
    from edgeconv_export import export_module as again
    from edgeconv_runtime.errors import EdgeconvError

    with pytest.raises(EdgeconvError, match="already exists"):
        again(module, ["cats", "dogs"], pre, catsdogs_tiny / "train", out)


def test_import_torchvision_model_by_name_with_local_weights(catsdogs_dir, tmp_path):
    """--model torchvision:NAME --weights PATH (offline): the ImageNet head kept for 1000 labels, the model's own preprocessing."""
    import torch

    m, _, _ = recalibrated_mobilenet(catsdogs_dir / "train", 1000)
    torch.save(m.state_dict(), tmp_path / "mobilenet_v3_small.pth")
    (tmp_path / "imagenet.txt").write_text("".join(f"class {i}\n" for i in range(1000)))
    out = tmp_path / "named"
    r = edgeconv("import", "--model", "torchvision:mobilenet_v3_small", "--weights", tmp_path / "mobilenet_v3_small.pth", "--out", out,
                 "--labels", tmp_path / "imagenet.txt", "--size", SIZE, "--val-data", catsdogs_dir / "validation", "--val-size", 16,
                 "--precision", "fp32")
    assert r.returncode == 0, r.stderr
    man = json.loads((out / "manifest.json").read_text())
    assert man["name"] == "mobilenet_v3_small" and man["source"]["model"] == "torchvision:mobilenet_v3_small"
    assert man["preprocess"]["resize"] == "shorter_center_crop" and man["preprocess"]["mean"] == [0.485, 0.456, 0.406]
    files = sorted((catsdogs_dir / "test" / "cats").iterdir())[:2]
    from edgeconv_runtime import Model

    with Model.load(out, backend="onnxruntime-cpu") as model, torch.no_grad():
        np.testing.assert_allclose(model.run(model.preprocess_images(files)), m(torch.from_numpy(model.preprocess_images(files))).numpy(),
                                   atol=1e-4)
    assert runtime("verify", out).returncode == 0
