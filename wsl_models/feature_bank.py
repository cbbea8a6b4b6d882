"""A frozen trunk's outputs for a few augmented views of every training image, computed once.

Measured on GlaS (``bench/train_time.py --anatomy``): an epoch of the whole-backbone trainer
spends about 60-68 % of its time in the backward pass and 25-33 % in the forward, 4 % on
augmentation. Fine-tuning with frozen BatchNorm and a 10x lower backbone learning rate barely
moves the lower stages, so the trainer freezes everything below the last stage (the member's
``split``), runs it once per image and view here, and each epoch trains only the top on a view
drawn at random, flipped at random in feature space. An epoch then costs the top's forward and
backward (a third of the network's FLOPs, and no backward through the rest).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import ImageDataset
from .members import Member, channels_last

# At most this many bytes of trunk outputs per member: fewer views are cached beyond it.
DEFAULT_BUDGET_MB = 2048


@dataclass
class FeatureBank:
    """``features[v, i]``: the trunk's output of view v of image i; ``targets[v, i]`` the pixel
    target augmented with it (PixelDataset), else None."""

    features: torch.Tensor  # (V, N, C, h, w) float32
    labels: torch.Tensor  # (N,) int64, -1 unlabelled
    targets: torch.Tensor | None  # (V, N, H, W) uint8
    kinds: torch.Tensor | None  # (N,) int64

    @property
    def views(self) -> int:
        return self.features.shape[0]

    def __len__(self) -> int:
        return self.features.shape[1]

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        member: Member,
        ds: ImageDataset,
        views: int,
        device: torch.device,
        batch_size: int = 16,
        budget_mb: float = DEFAULT_BUDGET_MB,
        trunk_stride: int = 16,
    ) -> FeatureBank:
        """``views`` draws of ``ds`` (one when it does not augment) through the frozen trunk.

        View 0 of an augmenting dataset is augmented too: every view is a sample of the same
        augmentation the whole-backbone trainer draws each epoch.
        """
        was_training = member.training
        member.eval()
        n = len(ds)
        views = max(1, views if ds.augment is not None else 1)
        feats, targets = [], []
        try:
            with channels_last(member):
                for v in range(views):
                    chunks, tchunks = [], []
                    for start in range(0, n, batch_size):
                        items = [ds[i] for i in range(start, min(start + batch_size, n))]
                        x = torch.stack([it[0] for it in items]).to(device)
                        x = x.contiguous(memory_format=torch.channels_last)
                        chunks.append(member.trunk_features(x, trunk_stride).float().contiguous())
                        if len(items[0]) == 4:
                            tchunks.append(torch.stack([it[2] for it in items]).to(device))
                    feats.append(torch.cat(chunks))
                    if tchunks:
                        targets.append(torch.cat(tchunks))
                    if v == 0:  # the budget, from the first view's size
                        per_view = feats[0].numel() * 4 + (targets[0].numel() if targets else 0)
                        views = min(views, max(1, int(budget_mb * 2**20 // max(per_view, 1))))
                    if len(feats) >= views:
                        break
        finally:
            member.train(was_training)
        kinds = getattr(ds, "kinds", None)
        return cls(
            torch.stack(feats),
            torch.tensor(ds.labels, device=device),
            torch.stack(targets) if targets else None,
            torch.tensor(kinds, device=device) if kinds is not None and targets else None,
        )

    def batch(
        self, idx: torch.Tensor, view: torch.Tensor, flip: tuple[int, ...] = ()
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(trunk output, label, target, kind) of images ``idx``, each at its ``view``;
        ``flip``: spatial dims (-1, -2) flipped, the target with its features."""
        h = self.features[view, idx]
        t = self.targets[view, idx] if self.targets is not None else None
        if flip:
            h = h.flip(flip)
            t = t.flip(flip) if t is not None else None
        k = self.kinds[idx] if self.kinds is not None else None
        return h, self.labels[idx], t, k
