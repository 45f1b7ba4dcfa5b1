"""Registration of the BlockDrop environment ids with Gymnasium."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym

ENV_ID = "BlockDrop-v0"
SHAPES_ENV_ID = "BlockDrop-Shapes-v0"

SHAPES_CHECKPOINT = Path(__file__).resolve().parent / "weights" / "shapes_resnet32.pt"
"""CIFAR ResNet-32 (15 blocks) pre-trained on the built-in shapes set, shipped with the package."""


def register_envs() -> None:
    """Register ``BlockDrop-v0`` and ``BlockDrop-Shapes-v0`` for ``make`` and ``make_vec``.

    ``gymnasium.make("BlockDrop-v0", checkpoint=..., dataset=..., data_dir=..., split=...)``
    builds :class:`~blockdrop_env.env.BlockDropEnv`, and
    ``gymnasium.make_vec("BlockDrop-v0", num_envs=N, vectorization_mode="vector_entry_point",
    ...)`` builds :class:`~blockdrop_env.vector_env.BlockDropVectorEnv`. Other keyword
    arguments (``penalty``, ``reward``, ``num_controlled``, ``sampling``, ``augment``,
    ``device``) go to the constructor.

    ``BlockDrop-Shapes-v0`` is the same environment with defaults that need no files: the
    shipped ResNet-32 and the training split of the built-in shapes set, whose difficulty factors
    appear in ``info``. Any keyword argument overrides them. Calling this again does nothing.
    """
    if ENV_ID not in gym.registry:
        gym.register(
            id=ENV_ID,
            entry_point="blockdrop_env.env:BlockDropEnv",
            vector_entry_point="blockdrop_env.vector_env:BlockDropVectorEnv",
        )
    if SHAPES_ENV_ID not in gym.registry:
        gym.register(
            id=SHAPES_ENV_ID,
            entry_point="blockdrop_env.env:BlockDropEnv",
            vector_entry_point="blockdrop_env.vector_env:BlockDropVectorEnv",
            kwargs={"checkpoint": str(SHAPES_CHECKPOINT), "dataset": "shapes", "split": "train"},
        )
