import json
import socket

import pytest
import skimage.data
import torch

from edgeconv.models import create_model, get_model_entry
from edgeconv.models.efficientnet_lite import WEIGHTS, weights_path
from edgeconv.training import TrainConfig, train
from edgeconv.data import load_dataset
from edgeconv_runtime.errors import EdgeconvError
from edgeconv_runtime.fileio import sha256_file
from edgeconv_runtime.preprocess import Preprocess, preprocess_images


@pytest.fixture(scope="module")
def lite0_imagenet():
    return create_model("efficientnet_lite0", num_classes=1000, in_channels=3, input_size=(224, 224)).eval()


def test_packaged_weights_are_the_published_file():
    assert sha256_file(weights_path("efficientnet_lite0")) == WEIGHTS["efficientnet_lite0"][3]


def test_lite0_reproduces_imagenet_classes_on_real_photos(lite0_imagenet):
    entry = get_model_entry("efficientnet_lite0")
    pre = Preprocess(size=(224, 224), channels=3, **{k: v for k, v in entry.preprocess.items() if k != "channels"})
    x = preprocess_images([skimage.data.chelsea(), skimage.data.coffee()], pre)
    with torch.no_grad():
        top1 = lite0_imagenet(torch.from_numpy(x)).argmax(1).tolist()
    assert top1 == [285, 967]  # Egyptian cat, espresso


def test_fast_feature_extraction_on_a_real_subset_beats_chance(tmp_path, catsdogs_tiny):
    res = train(TrainConfig(data=str(catsdogs_tiny), model="efficientnet_lite0", strategy="feature-extract", epochs=15,
                            out=str(tmp_path / "fe"), progress=False))
    m = res.metrics
    assert m["test_accuracy"] >= 0.85  # 32 real test photos; chance is 0.5
    assert m["transfer"]["feature_images_per_second"] > 0
    ck = torch.load(tmp_path / "fe" / "model.pt", weights_only=True)
    assert ck["strategy"] == "feature-extract" and ck["preprocess"]["resize"] == "shorter_center_crop"
    # one ordinary checkpoint: base + head, rebuilt without ImageNet weights and agreeing with the metrics
    from edgeconv.checkpoint import load_checkpoint, model_from_checkpoint

    model, pre = model_from_checkpoint(load_checkpoint(tmp_path / "fe"))
    ds = load_dataset(str(catsdogs_tiny), pre)
    x = preprocess_images(ds.test.files, pre)
    with torch.no_grad():
        acc = (model(torch.from_numpy(x)).argmax(1).numpy() == ds.test.labels).mean()
    assert acc == pytest.approx(m["test_accuracy"], abs=1 / 32 + 1e-9)


def test_fine_tune_freezes_what_it_should(catsdogs_tiny):
    """After a fine-tune step: the prefix and all batch-norm statistics are unchanged, the top blocks changed."""
    from edgeconv.training.transfer import freeze_batchnorm

    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", num_classes=2, in_channels=3, input_size=(96, 96))
    prefix, suffix, trainable = model.split(2)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable + list(model.get_classifier().parameters()):
        p.requires_grad_(True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fc_before = model.get_classifier().weight.detach().clone()
    model.train()
    freeze_batchnorm(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(4, 3, 96, 96)
    loss = torch.nn.functional.cross_entropy(suffix(prefix(x)), torch.tensor([0, 1, 0, 1]))
    loss.backward()
    opt.step()
    after = model.state_dict()
    names = {id(t): k for k, t in model.state_dict(keep_vars=True).items()}
    moving = {names[id(p)] for p in trainable + list(model.get_classifier().parameters())}
    for k in before:
        changed = not torch.equal(before[k], after[k])
        if "running_" in k or "num_batches" in k:
            assert not changed, f"batch-norm statistic {k} moved"
        elif k not in moving:
            assert not changed, f"frozen parameter {k} changed"
    assert not torch.equal(fc_before, model.get_classifier().weight)
    for block in model._blocks[-2:]:  # the unfrozen blocks did change, every conv in them
        for conv in [m for m in block.modules() if isinstance(m, torch.nn.Conv2d)]:
            k = names[id(conv.weight)]
            assert not torch.equal(before[k], after[k]), k
    assert len(moving) < len(before) / 4  # the stem and the first blocks stayed frozen


@pytest.mark.parametrize("ema", [None, 0.9])
def test_fine_tune_strategy_runs_both_phases(tmp_path, catsdogs_tiny, ema):
    res = train(TrainConfig(data=str(catsdogs_tiny), model="efficientnet_lite0", strategy="fine-tune", head_epochs=3, epochs=2,
                            unfreeze=2, out=str(tmp_path / "ft"), size=128, progress=False, ema=ema))
    phases = [h["phase"] for h in res.history]
    assert phases == ["head"] * 3 + ["fine-tune"] * 2
    assert [h["epoch"] for h in res.history] == [1, 2, 3, 4, 5]
    assert res.metrics["transfer"]["unfrozen_blocks"] == 2 and res.metrics["test_accuracy"] > 0.5
    assert res.metrics["transfer"].get("ema_decay") == ema


@pytest.mark.parametrize("head_augment", [True, False])
def test_fine_tune_head_augment_chooses_phase_1_input(tmp_path, catsdogs_tiny, monkeypatch, head_augment):
    """--no-head-augment: phase 1 trains on cached features, only phase 2 sees augmented images."""
    import edgeconv.training.transfer as transfer

    made = []

    class Recording(transfer.InMemoryLoader):
        def __init__(self, *a, **kw):
            made.append(kw.get("augment") is not None)
            super().__init__(*a, **kw)

    monkeypatch.setattr(transfer, "InMemoryLoader", Recording)
    res = train(TrainConfig(data=str(catsdogs_tiny), model="efficientnet_lite0", strategy="fine-tune", augment=True, head_augment=head_augment,
                            head_epochs=2, epochs=1, unfreeze=1, out=str(tmp_path / "ft"), size=128, progress=False))
    assert made.count(True) == (2 if head_augment else 1)  # an augmented loader for each augmented phase
    assert res.metrics["transfer"]["head_augmented"] is head_augment
    assert json.loads((tmp_path / "ft" / "model_card.json").read_text())["training"]["head_augment"] is head_augment
    assert [h["phase"] for h in res.history] == ["head"] * 2 + ["fine-tune"]


def test_weight_average_tracks_the_steps_and_swaps_back():
    from edgeconv.training.loop import WeightAverage

    torch.manual_seed(0)
    net = torch.nn.Linear(4, 2)
    frozen = torch.nn.Parameter(torch.ones(3), requires_grad=False)
    ema = WeightAverage([*net.parameters(), frozen], 0.5)
    assert len(ema.params) == 2  # only what trains is averaged
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    expected = [p.detach().clone() for p in net.parameters()]
    for step in range(1, 6):
        opt.zero_grad()
        net(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()
        ema.update()
        d = min(0.5, (1 + step) / (10 + step))
        expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, net.parameters())]
    live = [p.detach().clone() for p in net.parameters()]
    with ema.swapped():
        for p, e in zip(net.parameters(), expected):
            assert torch.allclose(p, e, atol=1e-6)
        assert not torch.allclose(net.weight, live[0])
    for p, w in zip(net.parameters(), live):
        assert torch.equal(p, w)


def test_torchvision_backbone_offline_is_one_line_error(monkeypatch, tmp_path):
    def no_network(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached download to fall back on
    with pytest.raises(EdgeconvError, match=r"cannot download ImageNet weights for resnet18 \(offline\?.*--weights PATH.*resnet18-f37072fd\.pth"):
        create_model("resnet18", num_classes=2, in_channels=3, input_size=(224, 224))


def test_torchvision_backbone_from_local_weights_file(tmp_path):
    import torchvision

    ref = torchvision.models.mobilenet_v3_small()
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    model = create_model("mobilenet_v3_small", num_classes=3, in_channels=3, input_size=(224, 224), weights=str(tmp_path / "w.pth")).eval()
    assert torch.equal(model.stem[0].weight, ref.features[0][0].weight)
    assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 3)
    with pytest.raises(EdgeconvError, match="--weights file not found"):
        create_model("resnet18", 2, 3, (224, 224), weights=str(tmp_path / "none.pth"))


def test_strategy_errors():
    with pytest.raises(EdgeconvError, match="has no pretrained weights"):
        TrainConfig(data="mnist-5k", model="chollet_mnist", out="x", strategy="fine-tune").resolved()
    with pytest.raises(EdgeconvError, match="use it with --strategy fine-tune"):
        TrainConfig(data="x", model="efficientnet_lite0", out="x", strategy="feature-extract", ema=0.99).resolved()
    with pytest.raises(EdgeconvError, match="not a decay in"):
        TrainConfig(data="x", model="efficientnet_lite0", out="x", strategy="fine-tune", ema=1.5).resolved()
    with pytest.raises(EdgeconvError, match="takes RGB images"):
        create_model("efficientnet_lite0", 10, 1, (224, 224))
