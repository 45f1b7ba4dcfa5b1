"""Native vector environment: N images per step scored with one block-sparse forward."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import torch
from gymnasium import spaces
from gymnasium.error import ResetNeeded
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from blockdrop_env.env import (
    ActionLike,
    ActionScores,
    BlockDropSimulator,
    SimulatorViews,
    DatasetSource,
    IndexSampler,
    ModelSource,
    check_sampling,
    resolve_dataset,
    resolve_device,
    resolve_model,
    resolve_reward,
    validate_action,
)
from blockdrop_env.errors import ConfigError
from blockdrop_env.rewards import RewardFunction

VectorResetReturn: TypeAlias = tuple[np.ndarray, dict[str, Any]]
"""``(observations (N, 3, H, W), infos)`` returned by :meth:`BlockDropVectorEnv.reset`."""

VectorStepReturn: TypeAlias = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]
"""``(observations, rewards, terminations, truncations, infos)``, each batched over N."""

PolicyFn: TypeAlias = Callable[[torch.Tensor], ActionLike]
"""Maps uint8 images (B, 3, H, W) on the env device to actions (B, K) of 0/1."""


@dataclass(frozen=True)
class EvaluationScores:
    """Per-image outcome of one ordered pass over the dataset; tensors on the env device.

    Attributes:
        scores: :class:`ActionScores` with one row per image, in dataset order.
        labels: int64 (N,) labels in dataset order.
    """

    scores: ActionScores
    labels: torch.Tensor

    @property
    def accuracy(self) -> float:
        """Fraction of images classified correctly."""
        return float(self.scores.correct.float().mean())

    @property
    def mean_reward(self) -> float:
        """Average reward per image."""
        return float(self.scores.rewards.mean())

    @property
    def mean_blocks_used(self) -> float:
        """Average number of executed blocks per image."""
        return float(self.scores.blocks_used.float().mean())

    @property
    def mean_flops(self) -> float:
        """Average multiply-adds per image."""
        return float(self.scores.flops.mean())


class BlockDropVectorEnv(SimulatorViews, VectorEnv):
    """N BlockDrop episodes at once, classified with one block-sparse forward per step.

    The semantics of each sub-environment are those of :class:`~blockdrop_env.env.BlockDropEnv`
    (see its docstring for the action, observation and reward); this class batches them
    without running N copies.

    ## Autoreset

    Every episode lasts one step, so every step ends all N episodes and resets them in the same
    call (``metadata["autoreset_mode"] = AutoresetMode.SAME_STEP``): ``step`` returns the next
    N images together with the rewards for the previous ones. As in Gymnasium's same-step
    convention, the top-level ``infos`` describe the new images (``index``, ``label``, each with
    its ``_key`` mask), ``infos["final_info"]`` holds the finished episodes' step infos
    (``correct``, ``prediction``, ``label``, ``blocks_used``, ``flops``, ``policy`` (N, K),
    ``index``, with ``_key`` masks, all True), and ``infos["final_obs"]`` is an object array of
    the images just classified.

    ## Sampling

    ``"shuffle"`` draws batches from a fresh permutation per pass over the dataset.
    ``"sequential"`` takes images in dataset order and wraps around: a last partial batch is
    filled with images from the start of the dataset (``infos["index"]`` tells them apart). For
    an exact single pass, e.g. over 10,000 test images, use :meth:`evaluate`, whose last batch is
    just smaller.

    ## Access without copies

    On the CPU the observation array shares memory with :attr:`current_images` (uint8, on the
    env device); :attr:`current_labels` and :attr:`current_indices` describe the same batch.

    Args:
        checkpoint: A :class:`BlockDropResNet` or a checkpoint path.
        dataset: An :class:`ImageDataset` or a dataset name loaded from ``data_dir``/``split``.
        num_envs: N, images per step.
        data_dir: Directory of a dataset given by name.
        split: ``"train"`` or ``"test"`` for a dataset given by name.
        penalty: Penalty of the default reward; exclusive with ``reward``.
        reward: Reward function; defaults to :class:`BlockUsageReward`, 1 - (blocks/K)**2 or -penalty.
        num_controlled: Trailing blocks the agent controls (1..K, default K).
        sampling: ``"shuffle"`` or ``"sequential"``.
        augment: Random crop (4-pixel zero padding) and horizontal flip of drawn images.
        device: ``"cpu"`` or ``"cuda"``.

    Raises:
        ConfigError: on an invalid argument.
        DatasetError: if the dataset's classes or image size do not match the model.
    """

    metadata: dict[str, Any] = {"autoreset_mode": AutoresetMode.SAME_STEP, "render_modes": []}

    def __init__(
        self,
        checkpoint: ModelSource,
        dataset: DatasetSource,
        num_envs: int,
        *,
        data_dir: str | Path | None = None,
        split: str = "test",
        penalty: float | None = None,
        reward: RewardFunction | None = None,
        num_controlled: int | None = None,
        sampling: str = "shuffle",
        augment: bool = False,
        device: str | torch.device = "cpu",
    ) -> None:
        if isinstance(num_envs, bool) or not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
            raise ConfigError(f"`num_envs` must be a positive integer, got {num_envs!r}")
        check_sampling(sampling)
        self.simulator = BlockDropSimulator(
            resolve_model(checkpoint),
            resolve_dataset(dataset, data_dir, split),
            reward=resolve_reward(reward, penalty),
            num_controlled=num_controlled,
            augment=augment,
            device=resolve_device(device),
        )
        self.num_envs = int(num_envs)
        self.render_mode = None
        self._sampler = IndexSampler(len(self.simulator.dataset), sampling)
        height, width = self.simulator.dataset.image_size
        self.single_observation_space = spaces.Box(0, 255, (3, height, width), np.uint8)
        self.single_action_space = spaces.MultiBinary(self.simulator.num_blocks)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self._images: torch.Tensor | None = None
        self._labels: torch.Tensor | None = None
        self._indices = np.zeros(0, dtype=np.int64)

    # -- read-only views for agents --------------------------------------------------------------

    @property
    def current_images(self) -> torch.Tensor:
        """The current batch, uint8 (N, 3, H, W) on the env device; not a copy.

        Raises:
            ResetNeeded: before the first ``reset``.
        """
        return self._require_batch()[0]

    @property
    def current_labels(self) -> torch.Tensor:
        """Labels of the current batch, int64 (N,) on the env device."""
        return self._require_batch()[1]

    @property
    def current_indices(self) -> np.ndarray:
        """Dataset positions of the current batch, int64 (N,)."""
        self._require_batch()
        return self._indices.copy()

    # -- Gymnasium API ----------------------------------------------------------------------------

    def set_curriculum(self, num_controlled: int) -> None:
        """Let the agent control the last ``num_controlled`` blocks; the others always run.

        Raises:
            ConfigError: if ``num_controlled`` is not an integer in 1..K.
        """
        self.simulator.set_curriculum(num_controlled)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> VectorResetReturn:
        """Draw N new images.

        Args:
            seed: One integer; reseeds the env's generator and restarts the image order.
            options: ``{"num_controlled": k}`` changes the curriculum.

        Returns:
            Observations (N, 3, H, W) and infos with ``index`` and ``label`` arrays (N,).

        Raises:
            ConfigError: if ``seed`` is not an int or None, or on an unknown option.
        """
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
            raise ConfigError(
                f"`seed` must be an int or None, got {seed!r}; the native vector env draws all "
                "N images from one generator, so it takes one seed"
            )
        super().reset(seed=seed)
        if seed is not None:
            self._sampler.restart()
        self._apply_options(options or {})
        return self._next_batch()

    def step(self, actions: ActionLike) -> VectorStepReturn:
        """Classify the current N images with the blocks ``actions`` keep, then draw N new ones.

        Args:
            actions: (N, K) of 0/1 entries.

        Returns:
            The new observations, rewards (N,) float64, terminations (all True), truncations
            (all False) and infos in the layout described in the class docstring.

        Raises:
            ResetNeeded: before the first ``reset``.
            ConfigError: if ``actions`` is not (N, K) of 0/1 entries.
        """
        images, labels = self._require_batch()
        keep = validate_action(actions, (self.num_envs, self.num_blocks), "actions")
        scores = self.simulator.score(images, labels, keep)
        final_info = self._step_info(scores, labels)
        final_obs = self._observations_as_objects()

        observations, infos = self._next_batch()
        infos["final_info"] = final_info
        infos["_final_info"] = np.ones(self.num_envs, dtype=bool)
        infos["final_obs"] = final_obs
        infos["_final_obs"] = np.ones(self.num_envs, dtype=bool)
        rewards = scores.rewards.cpu().numpy().astype(np.float64)
        terminations = np.ones(self.num_envs, dtype=bool)
        truncations = np.zeros(self.num_envs, dtype=bool)
        return observations, rewards, terminations, truncations, infos

    def score_actions(self, actions: ActionLike) -> ActionScores:
        """Score other actions on the current N images without advancing the env or its RNG.

        Args:
            actions: (N, K) of 0/1 entries, one row per current image.

        Returns:
            :class:`ActionScores`, tensors on the env device.

        Raises:
            ResetNeeded: before the first ``reset``.
            ConfigError: if ``actions`` is not (N, K) of 0/1 entries.
        """
        images, labels = self._require_batch()
        keep = validate_action(actions, (self.num_envs, self.num_blocks), "actions")
        return self.simulator.score(images, labels, keep)

    def evaluate(self, policy_fn: PolicyFn, batch_size: int | None = None) -> EvaluationScores:
        """Run ``policy_fn`` on every image of the dataset once, in order, without augmentation.

        The env's current batch, sampler and RNG are left untouched. The last batch contains the
        remaining images only (e.g. 10,000 images in batches of 256 end with 16).

        Args:
            policy_fn: Maps uint8 images (B, 3, H, W) on the env device to actions (B, K).
            batch_size: Images per forward pass; defaults to ``num_envs``.

        Returns:
            Per-image scores and labels in dataset order.

        Raises:
            ConfigError: if ``batch_size`` is not positive or ``policy_fn`` returns a bad action.
        """
        size = batch_size or self.num_envs
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise ConfigError(f"`batch_size` must be a positive integer, got {batch_size!r}")
        parts = [self._evaluate_batch(policy_fn, start, size) for start in range(0, len(self.dataset), size)]
        merged = ActionScores(*(torch.cat(field) for field in zip(*parts)))
        return EvaluationScores(merged, self.simulator.labels_at(np.arange(len(self.dataset))))

    def close_extras(self, **kwargs: Any) -> None:
        """Release the batch tensors."""
        self._images = self._labels = None

    # -- helpers ------------------------------------------------------------------------------------

    def _apply_options(self, options: dict[str, Any]) -> None:
        unknown = set(options) - {"num_controlled"}
        if unknown:
            raise ConfigError(f"unknown reset option(s) {sorted(unknown)}; supported: 'num_controlled'")
        if "num_controlled" in options:
            self.set_curriculum(options["num_controlled"])

    def _next_batch(self) -> VectorResetReturn:
        self._indices = self._sampler.next(self.num_envs, self.np_random)
        self._images = self.simulator.draw_images(self._indices, self.np_random)
        self._labels = self.simulator.labels_at(self._indices)
        mask = np.ones(self.num_envs, dtype=bool)
        infos = {
            "index": self._indices.copy(),
            "_index": mask,
            "label": self._labels.cpu().numpy(),
            "_label": mask.copy(),
        }
        for name, values in self.simulator.factors_at(self._indices).items():
            infos[name] = values
            infos[f"_{name}"] = mask.copy()
        return self._images.cpu().numpy(), infos

    def _step_info(self, scores: ActionScores, labels: torch.Tensor) -> dict[str, np.ndarray]:
        values = {
            "correct": scores.correct.cpu().numpy(),
            "prediction": scores.predictions.cpu().numpy(),
            "label": labels.cpu().numpy(),
            "blocks_used": scores.blocks_used.cpu().numpy(),
            "flops": scores.flops.cpu().numpy(),
            "policy": scores.policy.cpu().numpy().astype(np.int8),
            "index": self._indices.copy(),
            **self.simulator.factors_at(self._indices),
        }
        info: dict[str, np.ndarray] = {}
        for key, value in values.items():
            info[key] = value
            info[f"_{key}"] = np.ones(self.num_envs, dtype=bool)
        return info

    def _observations_as_objects(self) -> np.ndarray:
        observations = self.current_images.cpu().numpy()
        array = np.empty(self.num_envs, dtype=object)
        for i in range(self.num_envs):
            array[i] = observations[i]
        return array

    def _evaluate_batch(self, policy_fn: PolicyFn, start: int, size: int) -> ActionScores:
        indices = np.arange(start, min(start + size, len(self.dataset)))
        images = self.simulator.draw_images(indices, rng=None)
        actions = policy_fn(images)
        keep = validate_action(actions, (len(indices), self.num_blocks), "policy_fn(images)")
        return self.simulator.score(images, self.simulator.labels_at(indices), keep)

    def _require_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._images is None or self._labels is None:
            raise ResetNeeded("no images yet; call `envs.reset()` first")
        return self._images, self._labels
