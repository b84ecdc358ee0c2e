"""What transfer learning needs from a pretrained backbone, written once for all of them."""
from __future__ import annotations

from torch import nn


class TransferBackbone(nn.Module):
    """Subclasses provide ``stem(x)``, ``_blocks`` (a ModuleList), ``pooled(x)`` (after the
    blocks: head convs, pooling, flatten), ``_dropout`` and ``_fc`` (the classifier)."""

    def forward_features(self, x):
        x = self.stem(x)
        for b in self._blocks:
            x = b(x)
        return self.pooled(x)

    def forward(self, x):
        return self._fc(self._dropout(self.forward_features(x)))

    def pooled_parameters(self) -> list:  # pragma: no cover - interface
        raise NotImplementedError

    def split(self, unfreeze_blocks: int) -> tuple:
        """(frozen prefix, trainable suffix, suffix's backbone parameters) with the last
        ``unfreeze_blocks`` blocks and everything after them in the suffix."""
        k = max(0, len(self._blocks) - unfreeze_blocks)
        return _Prefix(self, k), _Suffix(self, k), [p for b in self._blocks[k:] for p in b.parameters()] + self.pooled_parameters()


class _Prefix(nn.Module):
    def __init__(self, model: TransferBackbone, k: int):
        super().__init__()
        self.m, self.k = model, k

    def forward(self, x):
        x = self.m.stem(x)
        for b in self.m._blocks[: self.k]:
            x = b(x)
        return x


class _Suffix(nn.Module):
    def __init__(self, model: TransferBackbone, k: int):
        super().__init__()
        self.m, self.k = model, k

    def forward(self, x):
        for b in self.m._blocks[self.k :]:
            x = b(x)
        return self.m._fc(self.m._dropout(self.m.pooled(x)))
