"""A classic contextual-bandit learner: linear Thompson sampling over downsampled pixels.

Model. The context of an image is φ(x): the image average-pooled to ``pool_size`` x
``pool_size`` per channel, scaled to [0, 1] and centred (pixel - 0.5), plus a constant 1. The
reward of keeping the blocks ``a`` (0/1, K entries) is modelled as linear and additive over
blocks::

    r(x, a) ≈ w_0 · φ(x) + Σ_i a_i (w_i · φ(x))

which is a linear bandit on the joint features z = φ(x) ⊗ [1, a_1, ..., a_K]. The K block
effects w_i · φ(x) depend on the image, so the policy can differ per image. The model ignores
interactions between blocks: it learns each block's mean effect over the actions it explored.

Learning. Bayesian linear regression with prior w ~ N(0, noise_scale² / prior_precision · I)
and Gaussian noise of scale ``noise_scale``; after n observations the posterior is
N(A⁻¹ b, noise_scale² A⁻¹) with A = prior_precision · I + Σ z zᵀ and b = Σ r z. Each image
draws its own weights from the posterior (Thompson sampling, Agrawal and Goyal, ICML 2013) and
keeps block i when its sampled effect is positive. Evaluation uses the posterior mean.

The learner uses the vector env's public API only: ``reset``, ``current_images`` and ``step``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from blockdrop_env.errors import ConfigError

if TYPE_CHECKING:
    from agents.compare import LearningProblem
    from agents.evaluation import PolicyFn


@dataclass
class LinearThompsonBandit:
    """Linear Thompson sampling per block over downsampled-pixel features (see the module docstring).

    Attributes:
        pool_size: Side of the average-pooled image used as context; d = 3 * pool_size² + 1.
        noise_scale: Assumed standard deviation of the reward noise; larger explores longer.
        prior_precision: Ridge strength λ of the prior.
        images_seen: Images the last :meth:`fit` classified, set by it.
    """

    pool_size: int = 4
    noise_scale: float = 1.0
    prior_precision: float = 1.0
    images_seen: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.pool_size, bool) or not isinstance(self.pool_size, int) or self.pool_size < 1:
            raise ConfigError(f"`pool_size` must be a positive integer, got {self.pool_size!r}")
        for name in ("noise_scale", "prior_precision"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"`{name}` must be a finite number > 0, got {value!r}")

    @property
    def name(self) -> str:
        """Agent name in comparison tables."""
        return "bandit"

    def fit(self, problem: LearningProblem, budget_steps: int, seed: int) -> PolicyFn:
        """Learn from ``budget_steps`` images (whole batches of ``problem.batch_size``, at most the budget).

        Args:
            problem: The env configuration.
            budget_steps: Images the learner may classify.
            seed: Seed of the image order and the posterior draws.

        Returns:
            The greedy policy under the posterior mean.
        """
        num_envs = min(problem.batch_size, budget_steps)
        env = problem.make_env(num_envs)
        env.reset(seed=seed)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        state = _Posterior(self._feature_size() * (env.num_blocks + 1), self.prior_precision)

        for _ in range(budget_steps // num_envs):
            features = self.features(env.current_images)
            actions = self._sample_actions(state, features, env.num_blocks, generator)
            _, rewards, _, _, infos = env.step(actions.numpy())
            executed = torch.as_tensor(infos["final_info"]["policy"], dtype=torch.float64)
            state.update(_joint_features(features, executed), torch.as_tensor(rewards, dtype=torch.float64))

        self.images_seen = (budget_steps // num_envs) * num_envs
        weights = state.mean().view(env.num_blocks + 1, -1)
        return self._greedy_policy(weights)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Context φ(x) (B, d) in float64 on the CPU for uint8 images (B, 3, H, W)."""
        pooled = F.adaptive_avg_pool2d(images.detach().cpu().double() / 255.0, self.pool_size)
        centred = pooled.flatten(1) - 0.5
        return torch.cat([centred, torch.ones(images.shape[0], 1, dtype=torch.float64)], dim=1)

    def _feature_size(self) -> int:
        return 3 * self.pool_size**2 + 1

    def _sample_actions(
        self, state: _Posterior, features: torch.Tensor, num_blocks: int, generator: torch.Generator
    ) -> torch.Tensor:
        weights = state.sample(features.shape[0], self.noise_scale, generator)
        block_weights = weights.view(features.shape[0], num_blocks + 1, -1)[:, 1:]
        effects = torch.einsum("bkd,bd->bk", block_weights, features)
        return effects > 0

    def _greedy_policy(self, weights: torch.Tensor) -> PolicyFn:
        block_weights = weights[1:].clone()

        def policy_fn(images: torch.Tensor) -> torch.Tensor:
            effects = self.features(images) @ block_weights.T
            return (effects > 0).to(images.device)

        return policy_fn


def _joint_features(features: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """z = φ ⊗ [1, a] (B, (K + 1) d), block-major to match ``weights.view(K + 1, d)``."""
    gates = torch.cat([torch.ones(actions.shape[0], 1, dtype=torch.float64), actions], dim=1)
    return (gates[:, :, None] * features[:, None, :]).flatten(1)


class _Posterior:
    """Bayesian linear regression state: precision A and b = Σ r z."""

    def __init__(self, size: int, prior_precision: float) -> None:
        self.precision = torch.eye(size, dtype=torch.float64) * prior_precision
        self.target = torch.zeros(size, dtype=torch.float64)

    def update(self, joint: torch.Tensor, rewards: torch.Tensor) -> None:
        self.precision += joint.T @ joint
        self.target += joint.T @ rewards

    def mean(self) -> torch.Tensor:
        return torch.cholesky_solve(self.target[:, None], torch.linalg.cholesky(self.precision))[:, 0]

    def sample(self, count: int, noise_scale: float, generator: torch.Generator) -> torch.Tensor:
        """``count`` draws (count, size) from N(A⁻¹ b, noise_scale² A⁻¹)."""
        lower = torch.linalg.cholesky(self.precision)
        mean = torch.cholesky_solve(self.target[:, None], lower)[:, 0]
        normal = torch.randn(self.precision.shape[0], count, dtype=torch.float64, generator=generator)
        # A = L Lᵀ, so L⁻ᵀ ε has covariance A⁻¹.
        deviations = torch.linalg.solve_triangular(lower.T, normal, upper=True)
        return mean[None, :] + noise_scale * deviations.T
