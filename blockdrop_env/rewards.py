"""Reward functions: how much a correct, cheap prediction is worth against a wrong one.

A reward function maps a batch of outcomes to one reward per image::

    reward_fn(correct, policy, flops, model) -> rewards (B,)

with ``correct`` a bool tensor (B,), ``policy`` the executed 0/1 policy (B, K), ``flops`` the
multiply-adds each image cost (B,) and ``model`` the :class:`BlockDropResNet` that ran. Any
callable of that form can be passed to the environments; the two here validate their
arguments once, when they are built.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from blockdrop_env.errors import ConfigError
from blockdrop_env.resnet import BlockDropResNet

# The original BlockDrop release fine-tunes ResNet-110 on CIFAR-10 with `--penalty -10`, and its
# published CIFAR-10 checkpoint is the gamma=10 one. Its curriculum script defaults to -1.
DEFAULT_PENALTY = 10.0


@runtime_checkable
class RewardFunction(Protocol):
    """Callable that turns a batch of outcomes into one reward per image."""

    def __call__(
        self,
        correct: torch.Tensor,
        policy: torch.Tensor,
        flops: torch.Tensor,
        model: BlockDropResNet,
    ) -> torch.Tensor:
        """Compute rewards.

        Args:
            correct: bool tensor (B,), whether the prediction matched the label.
            policy: Executed 0/1 policy (B, K), after the curriculum forced blocks on.
            flops: Multiply-adds spent on each image (B,).
            model: The network that made the predictions.

        Returns:
            float32 tensor (B,) on the device of ``correct``.
        """
        ...


def _validate_penalty(penalty: float) -> float:
    try:
        value = float(penalty)
    except (TypeError, ValueError):
        raise ConfigError(
            f"`penalty` must be a finite number >= 0, got {penalty!r}; pass e.g. penalty=10"
        ) from None
    if not math.isfinite(value) or value < 0:
        raise ConfigError(
            f"`penalty` must be a finite number >= 0, got {penalty!r}; it is the size of the "
            "negative reward for a wrong prediction, e.g. penalty=10"
        )
    if value == 0:
        warnings.warn(
            "`penalty` is 0: a wrong prediction then earns 0, the same as a correct one with "
            "every block, so dropping every block is never worse than running the whole "
            "network; use a positive penalty (the BlockDrop release used 5 to 10)",
            stacklevel=3,
        )
    return value


@dataclass(frozen=True)
class BlockUsageReward:
    """The BlockDrop reward: ``1 - (blocks used / K)**2`` if correct, ``-penalty`` if wrong.

    Args:
        penalty: gamma in Wu et al. (CVPR 2018); finite and >= 0. 0 is legal but warns, because
            dropping every block is then never worse than the whole network.

    Raises:
        ConfigError: if ``penalty`` is negative, NaN or infinite.
    """

    penalty: float = DEFAULT_PENALTY

    def __post_init__(self) -> None:
        object.__setattr__(self, "penalty", _validate_penalty(self.penalty))

    def __call__(
        self,
        correct: torch.Tensor,
        policy: torch.Tensor,
        flops: torch.Tensor,
        model: BlockDropResNet,
    ) -> torch.Tensor:
        """Compute the reward of each image from the fraction of blocks it used."""
        usage = policy.to(torch.float32).mean(dim=1)
        return _sparse_or_penalty(correct, usage, self.penalty)


@dataclass(frozen=True)
class FlopsReward:
    """Like :class:`BlockUsageReward` but counts multiply-adds: ``1 - (flops / full flops)**2``.

    Blocks differ in cost (a downsampling block of a CIFAR ResNet costs about as much as the
    others, a torchvision Bottleneck in layer4 does not), so this rewards saving compute rather
    than saving blocks. The stem, head and shortcuts always run, so the cheapest policy still
    scores below 1.

    Args:
        penalty: Size of the negative reward for a wrong prediction; finite and >= 0.

    Raises:
        ConfigError: if ``penalty`` is negative, NaN or infinite.
    """

    penalty: float = DEFAULT_PENALTY

    def __post_init__(self) -> None:
        object.__setattr__(self, "penalty", _validate_penalty(self.penalty))

    def __call__(
        self,
        correct: torch.Tensor,
        policy: torch.Tensor,
        flops: torch.Tensor,
        model: BlockDropResNet,
    ) -> torch.Tensor:
        """Compute the reward of each image from its share of the full network's FLOPs."""
        usage = flops.to(torch.float32) / float(model.flops_table.total)
        return _sparse_or_penalty(correct, usage, self.penalty)


def _sparse_or_penalty(correct: torch.Tensor, usage: torch.Tensor, penalty: float) -> torch.Tensor:
    sparse = 1.0 - usage.to(correct.device) ** 2
    return torch.where(correct, sparse, torch.full_like(sparse, -penalty))
