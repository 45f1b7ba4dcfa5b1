"""Joint fine-tuning: the policy network and the ResNet train together, as in BlockDrop.

Each step samples a policy, earns rewards from the env as in curriculum training, and adds the
cross-entropy of the ResNet's predictions under the sampled policy. The ResNet runs in masked
mode for that loss (``model(x, policy, mode="masked")``), the execution mode whose gradients
reach every block's weights for every sample.

The agent reads ``env.model``, ``env.current_images`` and ``env.current_labels``, all public.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from agents.agent_checkpoint import load_agent, read_agent_checkpoint, resolve_agent_path
from agents.distributed import check_sync_bn, wrap_ddp
from agents.policy import PolicyNetwork, controlled_mask, threshold_policy
from agents.reinforce import (
    CurriculumSchedule,
    EpochCallback,
    EpochTrainer,
    RolloutStats,
    _option,
    _require_float,
    build_training_env,
    load_splits,
    policy_gradient_loss,
    sample_actions,
    validate_common,
)
from agents.runs import CONFIG_FILE, RunDirectory
from blockdrop_env.checkpoints import check_dataset_classes, resnet_from_state
from blockdrop_env.data import ImageDataset
from blockdrop_env.errors import ConfigError
from blockdrop_env.resnet import BlockDropResNet


@dataclass
class FinetuneConfig:
    """Configuration of ``blockdrop finetune``: joint training of the policy and the ResNet."""

    from_run: str = _option(
        "", "Run directory of `blockdrop train` to start from (its best.pt, else last.pt), or one of its checkpoint files."
    )
    run_dir: str = _option("", "Directory for config, metrics, TensorBoard events and checkpoints.")
    epochs: int = _option(10, "Epochs of joint training.")
    batch_size: int = _option(256, "Images per step (the vector env's num_envs); also the test batch size.")
    lr_resnet: float = _option(1e-4, "Adam learning rate of the ResNet.")
    lr_policy: float = _option(1e-4, "Adam learning rate of the policy network.")
    alpha: float = _option(0.8, "Exploration bound in (0.5, 1]: p' = alpha*p + (1-alpha)*(1-p).")
    beta: float = _option(0.0, "Weight of the entropy bonus (>= 0); the release used none here.")
    penalty: float | None = _option(None, "Reward of a wrong prediction is -penalty; default: the source run's.")
    dataset: str | None = _option(None, "Dataset format; default: the source run's.")
    data_dir: str | None = _option(None, "Dataset root; default: the source run's.")
    max_train_images: int | None = _option(None, "Train on a fixed random subset of N training images.")
    max_test_images: int | None = _option(None, "Evaluate on a fixed random subset of N test images.")
    augment: bool = _option(True, "Random crop and horizontal flip of training images.")
    device: str = _option("cpu", "Where both networks run.")
    seed: int = _option(0, "Seed of the sampling and the image order.")
    sync_bn: bool = _option(False, "Under torchrun, normalise BatchNorm over all processes' batches (CUDA only).")

    def __post_init__(self) -> None:
        validate_common(self)
        check_sync_bn(self.sync_bn, self.device)
        _require_float(self.lr_resnet, "lr_resnet", positive=True)
        _require_float(self.lr_policy, "lr_policy", positive=True)
        if not str(self.from_run):
            raise ConfigError("from_run (--from) is missing; pass the run directory of `blockdrop train`")


class JointFinetuner(EpochTrainer):
    """REINFORCE on the policy plus cross-entropy on the ResNet, every block controlled.

    Args:
        config: The run's configuration, with ``penalty``, ``dataset`` and ``data_dir`` filled in.
        policy: The policy network from curriculum training.
        model: The ResNet to fine-tune (trained in place).
        train_data: Training images.
        test_data: Images evaluated after each epoch.
        progress: Show progress bars.
        on_epoch: Called after each epoch.
    """

    lr_options = "--lr-policy or --lr-resnet"

    def __init__(
        self,
        config: FinetuneConfig,
        policy: PolicyNetwork,
        model: BlockDropResNet,
        train_data: ImageDataset,
        test_data: ImageDataset,
        *,
        progress: bool = False,
        on_epoch: EpochCallback | None = None,
    ) -> None:
        env, reward, device = build_training_env(config, model, train_data)
        policy = policy.to(device)
        # One Adam, two parameter groups: the two losses reach disjoint parameters, so each
        # group's step size is set by its own learning rate (the release used 1e-4 for both).
        optimizer = torch.optim.Adam(
            [
                {"params": policy.parameters(), "lr": config.lr_policy},
                {"params": env.model.parameters(), "lr": config.lr_resnet},
            ]
        )
        # As in the release's fine-tuning, the agent controls every block from the start.
        schedule = CurriculumSchedule(model.num_blocks, epochs_per_stage=0)
        super().__init__(
            config, env, test_data, policy, optimizer, schedule, reward, progress=progress, on_epoch=on_epoch
        )
        self.train_model = wrap_ddp(env.model, device, sync_bn=config.sync_bn)

    def train_step(self, stats: RolloutStats) -> None:
        """Sample, score, step the env, then update the policy and the ResNet together."""
        config = self.config
        model = self.env.model
        images = self.env.current_images
        labels = self.env.current_labels
        mask = controlled_mask(self.env.num_blocks, self.env.num_controlled, images.device)
        probs = self.train_policy(images)
        self.check_finite("the keep-probability tensor", probs.detach())
        actions = sample_actions(probs, config.alpha, mask)

        # Rewards come from the env's block-sparse forward with BN in eval mode, as at test time.
        # The release instead scored the train-mode forward that also gives the loss.
        model.eval()
        baseline = self.env.score_actions(threshold_policy(probs.detach(), mask)).rewards
        _, rewards, _, _, infos = self.env.step(actions)
        advantages = torch.as_tensor(rewards, dtype=torch.float32, device=images.device) - baseline

        # BN in train mode, as in ordinary fine-tuning and in the release, so its statistics
        # adapt to the features that dropped blocks produce. Masked mode runs every block on
        # every image, so each BN layer normalises over the whole batch.
        model.train()
        logits = self.train_model(model.preprocess(images), actions, mode="masked")
        cross_entropy = F.cross_entropy(logits, labels)
        loss = policy_gradient_loss(probs, actions, advantages, mask, config.alpha, config.beta)
        self.check_finite("loss/cross_entropy", cross_entropy.detach())
        self.check_finite("loss/total", loss.total.detach())
        self.optimizer.zero_grad(set_to_none=True)
        (loss.total + cross_entropy).backward()
        self.optimizer.step()
        model.eval()

        stats.add(
            rewards,
            baseline,
            infos["final_info"],
            **{"loss/total": (loss.total + cross_entropy).item(), "loss/policy": loss.policy.item()},
            **{"loss/cross_entropy": cross_entropy.item(), "policy/entropy": loss.entropy.item()},
            **{"policy/keep_prob": probs.detach().mean().item()},
        )


def finetune(
    config: FinetuneConfig,
    *,
    resume: bool = False,
    progress: bool = False,
    on_epoch: EpochCallback | None = None,
) -> list[dict[str, Any]]:
    """Start from a curriculum run's agent and train the policy and the ResNet jointly.

    Missing ``penalty``, ``dataset`` and ``data_dir`` are taken from the source run's config.
    On ``resume`` both networks start from the fine-tuning run's own last.pt.

    Args:
        config: What to fine-tune and how.
        resume: Continue the run in ``config.run_dir`` from its last.pt.
        progress: Show progress bars.
        on_epoch: Called after each epoch with its metrics.

    Returns:
        Every metrics row of the run.

    Raises:
        BlockDropError: on a missing or invalid run, checkpoint, dataset or option.
    """
    config = fill_from_source(config)
    policy, loaded, _ = load_agent(config.from_run)
    model = loaded.model
    if resume:
        # The ResNet's fine-tuned weights live in last.pt; EpochTrainer restores the policy.
        last = Path(config.run_dir) / "last.pt"
        model = resnet_from_state(read_agent_checkpoint(resolve_agent_path(last))["resnet"], path=last).model
    train_data, test_data = load_splits(config.dataset, config.data_dir, config.max_train_images, config.max_test_images)
    check_dataset_classes(loaded, train_data.num_classes, train_data.name)
    trainer = JointFinetuner(config, policy, model, train_data, test_data, progress=progress, on_epoch=on_epoch)
    return trainer.fit(resume=resume)


def fill_from_source(config: FinetuneConfig) -> FinetuneConfig:
    """Copy ``penalty``, ``dataset`` and ``data_dir`` from the source run where ``config`` lacks them.

    Raises:
        ConfigError: if ``config.from_run`` is neither a run directory nor a file inside one.
    """
    source = Path(config.from_run)
    # A checkpoint file takes its settings from the run directory that contains it.
    run_dir = source.parent if source.is_file() else source
    if not run_dir.is_dir():
        raise ConfigError(
            f"from_run (--from) {source} does not exist; pass the run directory of `blockdrop train` "
            "or one of its checkpoint files"
        )
    if source.is_file() and not (run_dir / CONFIG_FILE).is_file():
        raise ConfigError(
            f"from_run (--from) {source} is not inside a `blockdrop train` run directory (no config.json "
            "next to it); pass the run directory, or its last.pt or best.pt"
        )
    saved = RunDirectory(run_dir, tensorboard=False).read_config()
    values = {name: getattr(config, name) for name in config.__dataclass_fields__}
    for name in ("penalty", "dataset", "data_dir"):
        if values[name] is None:
            values[name] = saved.get(name)
    if values["penalty"] is None:
        # Runs of `blockdrop pretrain --agent` contain agents but no reward settings.
        raise ConfigError(
            f"penalty is missing: --penalty is not given and {run_dir / CONFIG_FILE} of from_run (--from) "
            f"{source} has none; pass --penalty, e.g. the one the agent was trained with"
        )
    return FinetuneConfig(**values)
