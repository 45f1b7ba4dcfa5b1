"""Train-time augmentation of uint8 image batches: random crop with zero padding, horizontal flip."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop_flip(images: torch.Tensor, generator: torch.Generator | None = None, padding: int = 4) -> torch.Tensor:
    """Pad each image with ``padding`` zero pixels, crop back at a random offset, flip half at random.

    The standard CIFAR augmentation (He et al. 2016). Works on uint8 or float batches
    (B, C, H, W) and returns a new tensor of the same dtype and shape. Random numbers are drawn
    on the CPU from ``generator`` so results do not depend on the device.
    """
    batch, _, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    offsets = torch.randint(0, 2 * padding + 1, (batch, 2), generator=generator)
    flips = torch.rand(batch, generator=generator) < 0.5
    rows = (offsets[:, 0:1] + torch.arange(height)).to(images.device)
    cols = (offsets[:, 1:2] + torch.arange(width)).to(images.device)
    cols = torch.where(flips.to(images.device)[:, None], cols.flip(1), cols)
    batch_index = torch.arange(batch, device=images.device)[:, None, None]
    # Advanced indexing gathers (B, H, W, C); move channels back to dimension 1.
    out = padded.permute(0, 2, 3, 1)[batch_index, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()
