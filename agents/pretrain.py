"""Train a base ResNet from scratch, or fine-tune a pre-trained one on new data.

BlockDrop needs a ResNet that is accurate on the images its policy will see. This module trains
one with the standard supervised recipe: SGD with Nesterov momentum, a per-step cosine schedule
with optional linear warmup, random-crop and flip augmentation, and cross-entropy. The test
accuracy of the full network (every block executed) is measured after each epoch.

A run directory (see :mod:`agents.runs`) receives::

    config.json       the resolved PretrainConfig
    metrics.jsonl     per epoch: train/loss, train/accuracy, test/accuracy, lr, ...
    last.pt           model, optimizer, scheduler, epoch and RNG states, for --resume
    best.pt           the same for the epoch with the best test accuracy
    model.pt          the final network in the "blockdrop" checkpoint format
    best_model.pt     the network of the best epoch in the "blockdrop" format

With ``init`` set, epoch 0 of metrics.jsonl holds the test accuracy of the checkpoint before any
training, the reference that fine-tuning must beat.

With ``agent`` set, the run trains the ResNet of an agent checkpoint for the blocks that the
agent's frozen policy keeps: each training image runs only those blocks, and every test accuracy
is that of the policy and the ResNet together. The run then also writes ``agent.pt`` (and
``best_agent.pt``), agent checkpoints of the unchanged policy with the trained ResNet.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from agents.agent_checkpoint import (
    BEST_EXPORTED_AGENT,
    EXPORTED_AGENT,
    agent_policy_fn,
    agent_state,
    load_agent,
    read_agent_checkpoint,
    resolve_agent_path,
)
from agents.baselines import AllBlocks
from agents.distributed import (
    barrier,
    broadcast_buffers,
    check_sync_bn,
    evaluate_sharded,
    is_main_process,
    local_device,
    rank_generator,
    shard_order,
    sum_over_ranks,
    world_size,
    wrap_ddp,
)
from agents.evaluation import PolicyFn
from agents.policy import PolicyNetwork
from agents.runs import BEST_CHECKPOINT, LAST_CHECKPOINT, RunDirectory, capture_rng_state, restore_rng_state
from blockdrop_env.augment import random_crop_flip
from blockdrop_env.checkpoints import NORMALIZATION_NAMES, load_resnet, normalization_name, save_resnet
from blockdrop_env.data import DATASET_NAMES, ImageDataset, check_same_classes, load_dataset
from blockdrop_env.errors import CheckpointError, ConfigError, DatasetError, TrainingError
from blockdrop_env.resnet import (
    IMAGENET_NORMALIZATION,
    BlockDropResNet,
    CifarResNet,
    ImageNetResNet,
    build_resnet,
)

logger = logging.getLogger(__name__)

DEFAULT_ARCH = "cifar_resnet32"
SCRATCH_LR = 0.1
FINETUNE_LR = 0.01
MODEL_FILE = "model.pt"
BEST_MODEL_FILE = "best_model.pt"
AGENT_FILE = EXPORTED_AGENT
BEST_AGENT_FILE = BEST_EXPORTED_AGENT
PRECISIONS = ("float32", "bfloat16")

# Settings that change speed but not the numbers, so a resumed run may use other values.
_RESUMABLE_CHANGES = frozenset({"device", "num_threads", "sync_bn"})
# Offsets of the random streams derived from `seed`, so subset choice and epochs never share one.
_SUBSET_STREAM = 1_000_003

EpochCallback = Callable[[int, Mapping[str, float]], None]
"""Called after each epoch's checkpoint is written, with the epoch and its logged metrics."""


def _doc(text: str) -> Any:
    """Attach the one-line description that feeds ``--help``."""
    return {"help": text}


@dataclass
class PretrainConfig:
    """Settings of one ``blockdrop pretrain`` run; each field's ``help`` metadata is its CLI help.

    Fields left as None are resolved when the run starts (see :meth:`resolved`), and config.json
    stores the resolved values.

    Raises:
        ConfigError: if a value is out of range, ``arch`` is unknown or ``init`` is not a file.
    """

    dataset: str = field(default="imagefolder", metadata=_doc("Dataset format: imagefolder, cifar10, cifar100 or shapes."))
    data_dir: str | None = field(default=None, metadata=_doc("Dataset root with the train and test splits."))
    arch: str | None = field(
        default=None,
        metadata=_doc(f"Architecture, e.g. cifar_resnet32 or resnet18; default {DEFAULT_ARCH}, or the --init checkpoint's."),
    )
    init: str | None = field(
        default=None,
        metadata=_doc("Checkpoint to fine-tune; its head is replaced when the class count differs."),
    )
    agent: str | None = field(
        default=None,
        metadata=_doc(
            "Agent checkpoint (or its run directory) whose ResNet to fine-tune for the blocks its frozen "
            "policy keeps; writes agent.pt with the trained ResNet. Excludes --init and --stochastic-depth."
        ),
    )
    normalization: str | None = field(
        default=None,
        metadata=_doc("Input normalisation: imagenet, cifar10 or none; default imagenet, or the --init checkpoint's."),
    )
    num_classes: int | None = field(default=None, metadata=_doc("Number of classes; taken from the dataset."))
    epochs: int = field(default=10, metadata=_doc("Training epochs (passes over the training split)."))
    batch_size: int = field(default=128, metadata=_doc("Images per SGD step; the last partial batch of an epoch is dropped."))
    lr: float | None = field(
        default=None,
        metadata=_doc(f"Peak learning rate; default {SCRATCH_LR} from scratch, {FINETUNE_LR} with --init or --agent."),
    )
    momentum: float = field(default=0.9, metadata=_doc("SGD momentum (Nesterov)."))
    # He et al. (2016, section 4.2) used weight decay 1e-4 for CIFAR ResNets, and so does trainer.py
    # of akamaster/pytorch_resnet_cifar10, whose public ResNets are the usual --init checkpoints.
    weight_decay: float = field(
        default=1e-4,
        metadata=_doc("L2 weight decay on every parameter, 1e-4 as in He et al. (2016) for CIFAR ResNets."),
    )
    warmup_epochs: float = field(
        default=0.0,
        metadata=_doc("Epochs of linear learning-rate warmup before the cosine decay; may be fractional."),
    )
    label_smoothing: float = field(default=0.0, metadata=_doc("Label smoothing of the cross-entropy, in [0, 1)."))
    stochastic_depth: float = field(
        default=1.0,
        metadata=_doc(
            "Survival probability of the last block under stochastic depth, in (0, 1]; 1 turns it off. "
            "Below 1 the network learns to work with blocks dropped, which leaves a policy more to drop."
        ),
    )
    augment: bool = field(default=True, metadata=_doc("Random crop (zero padding 4) and horizontal flip of training images."))
    max_train_images: int | None = field(
        default=None,
        metadata=_doc("Train on a fixed random subset of this many training images."),
    )
    max_test_images: int | None = field(
        default=None,
        metadata=_doc("Evaluate on a fixed random subset of this many test images."),
    )
    eval_batch_size: int = field(default=256, metadata=_doc("Images per forward pass during evaluation."))
    # Measured on 2 AMD EPYC (Zen 4) cores, ResNet-32 at batch 128: 380 images/s channels-last
    # against 310 contiguous with 2 threads, 204 against 161 with 1 thread.
    channels_last: bool = field(
        default=True,
        metadata=_doc("Keep weights and activations in channels-last memory format (faster convolutions on CPUs)."),
    )
    # bfloat16 autocast on the same machine and setup: 590 images/s with 2 threads.
    precision: str = field(
        default="float32",
        metadata=_doc("Training arithmetic: float32, or bfloat16 autocast for the forward pass; evaluation stays float32."),
    )
    seed: int = field(default=0, metadata=_doc("Seed of the initial weights, the data order and the augmentation."))
    device: str = field(default="cpu", metadata=_doc("Where training runs: cpu or cuda."))
    num_threads: int | None = field(default=None, metadata=_doc("CPU threads for torch; default torch's choice."))
    sync_bn: bool = field(
        default=False,
        metadata=_doc("Under torchrun, normalise BatchNorm over all processes' batches (CUDA only)."),
    )

    def __post_init__(self) -> None:
        self._check_counts()
        self._check_rates()
        self._check_names()

    def _check_counts(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ConfigError(f"`epochs` must be a positive integer, got {self.epochs!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 2:
            raise ConfigError(
                f"`batch_size` must be an integer >= 2, got {self.batch_size!r}; "
                "BatchNorm in training mode needs at least 2 images per batch"
            )
        for name in ("max_train_images", "max_test_images", "num_threads", "num_classes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"`{name}` must be a positive integer or None, got {value!r}")
        if not isinstance(self.eval_batch_size, int) or self.eval_batch_size < 1:
            raise ConfigError(f"`eval_batch_size` must be a positive integer, got {self.eval_batch_size!r}")

    def _check_rates(self) -> None:
        if self.lr is not None and not 0 < self.lr < math.inf:
            raise ConfigError(f"`lr` must be > 0, got {self.lr!r}; pass a learning rate such as 0.01")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"`momentum` must be in [0, 1), got {self.momentum!r}")
        if not self.weight_decay >= 0:
            raise ConfigError(f"`weight_decay` must be >= 0, got {self.weight_decay!r}")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ConfigError(
                f"`warmup_epochs` must be between 0 and `epochs` ({self.epochs}), got {self.warmup_epochs!r}"
            )
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"`label_smoothing` must be in [0, 1), got {self.label_smoothing!r}")
        if not 0 < self.stochastic_depth <= 1:
            raise ConfigError(
                f"`stochastic_depth` must be a survival probability in (0, 1], got {self.stochastic_depth!r}; "
                "pass 1 to train without it"
            )

    def _check_names(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"`precision` must be one of {PRECISIONS}, got {self.precision!r}")
        if self.dataset not in DATASET_NAMES:
            raise ConfigError(f"`dataset` must be one of {DATASET_NAMES}, got {self.dataset!r}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"`device` must be cpu, cuda or cuda:N, got {self.device!r}")
        if self.normalization is not None and self.normalization not in NORMALIZATION_NAMES:
            raise ConfigError(
                f"`normalization` must be one of {sorted(NORMALIZATION_NAMES)} or None, got {self.normalization!r}"
            )
        if self.agent is not None:
            self._check_agent()
        if self.init is not None and not Path(self.init).is_file():
            raise ConfigError(
                f"`init` checkpoint {self.init} not found or not a file; pass an existing ResNet checkpoint"
            )
        if self.arch is not None:
            _check_arch(self.arch)
        check_sync_bn(self.sync_bn, self.device)

    def _check_agent(self) -> None:
        # NOTE: --arch and --normalization are not checked here and have no effect with --agent,
        # because the agent's ResNet fixes both (a resumed run fills them from config.json).
        if self.init is not None:
            raise ConfigError(
                f"`agent` {self.agent} and `init` {self.init} both name the network to train; "
                "pass only --agent, whose checkpoint contains the ResNet"
            )
        if self.stochastic_depth < 1:
            raise ConfigError(
                f"`stochastic_depth` must be 1 with `agent`, got {self.stochastic_depth!r}; the agent's "
                "policy chooses the blocks, so drop --stochastic-depth"
            )
        if not Path(self.agent).exists():
            raise ConfigError(
                f"`agent` {self.agent} not found; pass an agent checkpoint of `blockdrop train` or "
                "`blockdrop finetune`, or its run directory"
            )

    def resolved(self, *, arch: str | None, normalization: str | None, num_classes: int | None) -> PretrainConfig:
        """Fill the fields left to the run: architecture, normalisation, class count and lr.

        Paths become absolute so that config.json names the same files from any directory.
        """
        lr = self.lr
        if lr is None:
            lr = FINETUNE_LR if self.init or self.agent else SCRATCH_LR
        return replace(
            self,
            arch=arch,
            normalization=normalization,
            num_classes=num_classes,
            lr=lr,
            data_dir=str(Path(self.data_dir).resolve()) if self.data_dir else None,
            init=str(Path(self.init).resolve()) if self.init else None,
            agent=str(Path(self.agent).resolve()) if self.agent else None,
        )

    @classmethod
    def help_text(cls, name: str) -> str:
        """One-line description of field ``name``, for the CLI's ``--help``."""
        return next(f.metadata["help"] for f in fields(cls) if f.name == name)

    @classmethod
    def default(cls, name: str) -> Any:
        """Default value of field ``name``."""
        return next(f.default for f in fields(cls) if f.name == name)


def _check_arch(arch: str) -> None:
    """Raise ConfigError unless ``build_resnet`` accepts ``arch``; builds on the meta device, so it is free."""
    with torch.device("meta"):
        build_resnet(arch, 1)


@dataclass
class PretrainResult:
    """Outcome of :func:`pretrain`.

    Attributes:
        run_dir: The run directory.
        model_path: The final network, ``run_dir/model.pt``, in the "blockdrop" format.
        best_model_path: The network of the best epoch, ``run_dir/best_model.pt``.
        epochs: Number of epochs trained in total, including those before a resume.
        initial_accuracy: Test accuracy of the ``init`` checkpoint before training (after a head
            replacement, that of the random new head), or None when training from scratch.
        final_accuracy: Test accuracy after the last epoch.
        best_accuracy: Best test accuracy over the trained epochs.
        best_epoch: Epoch of ``best_accuracy``.
        head_replaced: Whether the ``init`` checkpoint's head was replaced by a new linear layer.
        train_images_per_second: Training throughput of the epochs run in this call (NaN if none).
        agent_path: With ``agent`` set, ``run_dir/agent.pt``: the policy with the trained ResNet.
    """

    run_dir: Path
    model_path: Path
    best_model_path: Path
    epochs: int
    initial_accuracy: float | None
    final_accuracy: float
    best_accuracy: float
    best_epoch: int
    head_replaced: bool
    train_images_per_second: float
    agent_path: Path | None = None


@dataclass
class _Trainer:
    """Everything that changes during training, and what last.pt stores of it."""

    model: BlockDropResNet
    optimizer: torch.optim.SGD
    scheduler: torch.optim.lr_scheduler.LambdaLR
    epoch: int = 0
    initial_accuracy: float | None = None
    last_accuracy: float = math.nan
    last_metrics: dict[str, float] = field(default_factory=dict)
    best_accuracy: float = -math.inf
    best_epoch: int = 0
    head_replaced: bool = False
    parallel: nn.Module | None = None
    agent: FrozenAgent | None = None

    @property
    def network(self) -> nn.Module:
        """The module training forwards run through: DistributedDataParallel around ``model`` under torchrun."""
        return self.model if self.parallel is None else self.parallel

    def state_dict(self) -> dict[str, Any]:
        """Checkpoint contents; only tensors and plain values, so they load with weights_only=True."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "initial_accuracy": self.initial_accuracy,
            "last_accuracy": self.last_accuracy,
            "last_metrics": dict(self.last_metrics),
            "best_accuracy": self.best_accuracy,
            "best_epoch": self.best_epoch,
            "head_replaced": self.head_replaced,
            "rng": capture_rng_state(),
            # The frozen policy, so that a resumed run can check that its agent file did not change.
            "agent_policy": {} if self.agent is None else self.agent.policy_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved, RNG states included."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch = int(state["epoch"])
        self.initial_accuracy = state["initial_accuracy"]
        self.last_accuracy = float(state["last_accuracy"])
        self.last_metrics = dict(state.get("last_metrics", {}))
        self.best_accuracy = float(state["best_accuracy"])
        self.best_epoch = int(state["best_epoch"])
        self.head_replaced = bool(state["head_replaced"])
        restore_rng_state(state["rng"])
        if self.agent is not None and not self.agent.same_policy(state.get("agent_policy", {})):
            raise CheckpointError(
                f"the policy in `agent` {self.agent.source} differs from the one this run started with; "
                "restore the original agent file to resume, or start a new --run-dir"
            )


@dataclass
class FrozenAgent:
    """The policy of an agent checkpoint, run without gradients to choose each image's blocks.

    A resumed run loads it again from ``PretrainConfig.agent`` and compares it with the copy of
    its weights in last.pt.
    """

    policy: PolicyNetwork
    num_controlled: int
    epoch: int
    source: Path

    def __post_init__(self) -> None:
        self.policy.requires_grad_(False)
        self.choose: PolicyFn = agent_policy_fn(self.policy, self.num_controlled)

    def policy_state(self) -> dict[str, torch.Tensor]:
        """Copy of the policy network's weights on the CPU."""
        return {key: value.detach().cpu().clone() for key, value in self.policy.state_dict().items()}

    def same_policy(self, saved: Mapping[str, torch.Tensor]) -> bool:
        """Return whether ``saved`` (from :meth:`policy_state`) equals this policy's weights."""
        current = self.policy_state()
        return saved.keys() == current.keys() and all(torch.equal(saved[key], current[key]) for key in current)

    def state(self, model: BlockDropResNet, metrics: Mapping[str, float]) -> dict[str, Any]:
        """Build the agent checkpoint of this policy with ``model``, keeping the policy's own epoch."""
        return agent_state(self.policy, model, num_controlled=self.num_controlled, epoch=self.epoch, metrics=metrics)


@dataclass
class WarmupCosine:
    """Learning-rate factor per optimizer step: linear warmup to 1, then cosine decay to 0.

    A plain dataclass rather than a lambda so that ``LambdaLR.state_dict`` stores its fields.
    """

    total_steps: int
    warmup_steps: int

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------
# Public API


def pretrain(
    config: PretrainConfig,
    run_dir: str | Path | RunDirectory,
    *,
    train_data: ImageDataset | None = None,
    test_data: ImageDataset | None = None,
    resume: bool = False,
    progress: bool = True,
    on_epoch_end: EpochCallback | None = None,
) -> PretrainResult:
    """Train or fine-tune a ResNet and write its checkpoints and metrics to a run directory.

    Args:
        config: The run's settings.
        run_dir: Directory of the run, created when missing.
        train_data: Training images; None loads ``config.dataset`` from ``config.data_dir``.
        test_data: Test images; None loads them the same way.
        resume: Continue the run in ``run_dir`` from its last.pt. With the same config, seed and
            thread count on the CPU, the result equals that of an uninterrupted run.
        progress: Show progress bars with the running loss and accuracy on stderr.
        on_epoch_end: Called with the epoch and its metrics after each epoch's checkpoint.

    Returns:
        Accuracies before and after training, and the paths of the saved networks.

    Raises:
        ConfigError: if the run directory and ``resume`` disagree, the resumed config differs
            from the saved one, or no data is given.
        CheckpointError: if ``config.init`` or last.pt cannot be loaded.
        DatasetError: if the data cannot be loaded, or train and test classes or sizes differ.
    """
    run = run_dir if isinstance(run_dir, RunDirectory) else RunDirectory(run_dir)
    saved_state = _open_run(run, resume)
    # Read before the data, so that a wrong file fails fast.
    agent, agent_model = _load_agent(config.agent) if config.agent is not None else (None, None)
    if resume:
        # Fail before the data is loaded; settings resolved later are checked again then.
        early = config.resolved(arch=config.arch, normalization=config.normalization, num_classes=config.num_classes)
        _check_resumed_config(run, early)
    device = local_device(config.device)
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)

    train_data, test_data = _prepare_data(config, train_data, test_data, progress)
    torch.manual_seed(config.seed)
    if agent is not None:
        model, head_replaced = agent_model, False
        _check_agent_classes(agent, model, train_data)
    else:
        model, head_replaced = _build_model(config, train_data)
    config = config.resolved(
        arch=_arch_name(model),
        normalization=normalization_name(model.normalization),
        num_classes=train_data.num_classes,
    )
    _record_config(run, config, resume)

    trainer = _make_trainer(model, config, len(train_data), device, head_replaced)
    if agent is not None:
        agent.policy.to(device)
        trainer.agent = agent
    if saved_state is not None:
        _restore(trainer, saved_state, run)
        run.truncate_metrics(trainer.epoch)
    else:
        _start(trainer, run, test_data, config, device, progress)
    try:
        images_per_second = _train(trainer, run, train_data, test_data, config, device, progress, on_epoch_end)
    finally:
        run.close()
    return _finish(trainer, run, train_data, images_per_second)


# ---------------------------------------------------------------------------------------------
# Setup


def _open_run(run: RunDirectory, resume: bool) -> dict[str, Any] | None:
    """Check that ``run`` suits a new or resumed run; return last.pt's contents when resuming."""
    if resume:
        if not run.has_checkpoint(LAST_CHECKPOINT):
            raise ConfigError(
                f"cannot resume: {run.path / LAST_CHECKPOINT} not found; start the run without --resume"
            )
        return run.load_checkpoint(LAST_CHECKPOINT, required_keys=("model", "optimizer", "scheduler", "epoch", "rng"))
    if run.has_checkpoint(LAST_CHECKPOINT):
        raise ConfigError(
            f"{run.path} already contains a run ({LAST_CHECKPOINT}); pass --resume to continue it "
            "or choose another --run-dir"
        )
    # Rows of an earlier attempt that died before its first checkpoint.
    run.truncate_metrics(-1)
    return None


def _prepare_data(
    config: PretrainConfig,
    train_data: ImageDataset | None,
    test_data: ImageDataset | None,
    progress: bool,
) -> tuple[ImageDataset, ImageDataset]:
    """Load both splits unless given, check they match, and take the configured subsets."""
    if (train_data is None or test_data is None) and config.data_dir is None and config.dataset != "shapes":
        raise ConfigError("`data_dir` is missing; pass --data-dir with the dataset's train and test splits")
    if train_data is None:
        train_data = load_dataset(config.dataset, config.data_dir, "train", progress=progress)
    if test_data is None:
        test_data = load_dataset(config.dataset, config.data_dir, "test", progress=progress)
    check_same_classes(train_data, test_data)
    if train_data.image_size != test_data.image_size:
        raise DatasetError(
            f"training images are {train_data.image_size} but test images are "
            f"{test_data.image_size}; resize both splits to one size"
        )

    train_data = train_data.sample(config.max_train_images, config.seed)
    test_data = test_data.sample(config.max_test_images, config.seed + 1)
    if len(train_data) < config.batch_size * world_size():
        processes = f" for {world_size()} processes" if world_size() > 1 else ""
        raise ConfigError(
            f"`batch_size` {config.batch_size} exceeds the {len(train_data)} training images{processes}; "
            "pass a smaller --batch-size"
        )
    return train_data, test_data


def _build_model(config: PretrainConfig, train_data: ImageDataset) -> tuple[BlockDropResNet, bool]:
    """Build a new network, or load ``config.init`` and fit its head to the dataset's classes."""
    if config.init is None:
        name = config.normalization or "imagenet"
        model = build_resnet(
            config.arch or DEFAULT_ARCH,
            train_data.num_classes,
            normalization=NORMALIZATION_NAMES.get(name, IMAGENET_NORMALIZATION),
            input_size=train_data.image_size,
        )
        return model, False

    loaded = load_resnet(
        config.init,
        arch=config.arch,
        normalization=config.normalization or "auto",
        input_size=train_data.image_size,
    )
    logger.info("loaded %s", loaded.describe())
    if loaded.model.num_classes == train_data.num_classes:
        return loaded.model, False
    logger.info(
        "replacing the %d-class head of %s with a new %d-class linear layer",
        loaded.model.num_classes,
        config.init,
        train_data.num_classes,
    )
    _replace_head(loaded.model, train_data.num_classes)
    return loaded.model, True


def _load_agent(path: str) -> tuple[FrozenAgent, BlockDropResNet]:
    """Load an agent checkpoint's policy and ResNet.

    Raises:
        CheckpointError: if the file cannot be read, is incomplete or is a plain ResNet checkpoint.
    """
    file = resolve_agent_path(path)
    # Checked first so that a plain ResNet checkpoint gets pretrain's own option in the error.
    read_agent_checkpoint(file, resnet_option="--init")
    policy, loaded, info = load_agent(file)
    logger.info("loaded the agent %s (%s)", info.path, loaded.describe())
    return FrozenAgent(policy, info.num_controlled, info.epoch, info.path), loaded.model


def _check_agent_classes(agent: FrozenAgent, model: BlockDropResNet, train_data: ImageDataset) -> None:
    """Raise ConfigError unless the agent's ResNet has the dataset's number of classes."""
    if model.num_classes != train_data.num_classes:
        raise ConfigError(
            f"`agent` {agent.source} has a {model.num_classes}-class ResNet but the dataset "
            f"{train_data.name} has {train_data.num_classes} classes; pass the agent trained on this dataset"
        )


def _replace_head(model: BlockDropResNet, num_classes: int) -> None:
    """Swap the classifier for a freshly initialised linear layer with ``num_classes`` outputs."""
    name = "linear" if isinstance(model, CifarResNet) else "fc"
    old: nn.Linear = getattr(model, name)
    setattr(model, name, nn.Linear(old.in_features, num_classes))
    model.num_classes = num_classes


def _arch_name(model: BlockDropResNet) -> str:
    if isinstance(model, CifarResNet):
        return f"cifar_resnet{model.depth}"
    if isinstance(model, ImageNetResNet):
        return model.arch
    raise ConfigError(f"`model` must be a CifarResNet or ImageNetResNet, got {type(model).__name__}")


def _record_config(run: RunDirectory, config: PretrainConfig, resume: bool) -> None:
    """Write config.json for a new run; for a resumed one, check that nothing that matters changed."""
    if resume:
        _check_resumed_config(run, config)
    else:
        run.write_config(config)


def _check_resumed_config(run: RunDirectory, config: PretrainConfig) -> None:
    """Raise if ``config`` differs from the run's config.json; None fields are not yet resolved."""
    saved = run.read_config()
    changed = [
        f"{key}: {saved.get(key)!r} in the run, {value!r} now"
        for key, value in asdict(config).items()
        if key not in _RESUMABLE_CHANGES and value is not None and saved.get(key) != value
    ]
    if changed:
        # An agent run's model.pt lacks the policy, so training further starts from its agent.pt.
        further = f"--agent {run.path / AGENT_FILE}" if saved.get("agent") else f"--init {run.path / MODEL_FILE}"
        raise ConfigError(
            f"cannot resume {run.path} with other settings ({'; '.join(changed)}); resume with the "
            f"run's settings, or start a new run with {further} to train further"
        )


def _make_trainer(
    model: BlockDropResNet, config: PretrainConfig, num_train: int, device: torch.device, head_replaced: bool
) -> _Trainer:
    model = model.to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=cast(float, config.lr),  # PretrainConfig.resolved has set it
        momentum=config.momentum,
        nesterov=config.momentum > 0,
        weight_decay=config.weight_decay,
    )
    steps_per_epoch = num_train // config.batch_size
    schedule = WarmupCosine(
        total_steps=config.epochs * steps_per_epoch,
        warmup_steps=round(config.warmup_epochs * steps_per_epoch),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    parallel = wrap_ddp(model, device, sync_bn=config.sync_bn)
    return _Trainer(model, optimizer, scheduler, head_replaced=head_replaced, parallel=parallel)


def _start(
    trainer: _Trainer, run: RunDirectory, test_data: ImageDataset, config: PretrainConfig, device: torch.device, progress: bool
) -> None:
    """Log the ``init`` checkpoint's accuracy as epoch 0 and write the first last.pt."""
    if config.init is not None or config.agent is not None:
        initial = _evaluate(trainer, test_data, config, device, progress)
        trainer.initial_accuracy = initial["test/accuracy"]
        trainer.last_accuracy = trainer.initial_accuracy
        run.log(0, initial)
    run.save_checkpoint(trainer.state_dict(), LAST_CHECKPOINT)


# ---------------------------------------------------------------------------------------------
# Training


def _train(
    trainer: _Trainer,
    run: RunDirectory,
    train_data: ImageDataset,
    test_data: ImageDataset,
    config: PretrainConfig,
    device: torch.device,
    progress: bool,
    on_epoch_end: EpochCallback | None,
) -> float:
    """Run the remaining epochs; return the training images per second over them."""
    images_per_epoch = len(train_data) // config.batch_size * config.batch_size
    bar = tqdm(
        total=config.epochs * images_per_epoch,
        initial=trainer.epoch * images_per_epoch,
        unit="img",
        disable=not progress,
        dynamic_ncols=True,
    )
    rates = []
    try:
        for epoch in range(trainer.epoch + 1, config.epochs + 1):
            started = time.perf_counter()
            metrics = _train_one_epoch(trainer, train_data, config, epoch, device, bar)
            rates.append(metrics["train/images_per_second"])
            metrics.update(_evaluate(trainer, test_data, config, device, progress))
            # Training plus evaluation, so a run resumed after a kill can still add up its time.
            metrics["time/epoch_seconds"] = time.perf_counter() - started
            _end_epoch(trainer, run, epoch, metrics, train_data)
            bar.set_postfix(epoch=epoch, test_accuracy=f"{metrics['test/accuracy']:.4f}")
            if on_epoch_end is not None:
                on_epoch_end(epoch, metrics)
    finally:
        bar.close()
    # Every epoch trains on the same number of images, so the harmonic mean is the overall rate.
    return len(rates) / sum(1 / rate for rate in rates) if rates else math.nan


def _train_one_epoch(
    trainer: _Trainer,
    data: ImageDataset,
    config: PretrainConfig,
    epoch: int,
    device: torch.device,
    bar: tqdm,
) -> dict[str, float]:
    """Train on every full batch of the training images, in the epoch's own random order."""
    generator = _epoch_generator(config.seed, epoch)
    order = shard_order(torch.randperm(len(data), generator=generator))
    # Every rank draws the same permutation; augmentation then draws from the rank's own stream.
    generator = rank_generator(generator)
    steps = len(order) // config.batch_size
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    lr = trainer.optimizer.param_groups[0]["lr"]
    trainer.model.train()
    started = time.perf_counter()

    for step in range(steps):
        index = order[step * config.batch_size : (step + 1) * config.batch_size]
        images = data.images[index]
        if config.augment:
            images = random_crop_flip(images, generator)
        labels = data.labels[index].to(device, non_blocking=True)
        lr = trainer.optimizer.param_groups[0]["lr"]
        loss, batch_correct = _train_step(trainer, images.to(device, non_blocking=True), labels, config, generator)

        loss_sum += loss * labels.shape[0]
        correct += batch_correct
        bar.update(labels.shape[0] * world_size())
        if step % 10 == 9 or step == steps - 1:
            # Checked only where the loss is read anyway, so a GPU is not synchronised every step.
            _check_finite(loss_sum, f"train/loss of epoch {epoch}, steps {step // 10 * 10 + 1}-{step + 1} of {steps}", trainer)
            seen = (step + 1) * config.batch_size
            bar.set_postfix(epoch=epoch, loss=f"{loss_sum.item() / seen:.4f}", accuracy=f"{correct.item() / seen:.4f}")

    loss_sum, correct = sum_over_ranks(loss_sum, correct)
    seen = steps * config.batch_size * world_size()
    return {
        "train/loss": loss_sum.item() / seen,
        "train/accuracy": correct.item() / seen,
        "lr": lr,
        "train/images_per_second": seen / (time.perf_counter() - started),
    }


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """Create the generator of one epoch's data order and augmentation, so resuming needs no sampler state."""
    # SeedSequence mixes (seed, epoch), so seed s epoch e+1 never repeats seed s+1 epoch e.
    mixed = int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator().manual_seed(mixed)


def _train_step(
    trainer: _Trainer,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: PretrainConfig,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step on a batch; return the detached mean loss and the number of correct predictions."""
    model = trainer.model
    inputs = model.preprocess(images)
    if config.channels_last:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    chosen = None
    if trainer.agent is not None:
        # Chosen in float32 outside autocast, so training runs the blocks that evaluation runs.
        with torch.no_grad():
            chosen = trainer.agent.choose(images)
    with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=config.precision == "bfloat16"):
        if chosen is not None:
            logits = trainer.network(inputs, chosen, mode="sparse")
        elif config.stochastic_depth < 1:
            policy = stochastic_depth_policy(labels.shape[0], model.num_blocks, config.stochastic_depth, generator)
            logits = trainer.network(inputs, policy.to(inputs.device), mode="sparse")
        else:
            logits = trainer.network(inputs)
    loss = F.cross_entropy(logits.float(), labels, label_smoothing=config.label_smoothing)

    trainer.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    trainer.optimizer.step()
    trainer.scheduler.step()
    return loss.detach(), (logits.detach().argmax(dim=1) == labels).sum()


def stochastic_depth_policy(
    batch_size: int, num_blocks: int, last_survival: float, generator: torch.Generator
) -> torch.Tensor:
    """Draw a per-sample keep policy (B, K) with survival probabilities falling linearly to ``last_survival``.

    The linear decay rule of Huang et al., "Deep Networks with Stochastic Depth" (ECCV 2016):
    block l of K survives with probability 1 - l / K * (1 - last_survival). Unlike that paper, the
    draw is per sample rather than per batch, and the sparse forward skips dropped blocks entirely.
    """
    depth = torch.arange(1, num_blocks + 1, dtype=torch.float64) / num_blocks
    survival = 1.0 - depth * (1.0 - last_survival)
    return torch.rand(batch_size, num_blocks, generator=generator, dtype=torch.float64) < survival


def _evaluate(
    trainer: _Trainer, data: ImageDataset, config: PretrainConfig, device: torch.device, progress: bool
) -> dict[str, float]:
    """Measure the test accuracy with BatchNorm in eval mode: every block, or the agent's blocks and their count."""
    model = trainer.model
    broadcast_buffers(model)
    policy_fn = AllBlocks(model.num_blocks) if trainer.agent is None else trainer.agent.choose
    result, _ = evaluate_sharded(
        model, data, policy_fn, batch_size=config.eval_batch_size, device=device, progress=progress
    )
    if trainer.agent is None:
        return {"test/accuracy": result.accuracy}
    return {"test/accuracy": result.accuracy, "test/blocks_mean": result.blocks_mean, "test/blocks_std": result.blocks_std}


def _check_finite(value: torch.Tensor, quantity: str, trainer: _Trainer) -> None:
    """Raise TrainingError when ``value`` contains NaN or inf; ``trainer.epoch`` is the last one saved."""
    if bool(torch.isfinite(value).all()):
        return
    saved = f"epoch {trainer.epoch}" if trainer.epoch > 0 else "the state before training"
    raise TrainingError(
        f"training diverged: {quantity} contains NaN or inf; {LAST_CHECKPOINT} still contains {saved}. "
        f"Start again in a new --run-dir with a lower --lr than {trainer.optimizer.param_groups[0]['initial_lr']:g}"
    )


def _restore(trainer: _Trainer, state: Mapping[str, Any], run: RunDirectory) -> None:
    """Load last.pt into ``trainer``, turning a mismatch into a CheckpointError that names the file."""
    try:
        trainer.load_state_dict(state)
    except (KeyError, RuntimeError, TypeError, ValueError) as error:
        reason = " ".join(str(error).split())[:200]
        raise CheckpointError(
            f"checkpoint {run.path / LAST_CHECKPOINT} does not fit this run ({type(error).__name__}: {reason}); "
            f"restore the run's own {LAST_CHECKPOINT} from a copy, or start a new --run-dir"
        ) from None


def _end_epoch(
    trainer: _Trainer, run: RunDirectory, epoch: int, metrics: dict[str, float], train_data: ImageDataset
) -> None:
    """Log the epoch, save the best network if it improved, then last.pt."""
    for name, parameter in trainer.model.named_parameters():
        _check_finite(parameter.detach(), f"weight {name} after epoch {epoch}", trainer)
    trainer.epoch = epoch
    trainer.last_accuracy = metrics["test/accuracy"]
    trainer.last_metrics = {key: value for key, value in metrics.items() if key.startswith("test/")}
    run.log(epoch, metrics)
    if trainer.last_accuracy > trainer.best_accuracy:
        trainer.best_accuracy = trainer.last_accuracy
        trainer.best_epoch = epoch
        # NOTE: the best epoch is chosen on the test split, so best_model.pt's accuracy is an
        # optimistic estimate. model.pt, the last epoch, is not selected on it.
        if is_main_process():
            save_resnet(trainer.model, run.path / BEST_MODEL_FILE, extra=_model_extra(trainer, epoch, train_data))
            if trainer.agent is not None:
                run.save_checkpoint(trainer.agent.state(trainer.model, trainer.last_metrics), BEST_AGENT_FILE)
        run.save_checkpoint(trainer.state_dict(), BEST_CHECKPOINT)
    run.save_checkpoint(trainer.state_dict(), LAST_CHECKPOINT)
    barrier()


def _model_extra(trainer: _Trainer, epoch: int, train_data: ImageDataset) -> dict[str, Any]:
    """Metadata stored next to the weights in model.pt and best_model.pt."""
    return {
        "trained_by": "blockdrop pretrain",
        "epoch": epoch,
        "test_accuracy": trainer.last_accuracy,
        "initial_test_accuracy": trainer.initial_accuracy,
        "agent": None if trainer.agent is None else str(trainer.agent.source),
        "classes": list(train_data.classes),
        "dataset": train_data.name,
    }


def _finish(
    trainer: _Trainer, run: RunDirectory, train_data: ImageDataset, images_per_second: float
) -> PretrainResult:
    """Save the final network as model.pt (and with the policy as agent.pt) and summarise the run."""
    model_path = run.path / MODEL_FILE
    if is_main_process():
        save_resnet(trainer.model, model_path, extra=_model_extra(trainer, trainer.epoch, train_data))
    agent_path = None
    if trainer.agent is not None:
        agent_path = run.save_checkpoint(trainer.agent.state(trainer.model, trainer.last_metrics), AGENT_FILE)
    return PretrainResult(
        run_dir=run.path,
        model_path=model_path,
        best_model_path=run.path / BEST_MODEL_FILE,
        epochs=trainer.epoch,
        initial_accuracy=trainer.initial_accuracy,
        final_accuracy=trainer.last_accuracy,
        best_accuracy=trainer.best_accuracy,
        best_epoch=trainer.best_epoch,
        head_replaced=trainer.head_replaced,
        train_images_per_second=images_per_second,
        agent_path=agent_path,
    )
