"""Registration of the BlockDrop environment ids with Gymnasium."""

from __future__ import annotations

import gymnasium as gym

ENV_ID = "BlockDrop-v0"


def register_envs() -> None:
    """Register ``BlockDrop-v0`` for ``gymnasium.make`` and ``gymnasium.make_vec``.

    ``gymnasium.make("BlockDrop-v0", checkpoint=..., dataset=..., data_dir=..., split=...)``
    builds :class:`~blockdrop_env.env.BlockDropEnv`, and
    ``gymnasium.make_vec("BlockDrop-v0", num_envs=N, vectorization_mode="vector_entry_point",
    ...)`` builds :class:`~blockdrop_env.vector_env.BlockDropVectorEnv`. Other keyword
    arguments (``penalty``, ``reward``, ``num_controlled``, ``sampling``, ``augment``,
    ``device``) go to the constructor. Calling this again does nothing.
    """
    if ENV_ID in gym.registry:
        return
    gym.register(
        id=ENV_ID,
        entry_point="blockdrop_env.env:BlockDropEnv",
        vector_entry_point="blockdrop_env.vector_env:BlockDropVectorEnv",
    )
