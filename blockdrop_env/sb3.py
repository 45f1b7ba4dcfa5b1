"""Stable-Baselines3 support: a VecEnv over the native vector env and a CNN for small images.

Example::

    envs = BlockDropVectorEnv(model, dataset, num_envs=64)
    agent = PPO(
        "CnnPolicy",
        SB3VecEnvAdapter(envs),
        policy_kwargs=dict(features_extractor_class=SmallImageCNN),
    )
    agent.learn(100_000)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.preprocessing import is_image_space, is_image_space_channels_first
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.vec_env import VecEnv
from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices, VecEnvObs, VecEnvStepReturn
from torch import nn

from blockdrop_env.errors import ConfigError
from blockdrop_env.vector_env import BlockDropVectorEnv


class SB3VecEnvAdapter(VecEnv):
    """Present a :class:`BlockDropVectorEnv` as a Stable-Baselines3 ``VecEnv``.

    Every step ends all N one-image episodes, so every ``done`` is True, each info carries
    ``terminal_observation`` (the image just classified), ``TimeLimit.truncated=False`` and the
    finished episode's ``correct``, ``prediction``, ``label``, ``blocks_used``, ``flops``,
    ``policy`` and ``index``. The returned observations are already the next images.

    The N sub-environments share one native env. ``get_attr``, ``set_attr`` and ``env_method``
    act on it once and repeat the result for each requested index. ``seed(s)`` seeds the native
    env with ``s`` at the next ``reset``. Stable-Baselines3 gives sub-environment i the seed
    s + i, but the native env has one generator, so only the first seed is used.

    Args:
        env: The native vector env.

    Raises:
        ConfigError: if ``env`` is not a :class:`BlockDropVectorEnv`.
    """

    def __init__(self, env: BlockDropVectorEnv) -> None:
        if not isinstance(env, BlockDropVectorEnv):
            raise ConfigError(
                f"`env` must be a BlockDropVectorEnv, got {type(env).__name__}; build one with "
                "gymnasium.make_vec('BlockDrop-v0', vectorization_mode='vector_entry_point', ...)"
            )
        self.env = env
        self._actions: np.ndarray | None = None
        self._observations: np.ndarray | None = None
        super().__init__(env.num_envs, env.single_observation_space, env.single_action_space)

    def reset(self) -> VecEnvObs:
        """Draw N new images, using the seed and options set since the last reset."""
        options = self._options[0] or None
        observations, infos = self.env.reset(seed=self._seeds[0], options=options)
        self.reset_infos = _split_infos(infos, self.num_envs)
        self._reset_seeds()
        self._reset_options()
        self._observations = observations
        return observations

    def step_async(self, actions: np.ndarray) -> None:
        """Store the actions (N, K) for :meth:`step_wait`."""
        self._actions = actions

    def step_wait(self) -> VecEnvStepReturn:
        """Score the stored actions and return the next images with the rewards."""
        if self._actions is None:
            raise RuntimeError("`step_wait` called without `step_async`; call `step(actions)`")
        observations, rewards, terminations, truncations, infos = self.env.step(self._actions)
        self._actions = None
        step_infos = _split_infos(infos["final_info"], self.num_envs)
        for i, info in enumerate(step_infos):
            info["terminal_observation"] = infos["final_obs"][i]
            info["TimeLimit.truncated"] = False
        self.reset_infos = _split_infos(_without_final(infos), self.num_envs)
        self._observations = observations
        dones = terminations | truncations
        return observations, rewards.astype(np.float32), dones, step_infos

    def close(self) -> None:
        """Close the native env."""
        self.env.close()

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        """Read an attribute of the native env once per requested index."""
        value = getattr(self.env, attr_name)
        return [value for _ in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        """Set an attribute of the shared native env (all indices at once)."""
        setattr(self.env, attr_name, value)

    def env_method(
        self, method_name: str, *method_args: Any, indices: VecEnvIndices = None, **method_kwargs: Any
    ) -> list[Any]:
        """Call a method of the native env once and repeat its result per requested index."""
        result = getattr(self.env, method_name)(*method_args, **method_kwargs)
        return [result for _ in self._get_indices(indices)]

    def env_is_wrapped(
        self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None
    ) -> list[bool]:
        """Return False for each index: the native env is never wrapped by a gymnasium.Wrapper."""
        return [False for _ in self._get_indices(indices)]

    def get_images(self) -> Sequence[np.ndarray | None]:
        """Return the current images as (H, W, 3) arrays."""
        if self._observations is None:
            return [None] * self.num_envs
        return list(self._observations.transpose(0, 2, 3, 1))


def _split_infos(infos: dict[str, Any], num_envs: int) -> list[dict[str, Any]]:
    """Turn Gymnasium's dict of arrays with ``_key`` masks into one dict per sub-environment."""
    result: list[dict[str, Any]] = [{} for _ in range(num_envs)]
    for key, values in infos.items():
        if key.startswith("_"):
            continue
        mask = infos.get(f"_{key}", np.ones(num_envs, dtype=bool))
        for i in np.flatnonzero(mask):
            value = values[i]
            result[i][key] = value.item() if isinstance(value, np.generic) else value
    return result


def _without_final(infos: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in infos.items() if "final_" not in key}


class SmallImageCNN(BaseFeaturesExtractor):
    """Three-layer CNN feature extractor for small images such as CIFAR's 32x32.

    Stable-Baselines3's ``NatureCNN`` needs at least 36x36 inputs; this one works from 8x8 up:
    conv3x3(32) -> conv3x3 stride 2 (64) -> conv3x3 stride 2 (64) -> linear(features_dim).

    Input scaling: for a uint8 image space, Stable-Baselines3 already divides observations by
    255 when the policy's ``normalize_images=True`` (the default), so this extractor receives
    [0, 1] floats. With ``normalize_images=False`` pass ``scale_pixels=True`` so it divides by
    255 itself. A uint8 tensor passed directly is always divided by 255. Inputs are then
    centred by subtracting 0.5.

    Args:
        observation_space: A channel-first uint8 image space ``Box(0, 255, (C, H, W))``.
        features_dim: Size of the output feature vector.
        scale_pixels: Divide float inputs by 255 (see above).

    Raises:
        ConfigError: if the space is not a channel-first image space of at least 8x8.
    """

    def __init__(
        self, observation_space: spaces.Box, features_dim: int = 128, scale_pixels: bool = False
    ) -> None:
        _check_image_space(observation_space)
        super().__init__(observation_space, features_dim)
        self.scale_pixels = scale_pixels
        channels, height, width = observation_space.shape
        self.cnn = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        with torch.no_grad():
            flat_size = self.cnn(torch.zeros(1, channels, height, width)).shape[1]
        self.linear = nn.Sequential(nn.Linear(flat_size, features_dim), nn.ReLU())

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        """Map images (B, C, H, W) to features (B, features_dim)."""
        x = observations.float()
        if observations.dtype == torch.uint8 or self.scale_pixels:
            x = x / 255.0
        return self.linear(self.cnn(x - 0.5))


def _check_image_space(space: spaces.Space) -> None:
    if not is_image_space(space, check_channels=False):
        raise ConfigError(
            f"`observation_space` must be a uint8 image space Box(0, 255, (C, H, W)), got {space}"
        )
    if not is_image_space_channels_first(space):  # type: ignore[arg-type]
        raise ConfigError(
            f"`observation_space` must be channel-first (C, H, W), got shape {space.shape}; "
            "transpose the images, e.g. with VecTransposeImage"
        )
    if min(space.shape[1:]) < 8:
        raise ConfigError(
            f"SmallImageCNN needs images of at least 8x8, got {space.shape[1]}x{space.shape[2]}"
        )
