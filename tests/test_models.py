import pytest
import torch

from edgeconv.models import count_parameters, create_model, get_model_entry, list_models
from edgeconv_runtime.errors import EdgeconvError


@pytest.mark.parametrize("name", list_models())
def test_registry_models_build_and_run(name):
    ex = get_model_entry(name).listed_example
    model = create_model(name, **ex).eval()
    x = torch.randn(2, ex["in_channels"], *ex["input_size"])
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, ex["num_classes"])
    assert torch.isfinite(out).all()


def test_chollet_mnist_has_the_books_parameter_count():
    model = create_model("chollet_mnist", num_classes=10, in_channels=1, input_size=(28, 28))
    assert count_parameters(model) == 93_322


def test_chollet_catsdogs_matches_the_book_plus_one_output_unit():
    # the book: 3,453,121 parameters with one sigmoid unit; two softmax units add 513
    model = create_model("chollet_catsdogs", num_classes=2, in_channels=3, input_size=(150, 150))
    assert count_parameters(model) == 3_453_121 + 513
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.5 for m in model.modules())


@pytest.mark.parametrize("downsample,layer", [("max", torch.nn.MaxPool2d), ("avg", torch.nn.AvgPool2d), ("stride", None)])
@pytest.mark.parametrize("name", ["chollet_mnist", "chollet_catsdogs"])
def test_downsampling_choices(name, downsample, layer):
    ex = get_model_entry(name).listed_example
    model = create_model(name, **ex, downsample=downsample)
    kinds = {type(m) for m in model.modules()}
    if layer is None:
        assert not kinds & {torch.nn.MaxPool2d, torch.nn.AvgPool2d}
        assert any(isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2) for m in model.modules())
    else:
        assert layer in kinds
    assert model(torch.zeros(1, ex["in_channels"], *ex["input_size"])).shape == (1, ex["num_classes"])


def test_shape_comes_from_the_data():
    # RGB 64x64 images, 5 classes: the same registry entry adapts
    model = create_model("chollet_mnist", num_classes=5, in_channels=3, input_size=(64, 64))
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 5)


def test_unknown_model_and_downsampling_are_clear_errors():
    with pytest.raises(EdgeconvError, match="unknown model"):
        create_model("vgg99", 2, 3, (32, 32))
    with pytest.raises(EdgeconvError, match="downsampling"):
        create_model("chollet_mnist", 10, 1, (28, 28), downsample="median")
    with pytest.raises(EdgeconvError, match="too small"):
        create_model("chollet_catsdogs", 2, 3, (20, 20))


def test_registry_refuses_duplicate_names():
    from edgeconv.models import register_model
    from edgeconv.models._registry import register_namespace

    original = get_model_entry("efficientnet_lite0")
    with pytest.raises(ValueError, match="'efficientnet_lite0' is already registered"):
        register_model("efficientnet_lite0", "an impostor")(lambda **kw: None)
    assert get_model_entry("efficientnet_lite0") is original
    with pytest.raises(ValueError, match="reserved for namespaces"):
        register_model("timm:mine", "a name in timm's namespace")(lambda **kw: None)
    with pytest.raises(ValueError, match="namespace 'timm' is already registered"):
        register_namespace("timm", lambda name: None)
    with pytest.raises(EdgeconvError, match="unknown timm model 'mine'"):
        get_model_entry("timm:mine")
