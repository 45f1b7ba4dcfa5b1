"""Static block-drop policies: the same rule for every image, whatever it shows.

Each policy maps a batch of uint8 images (B, 3, H, W) to a bool policy (B, K). They are the
reference points a learned policy has to beat at equal mean blocks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from blockdrop_env.data import ImageDataset
from blockdrop_env.errors import ConfigError
from blockdrop_env.resnet import BlockDropResNet
from blockdrop_env.rewards import RewardFunction
from blockdrop_env.vector_env import BlockDropVectorEnv

POLICY_SPEC_HELP = "all | first:K (keep the first K blocks) | random:P (keep each block with probability P)"


@dataclass
class AllBlocks:
    """Keep every block: the plain ResNet."""

    num_blocks: int

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.ones(images.shape[0], self.num_blocks, dtype=torch.bool)

    @property
    def name(self) -> str:
        """Policy spec that recreates this policy."""
        return "all"


@dataclass
class FirstK:
    """Keep the first ``k`` blocks in execution order and drop the rest."""

    num_blocks: int
    k: int

    def __post_init__(self) -> None:
        if not 0 <= self.k <= self.num_blocks:
            raise ConfigError(
                f"`k` must be between 0 and the number of blocks {self.num_blocks}, got {self.k}; "
                f"use first:K with 0 <= K <= {self.num_blocks}"
            )

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        policy = torch.zeros(images.shape[0], self.num_blocks, dtype=torch.bool)
        policy[:, : self.k] = True
        return policy

    @property
    def name(self) -> str:
        """Policy spec that recreates this policy."""
        return f"first:{self.k}"


@dataclass
class RandomDrop:
    """Keep each block of each image independently with probability ``p`` (seeded)."""

    num_blocks: int
    p: float
    seed: int = 0
    _generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.p <= 1.0:
            raise ConfigError(
                f"`p` must be a keep probability in [0, 1], got {self.p}; use random:P with 0 <= P <= 1"
            )
        self._generator = torch.Generator().manual_seed(self.seed)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        draws = torch.rand(images.shape[0], self.num_blocks, generator=self._generator)
        return draws < self.p

    @property
    def name(self) -> str:
        """Policy spec that recreates this policy."""
        return f"random:{self.p:g}"


@dataclass
class FixedPolicy:
    """Keep the same blocks, ``keep[i]`` for block i, on every image."""

    keep: tuple[bool, ...]

    def __post_init__(self) -> None:
        self.keep = tuple(bool(bit) for bit in self.keep)
        if not self.keep:
            raise ConfigError("`keep` must have one entry per residual block, got an empty sequence")

    @property
    def num_blocks(self) -> int:
        """K, the number of residual blocks."""
        return len(self.keep)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.tensor(self.keep, dtype=torch.bool).expand(images.shape[0], -1).clone()

    @property
    def name(self) -> str:
        """``fixed:`` followed by one 0/1 digit per block, e.g. ``fixed:0101``."""
        return "fixed:" + "".join("1" if bit else "0" for bit in self.keep)


@dataclass
class BestFixedPolicy(FixedPolicy):
    """The fixed policy with the best mean training reward that :func:`best_fixed_policy` found.

    Attributes:
        keep: The blocks kept on every image.
        objective: Its mean reward on the search images.
        all_blocks_objective: The mean reward of keeping every block on the same images.
        num_images: Images the search evaluated each candidate on.
        history: Every candidate evaluated, as ``(keep, mean reward)`` in search order.
    """

    objective: float = math.nan
    all_blocks_objective: float = math.nan
    num_images: int = 0
    history: list[tuple[tuple[bool, ...], float]] = field(default_factory=list, repr=False)


StaticPolicy = AllBlocks | FirstK | RandomDrop | FixedPolicy

SearchObjective = Callable[[tuple[bool, ...]], float]
"""Maps a fixed policy (one bool per block) to the mean reward it earns."""


def best_fixed_policy(
    model: BlockDropResNet,
    dataset: ImageDataset,
    reward: RewardFunction,
    *,
    max_images: int | None = 1000,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> BestFixedPolicy:
    """Search for one policy for every image by greedy backward elimination on training images.

    Starting from all K blocks, each round evaluates the removal of every block still kept and
    removes the one whose removal gives the best mean reward, down to no block at all. The
    result is the best policy seen on that path, all blocks included, so its objective is never
    below that of all blocks. The search takes K (K + 1) / 2 + 1 evaluations.

    Args:
        model: The ResNet.
        dataset: Training images; the first ``max_images`` are used.
        reward: Reward function whose mean over the images is maximised.
        max_images: Images each candidate is evaluated on; None uses all of them.
        batch_size: Images per forward pass.
        device: Where the forward passes run.

    Returns:
        The best fixed policy, with its objective and the search history.

    Raises:
        ConfigError: if ``max_images`` or ``batch_size`` is not positive.
        DatasetError: if the dataset does not fit the model.
    """
    for name, value in (("max_images", max_images), ("batch_size", batch_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"`{name}` must be a positive integer, got {value!r}")
    images = dataset.sample(max_images)
    env = BlockDropVectorEnv(model, images, batch_size, reward=reward, device=device)

    def objective(keep: tuple[bool, ...]) -> float:
        return env.evaluate(FixedPolicy(keep), batch_size).mean_reward

    history = greedy_elimination(model.num_blocks, objective)
    keep, value = max(history, key=lambda item: item[1])
    return BestFixedPolicy(
        keep, objective=value, all_blocks_objective=history[0][1], num_images=len(images), history=history
    )


def greedy_elimination(num_blocks: int, objective: SearchObjective) -> list[tuple[tuple[bool, ...], float]]:
    """Drop blocks one at a time, always the one whose removal scores best; ties go to the lower index.

    Returns:
        Every evaluated ``(keep, objective)`` pair, all blocks first.
    """
    current = tuple([True] * num_blocks)
    history = [(current, objective(current))]
    while any(current):
        candidates = [_without(current, i) for i in range(num_blocks) if current[i]]
        scores = [objective(candidate) for candidate in candidates]
        history.extend(zip(candidates, scores))
        current = candidates[int(np.argmax(scores))]
    return history


def _without(keep: Sequence[bool], index: int) -> tuple[bool, ...]:
    return tuple(bit and i != index for i, bit in enumerate(keep))


def parse_policy_spec(spec: str, num_blocks: int, seed: int = 0) -> StaticPolicy:
    """Build a static policy from a spec string.

    Args:
        spec: ``all``, ``first:K`` or ``random:P``.
        num_blocks: K, the network's number of residual blocks.
        seed: Seed of ``random:P``.

    Raises:
        ConfigError: if the spec is unknown or its value is out of range.
    """
    kind, _, value = spec.strip().partition(":")
    try:
        if kind == "all" and not value:
            return AllBlocks(num_blocks)
        if kind == "first" and value:
            return FirstK(num_blocks, int(value))
        if kind == "random" and value:
            return RandomDrop(num_blocks, float(value), seed)
    except ValueError as error:
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"`policy` value in {spec!r} is not a number; expected {POLICY_SPEC_HELP}") from None
    raise ConfigError(f"`policy` must be {POLICY_SPEC_HELP}, got {spec!r}")
