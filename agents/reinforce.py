"""REINFORCE with a curriculum: the reference BlockDrop agent on a frozen ResNet.

One training step, as in BlockDrop (Wu, Nagarajan et al., CVPR 2018) and its release
(``cl_training.py``):

1. The policy network gives keep probabilities p (B, K) for the current images.
2. Exploration bounds them, p' = alpha * p + (1 - alpha) * (1 - p), and an action is sampled
   from Bernoulli(p') per block.
3. The self-critical baseline is the reward of the thresholded policy (p >= 0.5) on the same
   images, obtained with ``env.score_actions`` before the env advances.
4. ``env.step`` executes the sampled actions; advantage = r_sampled - r_baseline.
5. Loss = -mean_b(advantage_b * sum_i log Bernoulli(a_bi; p'_bi)) - beta * mean_b(entropy_b),
   with both sums restricted to the blocks under the agent's control.

Curriculum: the agent first controls the last ``blocks_per_stage`` blocks and gains
``blocks_per_stage`` more every ``epochs_per_stage`` epochs until it controls all K; the
others are forced on. The release adds one block per epoch.

The agent uses the environment only through its public API: the vector env's ``reset``,
``step``, ``set_curriculum``, ``score_actions``, ``current_images`` and ``model``.
"""

from __future__ import annotations

import math
import random
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.distributions import Bernoulli
from tqdm.auto import tqdm

from agents.agent_checkpoint import agent_policy_fn, agent_state
from agents.distributed import (
    barrier,
    broadcast_buffers,
    evaluate_sharded,
    gather_objects,
    local_device,
    max_over_ranks,
    rank_seed,
    reseed_torch_per_rank,
    shard_dataset,
    wrap_ddp,
)
from agents.policy import PolicyConfig, PolicyNetwork, controlled_mask, image_statistics, threshold_policy
from agents.runs import BEST_CHECKPOINT, LAST_CHECKPOINT, RunDirectory, capture_rng_state, restore_rng_state
from blockdrop_env.data import ImageDataset, check_same_classes, load_dataset
from blockdrop_env.errors import CheckpointError, ConfigError, TrainingError
from blockdrop_env.resnet import BlockDropResNet, prefer_channels_last
from blockdrop_env.rewards import BlockUsageReward, RewardFunction
from blockdrop_env.vector_env import BlockDropVectorEnv

EpochCallback = Callable[[int, Mapping[str, float]], None]
"""Called after each epoch with the epoch (from 0) and its metrics."""

SELECTION_METRIC = "test/reward"
# Options that may change when a run is resumed; any other difference is an error. The number
# of processes may change too, and sync_bn only matters with several.
RESUMABLE_CHANGES = ("epochs", "device", "run_dir", "sync_bn")


# ---------------------------------------------------------------------------------------------
# Policy-gradient pieces


def bound_probabilities(probs: torch.Tensor, alpha: float) -> torch.Tensor:
    """Exploration bound p' = alpha * p + (1 - alpha) * (1 - p), so p' lies in [1 - alpha, alpha]."""
    return alpha * probs + (1.0 - alpha) * (1.0 - probs)


def sample_actions(probs: torch.Tensor, alpha: float, mask: torch.Tensor) -> torch.Tensor:
    """Sample a bool policy (B, K) from Bernoulli(p'); blocks outside ``mask`` are forced on.

    Draws from torch's global generator on the device of ``probs``.
    """
    bounded = bound_probabilities(probs.detach(), alpha)
    return torch.bernoulli(bounded).bool() | ~mask


class PolicyLoss(NamedTuple):
    """Terms of the REINFORCE loss, each a scalar tensor.

    Attributes:
        total: What is minimised: ``policy - beta * entropy``.
        policy: -mean(advantage * log-probability of the sampled action).
        entropy: Mean over images of the Bernoulli entropy summed over controlled blocks.
    """

    total: torch.Tensor
    policy: torch.Tensor
    entropy: torch.Tensor


def policy_gradient_loss(
    probs: torch.Tensor,
    actions: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    alpha: float,
    beta: float,
) -> PolicyLoss:
    """REINFORCE loss with an entropy bonus over the controlled blocks.

    Args:
        probs: Keep probabilities p (B, K) from the policy network, with gradients.
        actions: Sampled 0/1 policy (B, K).
        advantages: r_sampled - r_baseline (B,).
        mask: Bool (K,), the blocks under the agent's control; the others add nothing.
        alpha: Exploration bound used when sampling.
        beta: Weight of the entropy bonus.

    Returns:
        The loss and its terms.
    """
    distribution = Bernoulli(probs=bound_probabilities(probs, alpha))
    weight = mask.to(probs.dtype)
    log_prob = (distribution.log_prob(actions.to(probs.dtype)) * weight).sum(dim=1)
    # The release's entropy term is -p' log p' summed over every block, forced ones included.
    # This is the full Bernoulli entropy of the controlled blocks only.
    entropy = (distribution.entropy() * weight).sum(dim=1).mean()
    policy_loss = -(advantages.detach().to(probs.dtype) * log_prob).mean()
    return PolicyLoss(policy_loss - beta * entropy, policy_loss, entropy)


@dataclass(frozen=True)
class CurriculumSchedule:
    """How many trailing blocks the agent controls in each epoch.

    Attributes:
        num_blocks: K.
        blocks_per_stage: Blocks gained at each stage; the first stage controls this many.
        epochs_per_stage: Epochs per stage; 0 gives the agent all K blocks from the start.
    """

    num_blocks: int
    blocks_per_stage: int = 1
    epochs_per_stage: int = 1

    def num_controlled(self, epoch: int) -> int:
        """Trailing blocks under the agent's control in ``epoch`` (counted from 0)."""
        if self.epochs_per_stage == 0:
            return self.num_blocks
        stage = epoch // self.epochs_per_stage
        return min(self.num_blocks, self.blocks_per_stage * (stage + 1))

    @property
    def first_full_epoch(self) -> int:
        """First epoch (from 0) in which the agent controls all K blocks."""
        if self.epochs_per_stage == 0:
            return 0
        return (math.ceil(self.num_blocks / self.blocks_per_stage) - 1) * self.epochs_per_stage


# ---------------------------------------------------------------------------------------------
# Configuration


def _option(default: Any, help_text: str) -> Any:
    """Dataclass field whose help text also feeds the CLI's ``--help``."""
    return field(default=default, metadata={"help": help_text})


@dataclass
class TrainConfig:
    """Configuration of ``blockdrop train``: curriculum REINFORCE on a frozen ResNet."""

    resnet: str = _option(
        "", "ResNet checkpoint whose blocks the agent learns to drop; default: the shipped ResNet-32 for shapes."
    )
    dataset: str = _option("shapes", "Dataset: shapes (built in, no files), imagefolder, cifar10 or cifar100.")
    data_dir: str = _option("", "Dataset root with the train and test splits; not used by shapes.")
    run_dir: str = _option("", "Directory for config, metrics, TensorBoard events and checkpoints.")
    # The defaults are a quick start: about 3 minutes on 2 CPU cores with the shipped shapes
    # ResNet-32. Full runs raise --epochs and drop the image limits.
    epochs: int = _option(6, "Total epochs, curriculum stages included.")
    batch_size: int = _option(256, "Images per step (the vector env's num_envs); also the test batch size.")
    lr: float = _option(1e-3, "Adam learning rate of the policy network.")
    alpha: float = _option(0.8, "Exploration bound in (0.5, 1]: p' = alpha*p + (1-alpha)*(1-p).")
    beta: float = _option(0.1, "Weight of the entropy bonus (>= 0).")
    penalty: float = _option(5.0, "Reward of a wrong prediction is -penalty (>= 0).")
    epochs_per_stage: int = _option(1, "Epochs per curriculum stage; 0 controls all blocks from the start.")
    blocks_per_stage: int = _option(3, "Blocks the agent gains at each curriculum stage; the release added 1.")
    max_train_images: int | None = _option(8000, "Train on a fixed random subset of N training images; 0 uses them all.")
    max_test_images: int | None = _option(2000, "Evaluate on a fixed random subset of N test images; 0 uses them all.")
    augment: bool = _option(False, "Random crop and horizontal flip of training images.")
    policy_input_size: int | None = _option(None, "Policy input side; default 32 for images up to 64 px, else 112.")
    device: str = _option("cpu", "Where both networks run.")
    seed: int = _option(0, "Seed of the policy's initial weights, the sampling and the image order.")

    def __post_init__(self) -> None:
        validate_common(self)
        _require_int(self.epochs_per_stage, "epochs_per_stage", minimum=0)
        _require_int(self.blocks_per_stage, "blocks_per_stage", minimum=1)
        _require_float(self.lr, "lr", positive=True)
        if self.policy_input_size is not None:
            _require_int(self.policy_input_size, "policy_input_size", minimum=1)


def validate_common(config: Any) -> None:
    """Check the fields shared by the train and fine-tune configurations.

    Raises:
        ConfigError: naming the first invalid field, its value and the valid range.
    """
    if not str(config.run_dir):
        raise ConfigError("run_dir (--run-dir) is missing; pass the directory where the run is saved")
    _require_int(config.epochs, "epochs", minimum=1)
    _require_int(config.batch_size, "batch_size", minimum=1)
    _require_int(config.seed, "seed", minimum=0)
    alpha = _require_float(config.alpha, "alpha")
    if not 0.5 < alpha <= 1.0:
        raise ConfigError(
            f"alpha (--alpha) must be in (0.5, 1], got {config.alpha!r}; 0.8 keeps each sampled "
            "keep probability within [0.2, 0.8]"
        )
    _require_float(config.beta, "beta", minimum=0.0)
    if config.penalty is not None:
        _require_float(config.penalty, "penalty", minimum=0.0)
    for name in ("max_train_images", "max_test_images"):
        if getattr(config, name) is not None:
            _require_int(getattr(config, name), name, minimum=0)
    if config.device not in ("cpu", "cuda") and not str(config.device).startswith("cuda:"):
        raise ConfigError(f"device (--device) must be 'cpu' or 'cuda', got {config.device!r}")


def config_help(config_class: type, name: str) -> str:
    """Help text of one configuration field, for the CLI."""
    return next(f.metadata["help"] for f in fields(config_class) if f.name == name)


def _require_int(value: Any, name: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        option = "--" + name.replace("_", "-")
        raise ConfigError(f"{name} ({option}) must be an integer >= {minimum}, got {value!r}")
    return value


def _require_float(value: Any, name: str, *, minimum: float | None = None, positive: bool = False) -> float:
    option = "--" + name.replace("_", "-")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} ({option}) must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ConfigError(f"{name} ({option}) must be > 0, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} ({option}) must be >= {minimum:g}, got {value!r}")
    return float(value)


# ---------------------------------------------------------------------------------------------
# Per-epoch bookkeeping


@dataclass
class RolloutStats:
    """Outcomes of the training steps of one epoch, turned into ``train/`` metrics."""

    rewards: list[np.ndarray] = field(default_factory=list)
    baselines: list[np.ndarray] = field(default_factory=list)
    correct: list[np.ndarray] = field(default_factory=list)
    blocks: list[np.ndarray] = field(default_factory=list)
    flops: list[np.ndarray] = field(default_factory=list)
    policies: list[np.ndarray] = field(default_factory=list)
    losses: dict[str, list[float]] = field(default_factory=dict)

    def add(self, rewards: np.ndarray, baselines: torch.Tensor, final_info: Mapping[str, Any], **losses: float) -> None:
        """Record one step: its rewards, baseline rewards, the env's step info and loss terms."""
        self.rewards.append(np.asarray(rewards, dtype=np.float64))
        self.baselines.append(baselines.detach().cpu().double().numpy())
        self.correct.append(np.asarray(final_info["correct"]))
        self.blocks.append(np.asarray(final_info["blocks_used"], dtype=np.float64))
        self.flops.append(np.asarray(final_info["flops"], dtype=np.float64))
        self.policies.append(np.asarray(final_info["policy"], dtype=np.int8))
        for name, value in losses.items():
            self.losses.setdefault(name, []).append(float(value))

    @classmethod
    def combine(cls, parts: Sequence[RolloutStats]) -> RolloutStats:
        """Concatenate the steps that several processes recorded, in process order."""
        if len(parts) == 1:
            return parts[0]
        combined = cls()
        for part in parts:
            for name in ("rewards", "baselines", "correct", "blocks", "flops", "policies"):
                getattr(combined, name).extend(getattr(part, name))
            for name, values in part.losses.items():
                combined.losses.setdefault(name, []).extend(values)
        return combined

    def running(self) -> dict[str, str]:
        """Live values for the progress bar."""
        return {
            "reward": f"{np.concatenate(self.rewards).mean():.3f}",
            "acc": f"{np.concatenate(self.correct).mean():.3f}",
            "blocks": f"{np.concatenate(self.blocks).mean():.2f}",
        }

    def metrics(self) -> dict[str, float]:
        """Epoch means, namespaced ``train/``, ``loss/`` and ``policy/``."""
        blocks = np.concatenate(self.blocks)
        result = {
            "train/reward": float(np.concatenate(self.rewards).mean()),
            "train/baseline_reward": float(np.concatenate(self.baselines).mean()),
            "train/accuracy": float(np.concatenate(self.correct).mean()),
            "train/blocks_mean": float(blocks.mean()),
            "train/blocks_std": float(blocks.std()),
            "train/flops_mean": float(np.concatenate(self.flops).mean()),
            "train/unique_policies": float(np.unique(np.concatenate(self.policies), axis=0).shape[0]),
        }
        result.update({name: float(np.mean(values)) for name, values in self.losses.items()})
        return result


# ---------------------------------------------------------------------------------------------
# The epoch loop shared by curriculum training and joint fine-tuning


class EpochTrainer:
    """Epoch loop, evaluation, checkpoints and exact resume; subclasses implement :meth:`train_step`.

    Each epoch re-seeds the env with ``seed + epoch``, so a resumed run replays the same images
    without saving the env's internals. The torch, NumPy and Python RNG states are saved in last.pt.
    Under torchrun each rank trains on its shard of the images, and the env and torch's generator
    are re-seeded per rank from ``seed + epoch`` (see :mod:`agents.distributed`).

    Args:
        config: The run's configuration (saved as config.json).
        env: Vector env over the training images; its ``model`` is the ResNet.
        test_data: Images for the per-epoch evaluation.
        policy: The policy network, on the env's device.
        optimizer: Optimiser of the trained parameters.
        schedule: Curriculum schedule.
        reward: The env's reward function, applied to the test predictions.
        progress: Show progress bars.
        on_epoch: Called after each epoch's checkpoint.
    """

    lr_options = "--lr"
    """Options that set the learning rates, named when training diverges."""

    def __init__(
        self,
        config: Any,
        env: BlockDropVectorEnv,
        test_data: ImageDataset,
        policy: PolicyNetwork,
        optimizer: torch.optim.Optimizer,
        schedule: CurriculumSchedule,
        reward: RewardFunction,
        *,
        progress: bool = False,
        on_epoch: EpochCallback | None = None,
    ) -> None:
        self.config = config
        self.env = env
        self.test_data = test_data
        # The layout evaluation gives the policy anyway: set it before the first step, so that a
        # resumed run trains in the same layout as an uninterrupted one.
        self.policy = prefer_channels_last(policy, next(policy.parameters()).device)
        self.optimizer = optimizer
        self.schedule = schedule
        self.reward = reward
        self.progress = progress
        self.on_epoch = on_epoch
        self.run = RunDirectory(config.run_dir)
        self.best_score = -math.inf
        # Every rank takes as many steps as the rank with the largest shard, so DDP stays in step.
        self.steps_per_epoch = max(1, math.ceil(max_over_ranks(len(env.dataset)) / env.num_envs))
        self.train_policy = wrap_ddp(policy, env.device)
        self._position = "the start of training"
        self._saved_epoch: int | None = None

    # -- steps that subclasses implement ----------------------------------------------------

    def train_step(self, stats: RolloutStats) -> None:
        """Take one optimisation step on the env's current images and record it in ``stats``."""
        raise NotImplementedError

    # -- the loop -------------------------------------------------------------------------------

    def fit(self, resume: bool = False) -> list[dict[str, Any]]:
        """Train for the configured epochs, or continue from last.pt when ``resume``.

        Returns:
            Every metrics row of the run, resumed epochs included.

        Raises:
            ConfigError: if the run directory already contains a run and ``resume`` is False, or
                the saved configuration differs from this one in a field that must not change.
            CheckpointError: if ``resume`` is True and last.pt is missing or unreadable.
        """
        start = self._resume() if resume else self._start_fresh()
        try:
            for epoch in range(start, self.config.epochs):
                self._run_epoch(epoch)
        finally:
            self.run.close()
        return self.run.read_metrics()

    def _run_epoch(self, epoch: int) -> None:
        num_controlled = self.schedule.num_controlled(epoch)
        self.env.set_curriculum(num_controlled)
        self.env.reset(seed=rank_seed(self.config.seed + epoch))
        reseed_torch_per_rank(self.config.seed + epoch)
        started = time.perf_counter()

        metrics = self._train_epoch(epoch)
        metrics["curriculum/num_controlled"] = float(num_controlled)
        metrics.update(self.evaluate(num_controlled))
        metrics["time/epoch_seconds"] = time.perf_counter() - started

        # Log before the checkpoint: a run killed in between redoes this epoch and rewrites its row.
        # NOTE: TensorBoard's event file then contains two points for that epoch; metrics.jsonl one.
        self.run.log(epoch, metrics)
        self._save_checkpoints(epoch, num_controlled, metrics)
        barrier()
        if self.on_epoch is not None:
            self.on_epoch(epoch, metrics)

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        self.policy.train()
        stats = RolloutStats()
        bar = tqdm(
            range(self.steps_per_epoch),
            desc=f"epoch {epoch + 1}/{self.config.epochs}",
            unit="step",
            disable=not self.progress,
            leave=False,
        )
        for step in bar:
            self._position = f"epoch {epoch + 1}, step {step + 1} of {self.steps_per_epoch}"
            self.train_step(stats)
            bar.set_postfix(stats.running(), refresh=False)
        bar.close()
        return RolloutStats.combine(gather_objects(stats)).metrics()

    def evaluate(self, num_controlled: int) -> dict[str, float]:
        """Metrics of the thresholded policy on the whole test split, namespaced ``test/``."""
        model = self.env.model
        policy_fn = agent_policy_fn(self.policy, num_controlled)
        broadcast_buffers(self.policy, model)
        result, record = evaluate_sharded(
            model,
            self.test_data,
            policy_fn,
            batch_size=self.config.batch_size,
            device=self.env.device,
            progress=self.progress,
        )
        policies = record.policies.to(self.env.device)
        correct = record.correct.to(self.env.device)
        rewards = self.reward(correct, policies, model.policy_flops(policies), model)
        return {
            "test/accuracy": result.accuracy,
            "test/reward": float(rewards.double().mean()),
            "test/blocks_mean": result.blocks_mean,
            "test/blocks_std": result.blocks_std,
            "test/flops_mean": result.flops_mean,
            "test/flops_ratio": result.flops_mean / result.flops_full,
            "test/unique_policies": float(result.unique_policies),
        }

    # -- checkpoints and resume -------------------------------------------------------------------

    def check_finite(self, quantity: str, value: torch.Tensor) -> None:
        """Stop training when ``value`` contains NaN or inf, before anything is saved.

        Raises:
            TrainingError: naming the epoch and step, the quantity, the last saved epoch and the fix.
        """
        if bool(torch.isfinite(value).all()):
            return
        saved = "no checkpoint was written yet"
        if self._saved_epoch is not None:
            saved = f"{LAST_CHECKPOINT} still contains epoch {self._saved_epoch + 1}"
        raise TrainingError(
            f"training diverged at {self._position}: {quantity} contains NaN or inf; {saved}. "
            f"Start again in a new --run-dir with a lower {self.lr_options}"
        )

    def _save_checkpoints(self, epoch: int, num_controlled: int, metrics: Mapping[str, float]) -> None:
        self._position = f"the end of epoch {epoch + 1}"
        for parameter in (p for group in self.optimizer.param_groups for p in group["params"]):
            self.check_finite("a trained weight", parameter.detach())
        self.check_finite("the epoch's metrics", torch.tensor(list(metrics.values()), dtype=torch.float64))
        score = metrics[SELECTION_METRIC]
        if score > self.best_score:
            self.best_score = score
            self.run.save_checkpoint(self._agent_state(epoch, num_controlled, metrics, None), BEST_CHECKPOINT)
        training = {
            "optimizer": self.optimizer.state_dict(),
            "rng": capture_rng_state(),
            "best_score": self.best_score,
        }
        self.run.save_checkpoint(self._agent_state(epoch, num_controlled, metrics, training), LAST_CHECKPOINT)
        self._saved_epoch = epoch

    def _agent_state(
        self, epoch: int, num_controlled: int, metrics: Mapping[str, float], training: dict[str, Any] | None
    ) -> dict[str, Any]:
        return agent_state(
            self.policy,
            self.env.model,
            num_controlled=num_controlled,
            epoch=epoch,
            metrics=metrics,
            training=training,
        )

    def _start_fresh(self) -> int:
        if self.run.has_checkpoint(LAST_CHECKPOINT):
            raise ConfigError(
                f"run directory {self.run.path} already contains a run ({LAST_CHECKPOINT}); pass "
                "--resume to continue it, or choose another --run-dir"
            )
        # Rows of a run killed before its first checkpoint belong to no checkpoint.
        self.run.truncate_metrics(-1)
        self.run.write_config(self.config)
        return 0

    def _resume(self) -> int:
        check_resumable(self.run.read_config(), asdict(self.config))
        state = self.run.load_checkpoint(LAST_CHECKPOINT, required_keys=("policy", "epoch", "training"))
        try:
            training = state["training"]
            self.policy.load_state_dict(state["policy"])
            self.optimizer.load_state_dict(training["optimizer"])
            self.best_score = float(training["best_score"])
            restore_rng_state(training["rng"])
            epoch = int(state["epoch"])
        except (KeyError, RuntimeError, TypeError, ValueError) as error:
            reason = " ".join(str(error).split())[:200]
            raise CheckpointError(
                f"checkpoint {self.run.path / LAST_CHECKPOINT} does not fit this run ({type(error).__name__}: "
                f"{reason}); restore the run's own {LAST_CHECKPOINT} from a copy, or start a new --run-dir"
            ) from None
        self._saved_epoch = epoch
        self.run.truncate_metrics(epoch)
        # The saved config keeps the run's history; the fields in RESUMABLE_CHANGES may differ.
        self.run.write_config(self.config)
        return epoch + 1


def check_resumable(saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Raise unless ``current`` differs from the saved configuration only in resumable fields.

    Raises:
        ConfigError: naming the first field that differs, with both values.
    """
    for name, value in current.items():
        if name in RESUMABLE_CHANGES or name not in saved:
            continue
        if saved[name] != value:
            raise ConfigError(
                f"cannot resume: {name} is {value!r} but the run in this directory used "
                f"{saved[name]!r}; pass the original value, or start a new --run-dir"
            )


# ---------------------------------------------------------------------------------------------
# Curriculum REINFORCE on a frozen ResNet


class CurriculumTrainer(EpochTrainer):
    """REINFORCE with the paper's exploration bound, self-critical baseline and curriculum.

    Args:
        config: The run's configuration.
        model: The frozen ResNet.
        train_data: Images the policy learns on.
        test_data: Images the policy is evaluated on after each epoch.
        progress: Show progress bars.
        on_epoch: Called after each epoch.

    Raises:
        DatasetError: if the datasets do not fit the model.
    """

    def __init__(
        self,
        config: TrainConfig,
        model: BlockDropResNet,
        train_data: ImageDataset,
        test_data: ImageDataset,
        *,
        progress: bool = False,
        on_epoch: EpochCallback | None = None,
    ) -> None:
        env, reward, device = build_training_env(config, model, train_data)
        policy = build_policy(model.num_blocks, train_data, config.policy_input_size).to(device)
        # lr 1e-3 is the default of the release's curriculum script; its fine-tuning uses 1e-4.
        optimizer = torch.optim.Adam(policy.parameters(), lr=config.lr)
        if config.blocks_per_stage > model.num_blocks:
            raise ConfigError(
                f"blocks_per_stage (--blocks-per-stage) must be at most the ResNet's {model.num_blocks} "
                f"blocks, got {config.blocks_per_stage}; pass 1 to {model.num_blocks}"
            )
        schedule = CurriculumSchedule(model.num_blocks, config.blocks_per_stage, config.epochs_per_stage)
        warn_short_curriculum(schedule, config.epochs)
        super().__init__(
            config, env, test_data, policy, optimizer, schedule, reward, progress=progress, on_epoch=on_epoch
        )

    def train_step(self, stats: RolloutStats) -> None:
        """Sample, score against the thresholded policy, step the env and update the policy."""
        config = self.config
        images = self.env.current_images
        mask = controlled_mask(self.env.num_blocks, self.env.num_controlled, images.device)
        probs = self.train_policy(images)
        self.check_finite("the keep-probability tensor", probs.detach())
        actions = sample_actions(probs, config.alpha, mask)

        baseline = self.env.score_actions(threshold_policy(probs.detach(), mask)).rewards
        _, rewards, _, _, infos = self.env.step(actions)
        advantages = torch.as_tensor(rewards, dtype=torch.float32, device=images.device) - baseline

        loss = policy_gradient_loss(probs, actions, advantages, mask, config.alpha, config.beta)
        self.check_finite("loss/total", loss.total.detach())
        self.optimizer.zero_grad(set_to_none=True)
        loss.total.backward()
        self.optimizer.step()

        stats.add(
            rewards,
            baseline,
            infos["final_info"],
            **{"loss/total": loss.total.item(), "loss/policy": loss.policy.item()},
            **{"policy/entropy": loss.entropy.item(), "policy/keep_prob": probs.detach()[:, mask].mean().item()},
        )


def build_policy(num_blocks: int, train_data: ImageDataset, input_size: int | None) -> PolicyNetwork:
    """Policy network for the dataset's image size, normalised with its pixel statistics."""
    mean, std = image_statistics(train_data)
    config = PolicyConfig.for_images(num_blocks, train_data.image_size, input_size=input_size, mean=mean, std=std)
    return PolicyNetwork(config)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def warn_short_curriculum(schedule: CurriculumSchedule, epochs: int) -> None:
    """Warn when the run ends before the agent controls every block."""
    if schedule.first_full_epoch >= epochs:
        warnings.warn(
            f"the curriculum gives the agent all {schedule.num_blocks} blocks only in epoch "
            f"{schedule.first_full_epoch + 1}, but the run has {epochs} epochs; the first blocks "
            "will always run. Raise --epochs or --blocks-per-stage, or lower --epochs-per-stage",
            stacklevel=3,
        )


def build_training_env(
    config: Any, model: BlockDropResNet, train_data: ImageDataset
) -> tuple[BlockDropVectorEnv, BlockUsageReward, torch.device]:
    """Build the vector env over this process's shard of the training images and seed everything.

    ``config`` is a :class:`TrainConfig` or a fine-tuning configuration: its ``device``,
    ``penalty``, ``batch_size``, ``augment`` and ``seed`` are used.

    Returns:
        The env, its reward function and the device it runs on.
    """
    device = local_device(config.device)
    reward = BlockUsageReward(config.penalty)
    env = BlockDropVectorEnv(
        model, shard_dataset(train_data), config.batch_size, reward=reward, augment=config.augment, device=device
    )
    seed_everything(config.seed)
    return env, reward, device


def load_splits(
    dataset: str, data_dir: str | Path, max_train_images: int | None, max_test_images: int | None
) -> tuple[ImageDataset, ImageDataset]:
    """Load the train and test splits, each cut to a fixed random subset of N images when N is given.

    Raises:
        ConfigError: if the dataset name is unknown.
        DatasetError: if the files are missing or the splits' classes differ.
    """
    train_data = load_dataset(dataset, data_dir or None, "train")
    test_data = load_dataset(dataset, data_dir or None, "test")
    check_same_classes(train_data, test_data)
    return train_data.sample(max_train_images or None), test_data.sample(max_test_images or None)


def train(
    config: TrainConfig, *, resume: bool = False, progress: bool = False, on_epoch: EpochCallback | None = None
) -> list[dict[str, Any]]:
    """Load the ResNet and data named in ``config`` and run curriculum training.

    Args:
        config: What to train and how.
        resume: Continue the run in ``config.run_dir`` from its last.pt.
        progress: Show progress bars.
        on_epoch: Called after each epoch with its metrics.

    Returns:
        Every metrics row of the run.

    Raises:
        BlockDropError: on a missing or invalid checkpoint, dataset or option.
    """
    from blockdrop_env.checkpoints import check_dataset_classes, load_resnet

    from blockdrop_env.registration import SHAPES_CHECKPOINT

    loaded = load_resnet(config.resnet or SHAPES_CHECKPOINT)
    train_data, test_data = load_splits(config.dataset, config.data_dir, config.max_train_images, config.max_test_images)
    check_dataset_classes(loaded, train_data.num_classes, train_data.name)
    trainer = CurriculumTrainer(config, loaded.model, train_data, test_data, progress=progress, on_epoch=on_epoch)
    return trainer.fit(resume=resume)
