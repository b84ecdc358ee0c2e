"""The small convnets of Chollet, *Deep Learning with Python*, chapter 5."""
from __future__ import annotations

import torch
from torch import nn

from edgeconv_runtime.errors import EdgeconvError

from ._registry import register_model

DOWNSAMPLING = ("max", "avg", "stride")


def _conv_stack(in_channels: int, widths: list, downsample_after: list, downsample: str) -> nn.Sequential:
    """3x3 valid convolutions with ReLU; after each flagged one, 2x downsampling.

    ``max``/``avg`` add a 2x2 pooling layer (the book uses max); ``stride`` instead gives
    that convolution stride 2, so the network learns its own downsampling.
    """
    if downsample not in DOWNSAMPLING:
        raise EdgeconvError(f"unknown downsampling {downsample!r}; use one of {', '.join(DOWNSAMPLING)}")
    layers: list = []
    c = in_channels
    for width, down in zip(widths, downsample_after):
        stride = 2 if (down and downsample == "stride") else 1
        layers += [nn.Conv2d(c, width, 3, stride=stride), nn.ReLU(inplace=True)]
        if down and downsample == "max":
            layers.append(nn.MaxPool2d(2))
        elif down and downsample == "avg":
            layers.append(nn.AvgPool2d(2))
        c = width
    return nn.Sequential(*layers)


def _flat_features(features: nn.Module, in_channels: int, input_size: tuple) -> int:
    try:
        with torch.no_grad():
            out = features(torch.zeros(1, in_channels, *input_size))
    except RuntimeError as exc:
        raise EdgeconvError(f"input size {input_size} is too small for this network; use larger images") from exc
    if out.numel() == 0 or min(out.shape[2:]) < 1:
        raise EdgeconvError(f"input size {input_size} is too small for this network; use larger images")
    return int(out.numel())


def _keras_init(m: nn.Module) -> None:
    """Keras' defaults, as in the book: Glorot-uniform weights, zero biases.

    PyTorch's default (Kaiming-uniform with a=sqrt(5)) starts these small nets noticeably
    slower; with the book's init, 5 epochs reach the book's figures.
    """
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        nn.init.xavier_uniform_(m.weight)
        nn.init.zeros_(m.bias)


class CholletNet(nn.Module):
    """Convolutional base + flatten + (dropout) + dense head, as in the book."""

    def __init__(self, features: nn.Sequential, flat: int, hidden: int, num_classes: int, dropout: float):
        super().__init__()
        self.features = features
        head = [nn.Flatten()]
        if dropout > 0:
            head.append(nn.Dropout(dropout))
        head += [nn.Linear(flat, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes)]
        self.classifier = nn.Sequential(*head)
        self.apply(_keras_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model(
    "chollet_mnist",
    "Conv(32)-Pool-Conv(64)-Pool-Conv(64)-Dense(64)-Dense(N): the book's MNIST convnet",
    listed_example={"num_classes": 10, "in_channels": 1, "input_size": (28, 28)},
    preprocess={"resize": "stretch", "scale": 1 / 255},
    train_defaults={"optimizer": "rmsprop", "lr": 1e-3, "batch_size": 64, "augment_preset": "digits"},
)
def chollet_mnist(num_classes: int, in_channels: int, input_size: tuple, downsample: str = "max", dropout: float = 0.0):
    features = _conv_stack(in_channels, [32, 64, 64], [True, True, False], downsample)
    return CholletNet(features, _flat_features(features, in_channels, input_size), 64, num_classes, dropout)


@register_model(
    "chollet_catsdogs",
    "Conv 32-64-128-128 with pooling, Dropout(0.5), Dense(512): the book's cats-vs-dogs convnet",
    default_size=(150, 150),
    listed_example={"num_classes": 2, "in_channels": 3, "input_size": (150, 150)},
    preprocess={"resize": "stretch", "scale": 1 / 255},
    train_defaults={"optimizer": "rmsprop", "lr": 1e-4, "batch_size": 32, "augment_preset": "book"},
)
def chollet_catsdogs(num_classes: int, in_channels: int, input_size: tuple, downsample: str = "max", dropout: float = 0.5):
    features = _conv_stack(in_channels, [32, 64, 128, 128], [True, True, True, True], downsample)
    return CholletNet(features, _flat_features(features, in_channels, input_size), 512, num_classes, dropout)
