"""Image datasets decoded once into uint8 tensors held in memory."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from blockdrop_env.errors import DatasetError

DATASET_NAMES = ("imagefolder", "cifar10", "cifar100")
SPLITS = ("train", "test")


@dataclass
class ImageDataset:
    """A labelled image set in memory.

    Attributes:
        images: uint8 tensor (N, 3, H, W), pixels as stored in the files.
        labels: int64 tensor (N,), class indices into ``classes``.
        classes: Class names in label order.
        name: Short description for logs, e.g. ``"imagefolder:/data/cifar10-jpeg/test"``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    name: str = "dataset"

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or self.images.shape[1] != 3:
            raise DatasetError(
                f"`images` must be a uint8 tensor (N, 3, H, W), got dtype {self.images.dtype} "
                f"and shape {tuple(self.images.shape)}"
            )
        if self.labels.dim() != 1 or self.labels.shape[0] != self.images.shape[0]:
            raise DatasetError(
                f"`labels` must have shape ({self.images.shape[0]},), got {tuple(self.labels.shape)}"
            )
        self.labels = self.labels.to(torch.int64)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of every image."""
        return int(self.images.shape[2]), int(self.images.shape[3])
