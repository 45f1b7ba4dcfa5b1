"""The policy network: a small ResNet that maps an image to one keep probability per block.

BlockDrop (Wu, Nagarajan et al., CVPR 2018) uses a 3-stage ResNet with one BasicBlock per
stage (16/32/64 channels) on 32x32 CIFAR images, and a ResNet-10 (64/128/256/512 channels,
ImageNet stem) on ImageNet images downsampled to 112x112. :meth:`PolicyConfig.for_images` picks
the same two layouts from the image size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from blockdrop_env.data import ImageDataset
from blockdrop_env.errors import ConfigError
from blockdrop_env.resnet import IMAGENET_MEAN, IMAGENET_STD

SMALL_IMAGE_MAX_SIDE = 64
SMALL_INPUT_SIZE = 32
LARGE_INPUT_SIZE = 112
SMALL_CHANNELS = (16, 32, 64)
LARGE_CHANNELS = (64, 128, 256, 512)
# Images used to estimate the per-channel statistics: enough for 3 decimals, cheap on 1.2 M images.
STATISTICS_SAMPLE = 10_000


@dataclass
class PolicyConfig:
    """Architecture and input handling of a :class:`PolicyNetwork`.

    Attributes:
        num_blocks: K, one keep probability per residual block of the ResNet.
        input_size: Side of the square network input; larger images are resized to it
            (bilinear), smaller ones are used as they are.
        channels: Output channels of each stage; stage i > 0 halves the resolution.
        layers_per_stage: BasicBlocks per stage.
        imagenet_stem: 7x7 stride-2 convolution and 3x3 max-pool (ImageNet), instead of one
            3x3 convolution (CIFAR).
        mean: Per-channel mean of the pixels scaled to [0, 1], subtracted from the input.
        std: Per-channel standard deviation the input is divided by.
    """

    num_blocks: int
    input_size: int = SMALL_INPUT_SIZE
    channels: tuple[int, ...] = SMALL_CHANNELS
    layers_per_stage: int = 1
    imagenet_stem: bool = False
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        self.mean = tuple(float(m) for m in self.mean)  # type: ignore[assignment]
        self.std = tuple(float(s) for s in self.std)  # type: ignore[assignment]
        _require_positive_int(self.num_blocks, "num_blocks")
        _require_positive_int(self.input_size, "input_size")
        _require_positive_int(self.layers_per_stage, "layers_per_stage")
        increasing = all(a <= b for a, b in zip(self.channels, self.channels[1:]))
        if not self.channels or any(c < 1 for c in self.channels) or not increasing:
            raise ConfigError(
                f"`channels` must be one or more positive, non-decreasing integers, got "
                f"{self.channels}; e.g. (16, 32, 64)"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise ConfigError(
                f"`mean` and `std` need 3 values each with std > 0, got {self.mean} and "
                f"{self.std}; pass one value per RGB channel"
            )

    @classmethod
    def for_images(
        cls,
        num_blocks: int,
        image_size: tuple[int, int],
        *,
        input_size: int | None = None,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> PolicyConfig:
        """Choose the paper's layout for images of ``image_size`` (height, width).

        Images up to 64 px a side get the CIFAR network at 32x32; larger ones the ResNet-10
        layout at 112x112.

        Args:
            num_blocks: K.
            image_size: (height, width) of the dataset's images.
            input_size: Overrides the input side chosen from the image size.
            mean: Per-channel input mean, e.g. from :func:`image_statistics`.
            std: Per-channel input standard deviation.

        Raises:
            ConfigError: if a value is out of range.
        """
        small = max(image_size) <= SMALL_IMAGE_MAX_SIDE
        default_size = SMALL_INPUT_SIZE if small else LARGE_INPUT_SIZE
        return cls(
            num_blocks=num_blocks,
            input_size=default_size if input_size is None else input_size,
            channels=SMALL_CHANNELS if small else LARGE_CHANNELS,
            imagenet_stem=not small,
            mean=mean,
            std=std,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (lists for tuples) for JSON files and weights-only checkpoints."""
        data = dataclasses.asdict(self)
        return {key: list(value) if isinstance(value, tuple) else value for key, value in data.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PolicyConfig:
        """Inverse of :meth:`to_dict`.

        Raises:
            ConfigError: if a field is unknown, missing or out of range.
        """
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown policy configuration field(s) {unknown}; expected {sorted(names)}")
        try:
            return cls(**data)
        except TypeError as error:
            raise ConfigError(f"invalid policy configuration {dict(data)!r}: {error}") from None


class PolicyNetwork(nn.Module):
    """Small ResNet over uint8 images giving K keep probabilities (sigmoid outputs).

    The network normalises its own input with the ``mean``/``std`` buffers, so it takes images
    exactly as the environment shows them.

    Args:
        config: Architecture and input handling.
    """

    def __init__(self, config: PolicyConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("mean", torch.tensor(config.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(config.std).view(1, 3, 1, 1))
        self.stem = _build_stem(config.channels[0], config.imagenet_stem)
        self.stages = _build_stages(config.channels, config.layers_per_stage)
        self.logits = nn.Linear(config.channels[-1], config.num_blocks)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    @property
    def num_blocks(self) -> int:
        """K, the number of keep probabilities."""
        return self.config.num_blocks

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Turn uint8 images (B, 3, H, W) into the normalised, resized float input.

        Raises:
            ConfigError: if ``images`` is not a uint8 tensor (B, 3, H, W).
        """
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ConfigError(
                f"`images` must be a uint8 tensor (B, 3, H, W), got dtype {images.dtype} and "
                f"shape {tuple(images.shape)}; pass the observations as the env returns them"
            )
        x = images.to(self.mean.device, non_blocking=True).float().div_(255.0)
        x = (x - self.mean) / self.std
        size = self.config.input_size
        if max(x.shape[2], x.shape[3]) > size:
            # At an exact factor of 2 this equals the 2x2 average pooling of the original release.
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Keep probabilities (B, K) in (0, 1) for uint8 images (B, 3, H, W)."""
        x = self.stem(self.preprocess(images))
        x = self.stages(x)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return torch.sigmoid(self.logits(x))


def _build_stem(channels: int, imagenet_stem: bool) -> nn.Sequential:
    if imagenet_stem:
        return nn.Sequential(
            nn.Conv2d(3, channels, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True)
    )


def _build_stages(channels: tuple[int, ...], layers_per_stage: int) -> nn.Sequential:
    # The release's ImageNet policy used 1x1-convolution shortcuts and ImageNet weights. Here
    # every stage uses the average-pool shortcut and random weights, because nothing is downloaded.
    blocks = []
    in_planes = channels[0]
    for stage, planes in enumerate(channels):
        for layer in range(layers_per_stage):
            stride = 2 if stage > 0 and layer == 0 else 1
            blocks.append(_PlainBlock(in_planes, planes, stride))
            in_planes = planes
    return nn.Sequential(*blocks)


class _PlainBlock(nn.Module):
    """BasicBlock (two 3x3 convolutions) with a parameter-free average-pool shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride
        self.extra_channels = planes - in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """relu(shortcut(x) + residual(x))."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x
        if self.stride != 1:
            # ceil_mode matches the strided convolution's output size on odd inputs.
            shortcut = F.avg_pool2d(shortcut, self.stride, ceil_mode=True)
        if self.extra_channels:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.extra_channels))
        return F.relu(shortcut + out)


def image_statistics(dataset: ImageDataset, max_images: int = STATISTICS_SAMPLE) -> tuple[
    tuple[float, float, float], tuple[float, float, float]
]:
    """Per-channel mean and standard deviation of the pixels scaled to [0, 1].

    Args:
        dataset: The images; the first ``max_images`` are used.
        max_images: Upper bound on the images read.

    Returns:
        ``(mean, std)``, three values each; std is at least 1e-3 so that a constant channel
        does not divide by zero.
    """
    images = dataset.images[:max_images]
    total = torch.zeros(3, dtype=torch.float64)
    total_sq = torch.zeros(3, dtype=torch.float64)
    for start in range(0, images.shape[0], 1000):
        chunk = images[start : start + 1000].to(torch.float64).div_(255.0)
        total += chunk.sum(dim=(0, 2, 3))
        total_sq += chunk.pow(2).sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (total_sq / count - mean.pow(2)).clamp_min(1e-6).sqrt().clamp_min(1e-3)
    return tuple(mean.tolist()), tuple(std.tolist())  # type: ignore[return-value]


def _require_positive_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"`{name}` must be a positive integer, got {value!r}")


def controlled_mask(num_blocks: int, num_controlled: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool (K,) mask of the blocks under the agent's control: the last ``num_controlled``.

    Raises:
        ConfigError: if ``num_controlled`` is not in 1..K.
    """
    if isinstance(num_controlled, bool) or not isinstance(num_controlled, int) or not 1 <= num_controlled <= num_blocks:
        raise ConfigError(
            f"`num_controlled` must be an integer in 1..{num_blocks} (trailing blocks the agent "
            f"controls), got {num_controlled!r}"
        )
    mask = torch.zeros(num_blocks, dtype=torch.bool, device=device)
    mask[num_blocks - num_controlled :] = True
    return mask


def threshold_policy(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Greedy policy (B, K): keep a block when p >= 0.5; blocks outside ``mask`` always run."""
    return (probs >= 0.5) | ~mask
