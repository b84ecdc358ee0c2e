"""What transfer learning needs from a pretrained backbone, written once for all of them."""
from __future__ import annotations

from torch import nn


class TransferBackbone(nn.Module):
    """Subclasses provide ``stem(x)``, ``_blocks`` (a sequence of modules), ``pooled(x)`` (after the
    blocks: head convs, pooling, flatten), ``pooled_parameters()``, ``_dropout`` and the classifier
    (``_fc``, or their own ``get_classifier()``)."""

    def forward_features(self, x):
        x = self.stem(x)
        for b in self._blocks:
            x = b(x)
        return self.pooled(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    # the head/base interface training uses (timm's names): no caller reaches into private attributes
    def get_classifier(self) -> nn.Module:
        """The classifier layer: what feature extraction trains."""
        return self._fc

    def forward_head(self, features, classifier=None):
        """Dropout then the classifier (or ``classifier``, e.g. the same layer wrapped for DDP) on pooled features."""
        return (classifier or self.get_classifier())(self._dropout(features))

    def train_head(self) -> None:
        """Training mode for the head only: the frozen base keeps its batch-norm statistics."""
        self.eval()
        self._dropout.train()
        self.get_classifier().train()

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
        return self.m.forward_head(self.m.pooled(x))
