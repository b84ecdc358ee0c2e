"""The book's data augmentation, per sample, with torchvision.transforms.v2."""
from __future__ import annotations

from typing import Optional

from edgeconv_runtime.errors import EdgeconvError

# Chollet ch. 5: rotation 40 deg, shifts 0.2, shear 0.2, zoom 0.2, horizontal flip.
# Digits get a milder set without flips: a mirrored 2 is not a 2.
PRESETS = {
    "book": {"degrees": 40.0, "translate": 0.2, "shear": 11.5, "zoom": 0.2, "hflip": True},
    "light": {"degrees": 15.0, "translate": 0.1, "shear": 5.0, "zoom": 0.1, "hflip": True},
    "digits": {"degrees": 10.0, "translate": 0.1, "shear": 5.0, "zoom": 0.1, "hflip": False},
}


def build_augmentation(preset: Optional[str]):
    """A callable mapping one uint8 CHW tensor to an augmented uint8 CHW tensor (or None)."""
    if preset in (None, "none"):
        return None
    if preset not in PRESETS:
        raise EdgeconvError(f"unknown augmentation preset {preset!r}; use one of {', '.join(PRESETS)} or none")
    from torchvision.transforms import v2

    p = PRESETS[preset]
    ops = [
        v2.RandomAffine(
            degrees=p["degrees"],
            translate=(p["translate"], p["translate"]),
            scale=(1 - p["zoom"], 1 + p["zoom"]),
            shear=p["shear"],
            interpolation=v2.InterpolationMode.BILINEAR,
        )
    ]
    if p["hflip"]:
        ops.append(v2.RandomHorizontalFlip())
    return v2.Compose(ops)
