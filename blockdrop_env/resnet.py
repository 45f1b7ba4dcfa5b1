"""ResNets whose residual blocks can be executed or skipped per sample.

Two families share one interface, :class:`BlockDropResNet`:

* :class:`CifarResNet`, depth 6n+2 (He et al. 2016, section 4.2): a 3x3 stem, three stages of
  n BasicBlocks with 16/32/64 channels, global average pooling and a linear head. The
  parameter-free shortcut where the shape changes is either "option A" (every second pixel,
  channels zero-padded on both sides) or the average-pool shortcut of the original BlockDrop
  release (2x2 average pooling, zero channels appended).
* :class:`ImageNetResNet`, torchvision's resnet18/34/50/101/152 with torchvision's own modules
  and state-dict keys.

A policy is a (B, K) tensor of 0/1 entries, one row per image and one column per residual
block in execution order. A dropped block passes its input through its shortcut only, as in
BlockDrop (Wu et al., CVPR 2018): the output is ``shortcut(x)`` instead of
``relu(shortcut(x) + residual(x))``, so a downsampling block still changes the shape.

Execution modes:

* ``"sparse"``: block i runs only on the samples that keep it (gather, run, scatter); a block
  that no sample keeps costs nothing. The fast path for inference and rollouts.
* ``"masked"``: every block runs on every sample and the output is selected per sample.
  Differentiable with respect to the ResNet's weights for every sample, so joint fine-tuning
  uses it.
* ``"full"``: the policy is ignored and every block runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock as TvBasicBlock
from torchvision.models.resnet import Bottleneck as TvBottleneck

from blockdrop_env.errors import ConfigError

ExecutionMode = Literal["sparse", "masked", "full"]
EXECUTION_MODES: tuple[str, ...] = ("sparse", "masked", "full")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

CIFAR_SHORTCUTS = ("A", "avgpool")
IMAGENET_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


@dataclass(frozen=True)
class Normalization:
    """Per-channel input normalisation applied after scaling pixels to [0, 1]."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ConfigError(
                f"`normalization` needs 3 means and 3 standard deviations, got {len(self.mean)} "
                f"and {len(self.std)}; pass one value per RGB channel"
            )
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"`normalization.std` must be positive, got {self.std}")


IMAGENET_NORMALIZATION = Normalization(IMAGENET_MEAN, IMAGENET_STD)
CIFAR10_NORMALIZATION = Normalization(CIFAR10_MEAN, CIFAR10_STD)


@dataclass(frozen=True)
class FlopsTable:
    """Multiply-adds of each part of the network for one image at the model's input size.

    Convolutions and linear layers are counted; BatchNorm, ReLU, pooling and additions are not,
    the usual convention for ResNet FLOPs (torchvision reports 7.8 G for resnet101 this way).
    """

    stem: int
    head: int
    blocks: tuple[int, ...]
    shortcuts: tuple[int, ...]

    @property
    def total(self) -> int:
        """Multiply-adds of the full network."""
        return self.stem + self.head + sum(self.blocks) + sum(self.shortcuts)

    @property
    def fixed(self) -> int:
        """Multiply-adds spent whatever the policy: stem, head and every shortcut."""
        return self.stem + self.head + sum(self.shortcuts)


class BlockDropResNet(nn.Module):
    """Base class: a stem, K residual blocks in execution order, and a classification head.

    Subclasses build the layers and implement :meth:`stem`, :meth:`head`, :meth:`residual` and
    :meth:`shortcut`; this class implements the per-sample block execution and FLOPs counting.

    Attributes:
        block_names: Name of each residual block in execution order, e.g. ``"layer3.1"``.
        num_classes: Number of output logits.
        input_size: (height, width) the network was built for; FLOPs are counted at it.
        normalization: Input normalisation used by :meth:`preprocess`, or None for [0, 1] only.
    """

    block_names: list[str]
    num_classes: int
    input_size: tuple[int, int]

    def __init__(self, normalization: Normalization | None) -> None:
        super().__init__()
        self._flops: FlopsTable | None = None
        self.set_normalization(normalization)

    # -- interface for subclasses -------------------------------------------------------------

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """Run the layers before the first residual block."""
        raise NotImplementedError

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Map the last block's feature map to logits."""
        raise NotImplementedError

    def residual(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Run the residual branch of block ``index`` (before the addition and final ReLU)."""
        raise NotImplementedError

    def shortcut(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Run the shortcut of block ``index``: the identity unless the block changes shape."""
        raise NotImplementedError

    # -- public API ------------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        """K, the number of residual blocks a policy decides on."""
        return len(self.block_names)

    @property
    def normalization(self) -> Normalization | None:
        """Input normalisation applied by :meth:`preprocess`."""
        return self._normalization

    def set_normalization(self, normalization: Normalization | None) -> None:
        """Replace the input normalisation that travels with the model."""
        self._normalization = normalization
        mean = normalization.mean if normalization else (0.0, 0.0, 0.0)
        std = normalization.std if normalization else (1.0, 1.0, 1.0)
        # Not persistent: state dicts keep the keys of the checkpoint formats they came from.
        self.register_buffer("_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Turn uint8 images (B, 3, H, W) into the normalised float input of :meth:`forward`."""
        if images.dtype != torch.uint8:
            raise ConfigError(
                f"`images` must be a uint8 tensor of pixels in 0..255, got dtype {images.dtype}; "
                "pass the images as loaded, normalisation happens here"
            )
        x = images.to(self._mean.device, non_blocking=True).float().div_(255.0)
        return (x - self._mean) / self._std

    def forward(
        self,
        x: torch.Tensor,
        policy: torch.Tensor | None = None,
        mode: ExecutionMode = "sparse",
    ) -> torch.Tensor:
        """Compute logits for a batch, executing only the blocks each sample's policy keeps.

        Args:
            x: Normalised float input (B, 3, H, W), e.g. from :meth:`preprocess`.
            policy: (B, K) tensor of 0/1 (any dtype); column i decides block i. None runs every
                block.
            mode: ``"sparse"``, ``"masked"`` or ``"full"`` (see the module docstring).

        Returns:
            Logits of shape (B, num_classes).

        Raises:
            ConfigError: if ``mode`` is unknown or ``policy`` has the wrong shape or values.
        """
        if mode not in EXECUTION_MODES:
            raise ConfigError(f"`mode` must be one of {EXECUTION_MODES}, got {mode!r}")
        if policy is None or mode == "full":
            return self._forward_full(x)
        keep = self.validate_policy(policy, batch_size=x.shape[0])
        if mode == "masked":
            return self._forward_masked(x, keep)
        return self._forward_sparse(x, keep)

    def validate_policy(self, policy: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Check that ``policy`` is a (B, K) tensor of 0/1 and return it as a bool tensor."""
        if not isinstance(policy, torch.Tensor):
            raise ConfigError(
                f"`policy` must be a torch.Tensor of shape (B, {self.num_blocks}), "
                f"got {type(policy).__name__}; convert it with torch.as_tensor"
            )
        if policy.dim() != 2 or policy.shape[1] != self.num_blocks:
            raise ConfigError(
                f"`policy` must have shape (B, {self.num_blocks}), got {tuple(policy.shape)}; "
                "pass one 0/1 column per residual block"
            )
        if batch_size is not None and policy.shape[0] != batch_size:
            raise ConfigError(
                f"`policy` has {policy.shape[0]} rows but the batch has {batch_size} images; "
                "pass one row per image"
            )
        if policy.dtype == torch.bool:
            return policy
        if not bool(((policy == 0) | (policy == 1)).all()):
            raise ConfigError("`policy` entries must be 0 or 1; threshold probabilities first")
        return policy != 0

    @property
    def flops_table(self) -> FlopsTable:
        """Per-part multiply-adds at :attr:`input_size`, counted once and cached."""
        if self._flops is None:
            self._flops = self._count_flops()
        return self._flops

    def policy_flops(self, policy: torch.Tensor) -> torch.Tensor:
        """Multiply-adds per image under ``policy`` (B, K): fixed parts plus the kept blocks."""
        table = self.flops_table
        block_flops = torch.tensor(table.blocks, dtype=torch.float64, device=policy.device)
        return table.fixed + policy.to(torch.float64) @ block_flops

    # -- execution -----------------------------------------------------------------------------

    def _forward_full(self, x: torch.Tensor) -> torch.Tensor:
        in_place = not torch.is_grad_enabled()
        x = self.stem(x)
        for i in range(self.num_blocks):
            x = _add_relu(self.residual(i, x), self.shortcut(i, x), in_place)
        return self.head(x)

    def _forward_masked(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        mask = keep.to(device=x.device, dtype=x.dtype)
        x = self.stem(x)
        for i in range(self.num_blocks):
            skip = self.shortcut(i, x)
            out = F.relu(skip + self.residual(i, x))
            m = mask[:, i].view(-1, 1, 1, 1)
            x = out * m + skip * (1.0 - m)
        return self.head(x)

    def _forward_sparse(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        batch_size = x.shape[0]
        # One host transfer for the whole policy instead of one sync per block on a GPU.
        keep_host = keep.cpu()
        counts = keep_host.sum(dim=0).tolist()
        in_place = not torch.is_grad_enabled()
        x = self.stem(x)
        for i in range(self.num_blocks):
            if counts[i] == batch_size:
                x = F.relu(self.shortcut(i, x) + self.residual(i, x))
                continue
            skip = self.shortcut(i, x)
            if counts[i] == 0:
                x = skip
                continue
            index = keep_host[:, i].nonzero().squeeze(1).to(x.device)
            # Indexing keeps a channels-last layout, which index_select would make contiguous;
            # an identity shortcut reuses the gathered rows instead of gathering twice.
            rows = x[index]
            kept = _add_relu(self.residual(i, rows), rows if skip is x else skip[index], in_place)
            if in_place and skip is not x:
                x = skip.index_copy_(0, index, kept)
            elif in_place:
                # `x` is this forward's own intermediate, so overwriting it is safe.
                x = x.index_copy_(0, index, kept)
            else:
                x = skip.index_copy(0, index, kept)
        return self.head(x)

    # -- FLOPs ------------------------------------------------------------------------------------

    def _count_flops(self) -> FlopsTable:
        device = next(self.parameters()).device
        x = torch.zeros(1, 3, *self.input_size, device=device)
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                stem, x = _count_macs(self, self.stem, x)
                blocks, shortcuts = [], []
                for i in range(self.num_blocks):
                    block_macs, _ = _count_macs(self, lambda t, i=i: self.residual(i, t), x)
                    skip_macs, x = _count_macs(self, lambda t, i=i: self.shortcut(i, t), x)
                    blocks.append(block_macs)
                    shortcuts.append(skip_macs)
                head, _ = _count_macs(self, self.head, x)
        finally:
            self.train(was_training)
        return FlopsTable(stem=stem, head=head, blocks=tuple(blocks), shortcuts=tuple(shortcuts))


ModuleT = TypeVar("ModuleT", bound=nn.Module)


def prefer_channels_last(model: ModuleT, device: torch.device | str) -> ModuleT:
    """Store the model's weights channels-last when it runs on a CPU, and return it.

    On 2 CPU cores channels-last convolutions ran 1.15x to 1.46x faster, with all blocks or half
    of them kept (benchmarks/bench_forward.py). Convolutions follow the weights' layout, and
    the block-sparse forward keeps it through its gathers. Other devices keep their layout.
    """
    if torch.device(device).type == "cpu":
        model.to(memory_format=torch.channels_last)
    return model


def _add_relu(residual: torch.Tensor, skip: torch.Tensor, in_place: bool) -> torch.Tensor:
    """relu(residual + skip), reusing the residual branch's fresh output when no graph is recorded."""
    if in_place:
        return residual.add_(skip).relu_()
    return F.relu(residual + skip)


def _count_macs(
    model: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
) -> tuple[int, torch.Tensor]:
    """Run ``fn(x)`` and count the multiply-adds of the convolutions and linear layers it calls."""
    total = 0

    def on_conv(module: nn.Conv2d, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        kh, kw = module.kernel_size
        per_output = (module.in_channels // module.groups) * kh * kw
        total += output.numel() * per_output

    def on_linear(module: nn.Linear, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        total += output.numel() * module.in_features

    handles = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(on_conv))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(on_linear))
    try:
        out = fn(x)
    finally:
        for handle in handles:
            handle.remove()
    return total, out


# ---------------------------------------------------------------------------------------------
# CIFAR family


class CifarBasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN residual branch with a parameter-free shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride
        self.in_planes = in_planes
        self.planes = planes
        self.shortcut_kind = shortcut
        self.changes_shape = stride != 1 or in_planes != planes

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """Residual branch, before the addition."""
        out = F.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(out))

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        """Identity, or the parameter-free downsampling shortcut."""
        if not self.changes_shape:
            return x
        extra = self.planes - self.in_planes
        if self.shortcut_kind == "A":
            # Option A: subsample, then pad channels equally on both sides.
            x = x[:, :, :: self.stride, :: self.stride]
            return F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))
        # Original BlockDrop release: average-pool, then append zero channels.
        x = F.avg_pool2d(x, self.stride)
        return F.pad(x, (0, 0, 0, 0, 0, extra))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Plain block: relu(shortcut + residual)."""
        return F.relu(self.shortcut(x) + self.residual(x))


class CifarResNet(BlockDropResNet):
    """CIFAR ResNet of depth 6n+2 with per-sample block execution.

    State-dict keys: ``conv1``, ``bn1``, ``layer{1,2,3}.{j}.{conv1,bn1,conv2,bn2}``, ``linear``.

    Args:
        depth: 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...); K = 3n blocks.
        num_classes: Number of output classes.
        shortcut: ``"A"`` (subsample + zero padding on both sides) or ``"avgpool"`` (2x2 average
            pooling + zero channels appended, as in the original BlockDrop release).
        normalization: Input normalisation; defaults to ImageNet statistics.
        input_size: (height, width) of the images; FLOPs are counted at this size.

    Raises:
        ConfigError: if an argument is out of range.
    """

    def __init__(
        self,
        depth: int = 32,
        num_classes: int = 10,
        shortcut: str = "A",
        normalization: Normalization | None = IMAGENET_NORMALIZATION,
        input_size: tuple[int, int] = (32, 32),
    ) -> None:
        if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6 != 0:
            raise ConfigError(
                f"`depth` must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...), got {depth!r}"
            )
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError(f"`num_classes` must be a positive integer, got {num_classes!r}")
        if shortcut not in CIFAR_SHORTCUTS:
            raise ConfigError(f"`shortcut` must be one of {CIFAR_SHORTCUTS}, got {shortcut!r}")
        super().__init__(normalization)
        self.depth = depth
        self.num_classes = num_classes
        self.shortcut_kind = shortcut
        self.input_size = (int(input_size[0]), int(input_size[1]))
        blocks_per_stage = (depth - 2) // 6

        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes = 16
        self.block_names = []
        stages = []
        for stage, (planes, stride) in enumerate(zip((16, 32, 64), (1, 2, 2)), start=1):
            layer = []
            for j in range(blocks_per_stage):
                layer.append(CifarBasicBlock(in_planes, planes, stride if j == 0 else 1, shortcut))
                in_planes = planes
                self.block_names.append(f"layer{stage}.{j}")
            stages.append(nn.Sequential(*layer))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes)
        self._blocks: list[CifarBasicBlock] = [b for s in stages for b in s]  # type: ignore[misc]
        _init_weights(self)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """conv3x3-BN-ReLU."""
        return F.relu(self.bn1(self.conv1(x)))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Global average pooling and the linear classifier."""
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def residual(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Residual branch of block ``index``."""
        return self._blocks[index].residual(x)

    def shortcut(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Shortcut of block ``index``."""
        return self._blocks[index].shortcut(x)

    def extra_repr(self) -> str:
        return f"depth={self.depth}, num_classes={self.num_classes}, shortcut={self.shortcut_kind!r}"


def _init_weights(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight)


# ---------------------------------------------------------------------------------------------
# ImageNet family (torchvision)


class ImageNetResNet(BlockDropResNet):
    """torchvision's ResNet with per-sample block execution.

    The layers are torchvision's own (``torchvision.models.resnet18`` ... ``resnet152``), so
    torchvision state dicts load unchanged. resnet101 has 33 residual blocks (3+4+23+3).

    Args:
        arch: One of ``resnet18``, ``resnet34``, ``resnet50``, ``resnet101``, ``resnet152``.
        num_classes: Number of output classes.
        normalization: Input normalisation; defaults to ImageNet statistics.
        input_size: (height, width) of the images; FLOPs are counted at this size.

    Raises:
        ConfigError: if ``arch`` or ``num_classes`` is invalid.
    """

    def __init__(
        self,
        arch: str = "resnet101",
        num_classes: int = 1000,
        normalization: Normalization | None = IMAGENET_NORMALIZATION,
        input_size: tuple[int, int] = (224, 224),
    ) -> None:
        if arch not in IMAGENET_ARCHS:
            raise ConfigError(f"`arch` must be one of {IMAGENET_ARCHS}, got {arch!r}")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError(f"`num_classes` must be a positive integer, got {num_classes!r}")
        super().__init__(normalization)
        self.arch = arch
        self.num_classes = num_classes
        self.input_size = (int(input_size[0]), int(input_size[1]))
        net = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1,
            net.layer2,
            net.layer3,
            net.layer4,
        )
        self.avgpool, self.fc = net.avgpool, net.fc
        self.block_names = []
        self._blocks: list[nn.Module] = []
        for stage in range(1, 5):
            for j, block in enumerate(getattr(self, f"layer{stage}")):
                self.block_names.append(f"layer{stage}.{j}")
                self._blocks.append(block)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """conv7x7-BN-ReLU-maxpool."""
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Global average pooling and the fully connected classifier."""
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def residual(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Residual branch of a torchvision BasicBlock or Bottleneck."""
        block = self._blocks[index]
        out = F.relu(block.bn1(block.conv1(x)))
        if isinstance(block, TvBottleneck):
            out = F.relu(block.bn2(block.conv2(out)))
            return block.bn3(block.conv3(out))
        assert isinstance(block, TvBasicBlock)
        return block.bn2(block.conv2(out))

    def shortcut(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Identity, or torchvision's 1x1 convolution + BN downsample."""
        downsample = self._blocks[index].downsample
        return x if downsample is None else downsample(x)

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, num_classes={self.num_classes}"


def build_resnet(
    arch: str,
    num_classes: int,
    *,
    shortcut: str = "A",
    normalization: Normalization | None = IMAGENET_NORMALIZATION,
    input_size: Sequence[int] | None = None,
) -> BlockDropResNet:
    """Build an untrained network from its name.

    Args:
        arch: ``cifar_resnetD`` for a CIFAR ResNet of depth D (6n+2), or a torchvision name
            ``resnet18`` ... ``resnet152``.
        num_classes: Number of output classes.
        shortcut: CIFAR shortcut kind, ``"A"`` or ``"avgpool"``; ignored for torchvision.
        normalization: Input normalisation carried by the model.
        input_size: (height, width); defaults to 32x32 for CIFAR and 224x224 for torchvision.

    Raises:
        ConfigError: if ``arch`` is not a known name.
    """
    if arch.startswith("cifar_resnet") and arch[len("cifar_resnet") :].isdigit():
        size = tuple(input_size) if input_size else (32, 32)
        return CifarResNet(
            int(arch[len("cifar_resnet") :]), num_classes, shortcut, normalization, size
        )
    if arch in IMAGENET_ARCHS:
        size = tuple(input_size) if input_size else (224, 224)
        return ImageNetResNet(arch, num_classes, normalization, size)
    raise ConfigError(
        f"`arch` must be cifar_resnet<depth> (depth 6n+2, e.g. cifar_resnet32) or one of "
        f"{IMAGENET_ARCHS}, got {arch!r}"
    )
