"""Stable-Baselines3 algorithms as block-drop learners, through :class:`SB3VecEnvAdapter`.

Any algorithm of ``stable_baselines3`` whose action spaces include ``MultiBinary`` can be named
(in 2.x: PPO and A2C). Each trains a ``CnnPolicy`` with :class:`SmallImageCNN` features and is
evaluated with deterministic prediction (a block is kept when its Bernoulli mode is 1).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np
import stable_baselines3
import torch
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.vec_env import DummyVecEnv

from blockdrop_env.errors import ConfigError
from blockdrop_env.sb3 import SB3VecEnvAdapter, SmallImageCNN

if TYPE_CHECKING:
    from agents.compare import LearningProblem
    from agents.evaluation import PolicyFn


def sb3_algorithm_names() -> list[str]:
    """Names of every algorithm class exported by ``stable_baselines3``, e.g. ``["A2C", ...]``."""
    return sorted(
        name
        for name in stable_baselines3.__all__
        if inspect.isclass(getattr(stable_baselines3, name, None))
        and issubclass(getattr(stable_baselines3, name), BaseAlgorithm)
    )


def resolve_sb3_algorithm(name: str) -> type[BaseAlgorithm]:
    """Find a ``stable_baselines3`` algorithm by name (any case) and check it supports MultiBinary.

    Raises:
        ConfigError: if no algorithm has that name, or it does not accept MultiBinary actions.
    """
    known = {algorithm.lower(): algorithm for algorithm in sb3_algorithm_names()}
    if name.lower() not in known:
        raise ConfigError(
            f"unknown Stable-Baselines3 algorithm {name!r}; stable_baselines3 "
            f"{stable_baselines3.__version__} has {sorted(known.values())}"
        )
    algorithm = getattr(stable_baselines3, known[name.lower()])
    if not supports_multibinary(algorithm):
        raise ConfigError(
            f"Stable-Baselines3 algorithm {known[name.lower()]} does not support MultiBinary "
            "actions, which BlockDrop needs (one keep bit per residual block); use one of "
            f"{[a for a in sb3_algorithm_names() if supports_multibinary(getattr(stable_baselines3, a))]}"
        )
    return algorithm


def supports_multibinary(algorithm: type[BaseAlgorithm]) -> bool:
    """Return whether the algorithm accepts a ``MultiBinary`` action space.

    SB3 passes its supported action spaces to ``BaseAlgorithm.__init__`` and checks them there,
    so this builds the algorithm on a two-bit dummy env without setting up its networks.
    """
    try:
        algorithm("MlpPolicy", DummyVecEnv([_TwoBitEnv]), _init_setup_model=False, device="cpu")
    except AssertionError as error:
        if "action space" in str(error):
            return False
        raise
    return True


class _TwoBitEnv(gym.Env[np.ndarray, np.ndarray]):
    observation_space = gym.spaces.Box(0.0, 1.0, (2,), np.float32)
    action_space = gym.spaces.MultiBinary(2)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        return np.zeros(2, np.float32), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        return np.zeros(2, np.float32), 0.0, True, False, {}


@dataclass
class SB3Learner:
    """A Stable-Baselines3 algorithm trained for a budget of images.

    Attributes:
        algorithm: Class name in ``stable_baselines3``, any case, e.g. ``"PPO"``.
        num_envs: Images per env step; None uses the problem's batch size.
        n_steps: Steps per rollout and env for on-policy algorithms (SB3's default 2048 is
            made for long episodes; every BlockDrop episode is one step).
        learning_rate: Optimiser learning rate.
        features_dim: Output size of the :class:`SmallImageCNN` feature extractor.
        algorithm_kwargs: Further keyword arguments for the algorithm's constructor.
        images_seen: Images the last :meth:`fit` classified, set by it.
    """

    algorithm: str = "PPO"
    num_envs: int | None = None
    n_steps: int = 8
    learning_rate: float = 3e-4
    features_dim: int = 128
    algorithm_kwargs: dict[str, Any] = field(default_factory=dict)
    images_seen: int = 0

    def __post_init__(self) -> None:
        self.algorithm_class = resolve_sb3_algorithm(self.algorithm)
        for name in ("n_steps", "features_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"`{name}` must be a positive integer, got {value!r}")

    @property
    def name(self) -> str:
        """Agent name in comparison tables, e.g. ``ppo``."""
        return self.algorithm_class.__name__.lower()

    def fit(self, problem: LearningProblem, budget_steps: int, seed: int) -> PolicyFn:
        """Train on at most ``budget_steps`` images and return the deterministic policy.

        On-policy algorithms learn in whole rollouts of ``n_steps * num_envs`` images, so the
        budget is rounded down to whole rollouts (at least one).

        Args:
            problem: The env configuration.
            budget_steps: Images the learner may classify.
            seed: Seed of the networks, the sampling and the image order.

        Returns:
            A function from uint8 images (B, 3, H, W) to a bool policy (B, K).
        """
        num_envs = min(self.num_envs or problem.batch_size, budget_steps)
        adapter = SB3VecEnvAdapter(problem.make_env(num_envs))
        adapter.seed(seed)
        kwargs, total_timesteps = self._algorithm_kwargs(budget_steps, num_envs)
        agent = self.algorithm_class(
            "CnnPolicy",
            adapter,
            learning_rate=self.learning_rate,
            seed=seed,
            device=problem.device,
            policy_kwargs={
                "features_extractor_class": SmallImageCNN,
                "features_extractor_kwargs": {"features_dim": self.features_dim},
            },
            **kwargs,
        )
        agent.learn(total_timesteps)
        self.images_seen = int(agent.num_timesteps)
        return _deterministic_policy(agent)

    def _algorithm_kwargs(self, budget_steps: int, num_envs: int) -> tuple[dict[str, Any], int]:
        parameters = inspect.signature(self.algorithm_class.__init__).parameters
        kwargs: dict[str, Any] = {}
        total_timesteps = budget_steps
        if "n_steps" in parameters:
            n_steps = max(1, min(self.n_steps, budget_steps // num_envs))
            rollout = n_steps * num_envs
            kwargs["n_steps"] = n_steps
            total_timesteps = max(1, budget_steps // rollout) * rollout
            if "batch_size" in parameters:
                kwargs["batch_size"] = _largest_divisor(rollout, at_most=64)
        kwargs.update(self.algorithm_kwargs)
        return kwargs, total_timesteps


def _largest_divisor(number: int, at_most: int) -> int:
    # PPO warns about a truncated last minibatch unless batch_size divides the rollout size.
    return max(d for d in range(1, min(number, at_most) + 1) if number % d == 0)


def _deterministic_policy(agent: BaseAlgorithm) -> PolicyFn:
    def policy_fn(images: torch.Tensor) -> torch.Tensor:
        actions, _ = agent.predict(images.detach().cpu().numpy(), deterministic=True)
        return torch.as_tensor(np.asarray(actions)).bool().to(images.device)

    return policy_fn
