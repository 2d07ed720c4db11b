"""Multi-head GAN discriminator on the fake teacher's encoder (docs/algorithm.md §4, "Multi-head GAN").

One head per tapped map (every down block and the mid block): Conv1x1(C -> 1, bias) + global average
pool -> one scalar; the logit is the mean over heads. The heads are built at construction from the
backbone config (never lazily from a dummy forward, docs/algorithm.md §10.9).
"""
from __future__ import annotations

import torch
from torch import nn

from unidad_dist.models.backbones import feature_channels


class GanHeads(nn.Module):
    def __init__(self, channels: list[int]):
        super().__init__()
        self.heads = nn.ModuleList([nn.Conv2d(c, 1, kernel_size=1, bias=True) for c in channels])

    @classmethod
    def for_backbone(cls, unet_config: dict) -> "GanHeads":
        return cls(feature_channels(unet_config))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        if len(features) != len(self.heads):
            raise ValueError(f"{len(features)} feature maps for {len(self.heads)} heads")
        logits = [head(f.to(head.weight.dtype)).float().mean(dim=(1, 2, 3)) for head, f in zip(self.heads, features)]
        return torch.stack(logits, dim=0).mean(dim=0)
