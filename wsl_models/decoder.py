"""A light FPN decoder: the backbone's stride-4..32 taps -> one foreground logit at stride 4.

Every CAM is 1/32 of the input; the decoder merges the finer taps of the same backbone forward
(lateral 1x1 convs, top-down bilinear upsampling, two 3x3 convs at the finest tap) so a mask
can follow gland and lesion edges. It is class-agnostic, like the localizer: which class an
image has comes from the classifier head, where its foreground is comes from here. Kept small
on purpose (32 channels): it must add at most a quarter to the members' forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

DECODER_CHANNELS = 32


class FPNDecoder(nn.Module):
    """(taps fine -> coarse) -> (B, 1, h, w) logits at the finest tap's resolution."""

    def __init__(self, tap_channels: Sequence[int], channels: int = DECODER_CHANNELS) -> None:
        super().__init__()
        if not tap_channels:
            raise ValueError("the decoder needs at least one tap")
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in tap_channels)
        groups = 8 if channels % 8 == 0 else 1
        self.smooth = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.GroupNorm(groups, channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels // 2, 3, padding=1),
            nn.ReLU(inplace=True),
        )
        self.out = nn.Conv2d(channels // 2, 1, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, taps: Sequence[torch.Tensor]) -> torch.Tensor:
        top = self.lateral[-1](taps[-1])
        for lateral, tap in zip(reversed(self.lateral[:-1]), reversed(taps[:-1]), strict=True):
            top = lateral(tap) + F.interpolate(
                top, size=tap.shape[-2:], mode="bilinear", align_corners=False
            )
        return self.out(self.smooth(top))
