"""One preprocessing resolver (issue 23 §3): every path that makes a model's Preprocess (training, `edgeconv import
--model`, `edgeconv import FILE.onnx`) goes through `resolve_preprocess`, and the torchvision short names read their
weights' own transforms, as `torchvision:NAME` does."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torchvision

from edgeconv.importing import named_preprocess
from edgeconv.models import build_preprocess, get_model_entry
from edgeconv.models._registry import ModelEntry
from edgeconv.models.torchvision_backbones import BACKBONES
from edgeconv_export.importer import ImportRequest
from edgeconv_export.importer import build_preprocess as onnx_preprocess
from edgeconv_runtime.errors import EdgeconvError
from edgeconv_runtime.preprocess import JPEG_DRAFT, Preprocess, PreprocessPolicy, resolve_preprocess

FOLDERS = SimpleNamespace(kind="folders", path="data", channels=3, native_size=None)  # image folders: any size, RGB
GREY = SimpleNamespace(kind="arrays", path="mnist.npz", channels=1, native_size=(28, 28))


def _from_weights(enum) -> dict:
    """What torchvision's own eval transform does, read from the installed package."""
    t = enum.transforms()
    return {"size": (t.crop_size[0],) * 2, "crop_pct": t.crop_size[0] / t.resize_size[0], "mean": tuple(t.mean), "std": tuple(t.std),
            "interpolation": t.interpolation.value, "resize": "shorter_center_crop"}


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_torchvision_short_names_use_their_weights_transforms(name):
    v1 = getattr(torchvision.models, BACKBONES[name][0]).IMAGENET1K_V1  # the weights a short name loads
    pre = build_preprocess(name, FOLDERS, None)
    assert {k: getattr(pre, k) for k in _from_weights(v1)} == _from_weights(v1)
    if torchvision.models.get_model_weights(name).DEFAULT == v1:  # the same weights under both names: the same Preprocess
        assert pre == build_preprocess(f"torchvision:{name}", FOLDERS, None)


def test_efficientnet_b0_is_bicubic_like_its_weights():
    assert torchvision.models.get_weight("EfficientNet_B0_Weights.IMAGENET1K_V1").transforms().interpolation.value == "bicubic"
    assert build_preprocess("efficientnet_b0", FOLDERS, None).interpolation == "bicubic"  # was bilinear from a hand-typed table


def test_a_misspelt_key_is_a_one_line_error():
    entry = get_model_entry("resnet18")
    with pytest.raises(EdgeconvError, match=r"unknown preprocess override key 'interpolaton'; did you mean 'interpolation'\?") as err:
        resolve_preprocess(entry, FOLDERS, {"interpolaton": "bicubic"})
    assert "\n" not in str(err.value)
    with pytest.raises(EdgeconvError, match="unknown model 'mine' preprocess key 'men'") as err:
        ModelEntry("mine", lambda **kw: None, "mine", preprocess={"men": (0.5,)})
    assert "\n" not in str(err.value)
    with pytest.raises(EdgeconvError, match="unknown interpolation 'cubic'"):
        resolve_preprocess(entry, None, {"interpolation": "cubic"})


def test_channels_and_jpeg_draft_are_resolved_alike_on_every_path():
    tv = get_model_entry("torchvision:resnet18")
    trained = build_preprocess("torchvision:resnet18", FOLDERS, None)
    imported = named_preprocess(tv, ImportRequest("", "out"))
    onnx = onnx_preprocess(ImportRequest("m.onnx", "out", mean="0.485,0.456,0.406", std="0.229,0.224,0.225"), 3, (224, 224))
    assert trained == imported  # `edgeconv train --model torchvision:resnet18` and `edgeconv import --model torchvision:resnet18`
    assert trained.jpeg_draft is imported.jpeg_draft is onnx.jpeg_draft is JPEG_DRAFT is True
    grey = ModelEntry("grey", lambda **kw: None, "a 1-channel model", default_size=(32, 32), preprocess={"channels": 1})
    assert named_preprocess(grey, ImportRequest("", "out")).channels == 1  # the entry's channels, not a hard-coded 3
    assert resolve_preprocess(grey, FOLDERS).channels == 1  # the model's channels before the data's
    assert onnx_preprocess(ImportRequest("m.onnx", "out", mean="0.5", std="0.5"), 1, (8, 8)).channels == 1


def test_the_user_then_the_model_then_the_data_then_the_defaults():
    entry = ModelEntry("m", lambda **kw: None, "m", preprocess={"resize": "stretch", "scale": 1 / 255})  # no size, no channels
    assert resolve_preprocess(entry, GREY) == Preprocess(size=(28, 28), channels=1, mean=(0.0,), std=(1.0,), jpeg_draft=True)
    assert resolve_preprocess(entry, None).size == (150, 150)
    p = resolve_preprocess(entry, GREY, {"size": (64, 48), "resize": "letterbox", "mean": None})  # None: not passed
    assert (p.size, p.resize, p.mean) == ((64, 48), "letterbox", (0.0,))
    assert resolve_preprocess(get_model_entry("resnet18"), GREY).size == (224, 224)  # a model's own size before the data's
    assert resolve_preprocess(PreprocessPolicy(jpeg_draft=False)).jpeg_draft is False  # a policy may say otherwise
    with pytest.raises(EdgeconvError, match="needs image folders"):
        build_preprocess("resnet18", GREY, None)


def test_registry_policies_still_read_like_dicts():
    e = get_model_entry("efficientnet_lite0")
    assert isinstance(e.preprocess, PreprocessPolicy) and e.preprocess["mean"] == (0.5, 0.5, 0.5)
    assert "interpolation" not in e.preprocess and e.preprocess.get("interpolation", "bilinear") == "bilinear"
    assert dict(e.preprocess)["crop_pct"] == 1.0
