"""Static block-drop policies: the same rule for every image, whatever it shows.

Each policy maps a batch of uint8 images (B, 3, H, W) to a bool policy (B, K). They are the
reference points a learned policy has to beat at equal mean blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from blockdrop_env.errors import ConfigError

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


StaticPolicy = AllBlocks | FirstK | RandomDrop


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
