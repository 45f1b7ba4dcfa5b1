"""Data-parallel training over several processes and hosts with ``torch.distributed``.

``blockdrop train``, ``finetune`` and ``pretrain`` run unchanged under ``torchrun``, which starts
one process per device and sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (plus
``MASTER_ADDR`` and ``MASTER_PORT``). With those variables and a world size above 1, the
commands join a process group (``gloo`` on CPUs, ``nccl`` on GPUs, one GPU per process:
``cuda:LOCAL_RANK``), and:

- each rank trains on its own shard of the training images (positions ``rank::world_size``),
  with its own random streams (see :func:`rank_seed`);
- :class:`~torch.nn.parallel.DistributedDataParallel` averages the gradients, so every rank
  has the same weights after each step;
- training metrics and test evaluations are gathered from every rank before they are logged;
- only rank 0 writes config.json, metrics, TensorBoard events and checkpoints, and checkpoints
  contain the unwrapped networks, so a run resumes with any number of processes.

Without those variables, or with a world size of 1, every helper here is a no-op and training
runs exactly as in a single process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from agents.evaluation import EvaluationRecord, EvaluationResult, PolicyFn, evaluate_policy, summarize
from blockdrop_env.data import ImageDataset
from blockdrop_env.errors import ConfigError
from blockdrop_env.resnet import BlockDropResNet

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
"""Environment variables that ``torchrun`` sets in every process it starts."""


@dataclass(frozen=True)
class DistributedContext:
    """Position of this process in a multi-process run.

    Attributes:
        rank: Global index of this process, 0 to ``world_size - 1``.
        world_size: Number of processes in the run.
        local_rank: Index of this process on its host; picks its GPU.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_distributed(self) -> bool:
        """Whether more than one process trains."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the process that writes the run directory."""
        return self.rank == 0


# ---------------------------------------------------------------------------------------------
# Launch and process group


def launch_context() -> DistributedContext:
    """Read the process's place in the run from the variables ``torchrun`` sets.

    Returns:
        The context they describe, or a single-process context when none of them is set.

    Raises:
        ConfigError: if only some of the variables are set, or one is not a valid integer.
    """
    present = [name for name in LAUNCH_VARIABLES if name in os.environ]
    if not present:
        return DistributedContext()
    if len(present) != len(LAUNCH_VARIABLES):
        missing = [name for name in LAUNCH_VARIABLES if name not in present]
        raise ConfigError(
            f"the environment sets {present} but not {missing}; launch with torchrun, which sets "
            f"all of {list(LAUNCH_VARIABLES)}, or unset them for a single process"
        )
    values = {name: _read_variable(name) for name in LAUNCH_VARIABLES}
    context = DistributedContext(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"])
    if context.world_size < 1 or not 0 <= context.rank < context.world_size:
        raise ConfigError(
            f"RANK must be in [0, WORLD_SIZE), got RANK={context.rank} and "
            f"WORLD_SIZE={context.world_size}; launch with torchrun"
        )
    return context


def _read_variable(name: str) -> int:
    text = os.environ[name]
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"environment variable {name} must be an integer, got {text!r}; launch with torchrun") from None


def current_context() -> DistributedContext:
    """Rank and world size of the initialised default process group, else a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistributedContext()
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank)


def is_main_process() -> bool:
    """Whether this process writes files: rank 0, or the only process."""
    return current_context().is_main


def backend_for(device: str | torch.device) -> str:
    """Collective backend for training on ``device``: ``nccl`` on CUDA, ``gloo`` on CPUs."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


@contextmanager
def distributed_session(device: str) -> Iterator[DistributedContext]:
    """Join the process group that ``torchrun`` describes for the duration of the block.

    Without the launch variables, or with ``WORLD_SIZE=1``, nothing is initialised. A group
    that is already initialised is used as it is and left open.

    Args:
        device: The command's ``--device``; ``cuda`` selects ``nccl`` and the GPU ``LOCAL_RANK``.

    Yields:
        This process's context.

    Raises:
        ConfigError: on invalid launch variables, or ``cuda`` without enough visible GPUs.
    """
    if dist.is_available() and dist.is_initialized():
        yield current_context()
        return
    context = launch_context()
    if not context.is_distributed:
        yield context
        return
    if torch.device(device).type == "cuda":
        _select_gpu(context)
    dist.init_process_group(backend=backend_for(device), rank=context.rank, world_size=context.world_size)
    try:
        yield context
    finally:
        dist.destroy_process_group()


def _select_gpu(context: DistributedContext) -> None:
    available = torch.cuda.device_count()
    if context.local_rank >= available:
        raise ConfigError(
            f"process LOCAL_RANK={context.local_rank} needs GPU {context.local_rank} but this host "
            f"has {available} visible GPUs; start at most {available} processes per host with "
            "--nproc-per-node"
        )
    torch.cuda.set_device(context.local_rank)


def local_device(device: str) -> torch.device:
    """Return the device this process trains on: ``cuda:LOCAL_RANK`` for any CUDA device under torchrun."""
    resolved = torch.device(device)
    context = current_context()
    if resolved.type == "cuda" and context.is_distributed:
        return torch.device("cuda", context.local_rank)
    return resolved


def reject_default_run_dir() -> None:
    """Raise in a multi-process launch, where a time-stamped default directory could differ per process.

    Raises:
        ConfigError: if ``torchrun`` started this process with a world size above 1.
    """
    if launch_context().is_distributed:
        raise ConfigError(
            "run_dir (--run-dir) is missing; under torchrun pass --run-dir so that every process "
            "uses the same run directory"
        )


# ---------------------------------------------------------------------------------------------
# Sharding and random streams


def shard_positions(size: int, context: DistributedContext | None = None) -> torch.Tensor:
    """Positions ``rank::world_size`` of ``size`` items: this rank's share, disjoint from the others'."""
    context = context or current_context()
    return torch.arange(context.rank, size, context.world_size)


def shard_dataset(dataset: ImageDataset, context: DistributedContext | None = None) -> ImageDataset:
    """This rank's shard of ``dataset``; the dataset itself in a single process."""
    context = context or current_context()
    if not context.is_distributed:
        return dataset
    return dataset.subset(shard_positions(len(dataset), context))


def shard_order(order: torch.Tensor, context: DistributedContext | None = None) -> torch.Tensor:
    """This rank's part of an epoch's permutation, as a distributed sampler gives it.

    Every rank draws the same permutation (same seed) and takes positions ``rank::world_size``,
    cut to ``len(order) // world_size`` so that all ranks take the same number of steps.
    """
    context = context or current_context()
    if not context.is_distributed:
        return order
    return order[context.rank :: context.world_size][: len(order) // context.world_size]


def rank_seed(seed: int, context: DistributedContext | None = None) -> int:
    """Seed for this rank's random streams: ``seed`` in a single process, a per-rank seed otherwise.

    The per-rank seed mixes ``(seed, rank)`` with NumPy's ``SeedSequence``, so no two ranks, and
    no rank and epoch, share a stream the way ``seed + rank`` would let rank 1 of epoch 0 repeat
    rank 0 of epoch 1.
    """
    context = context or current_context()
    if not context.is_distributed:
        return seed
    return int(np.random.SeedSequence([seed, context.rank]).generate_state(1)[0])


def reseed_torch_per_rank(seed: int) -> None:
    """Seed torch's global generator with :func:`rank_seed` in a multi-process run; no-op otherwise.

    Action sampling draws from that generator, and every rank started from the same seed (for
    equal initial weights), so without this all ranks would draw the same noise.
    """
    if current_context().is_distributed:
        torch.manual_seed(rank_seed(seed))


def rank_generator(generator: torch.Generator) -> torch.Generator:
    """``generator`` in a single process; otherwise a new one seeded per rank from its seed."""
    if not current_context().is_distributed:
        return generator
    return torch.Generator().manual_seed(rank_seed(generator.initial_seed()))


# ---------------------------------------------------------------------------------------------
# Collectives


def barrier() -> None:
    """Wait until every rank reaches this point; no-op in a single process."""
    if current_context().is_distributed:
        dist.barrier()


def gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank; ``[value]`` in a single process.

    ``value`` travels pickled, so tensors in it should be on the CPU.
    """
    context = current_context()
    if not context.is_distributed:
        return [value]
    gathered: list[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def sum_over_ranks(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Element-wise sums over all ranks, as new tensors; the inputs themselves in a single process."""
    if not current_context().is_distributed:
        return list(tensors)
    totals = [tensor.detach().clone() for tensor in tensors]
    for total in totals:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return totals


def max_over_ranks(value: int) -> int:
    """Largest ``value`` over all ranks."""
    return max(gather_objects(int(value)))


def world_size() -> int:
    """Number of processes in the run; 1 without a process group."""
    return current_context().world_size


# ---------------------------------------------------------------------------------------------
# Modules


def wrap_ddp(module: nn.Module, device: torch.device, *, sync_bn: bool = False) -> nn.Module:
    """Wrap ``module`` for data-parallel training; return it unchanged in a single process.

    Args:
        module: The network to train; its parameters stay the same objects, so optimisers
            built on them keep working.
        device: Where ``module`` lives; on CUDA it is this rank's GPU.
        sync_bn: Replace BatchNorm layers by SyncBatchNorm, which normalises over the batches of
            all ranks (GPU only). The replacement happens in place below the top module.

    Returns:
        A :class:`DistributedDataParallel` around ``module`` in a multi-process run, else ``module``.
    """
    if not current_context().is_distributed:
        return module
    if sync_bn:
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def unwrap(module: nn.Module) -> nn.Module:
    """The network inside a DistributedDataParallel wrapper, or ``module`` itself."""
    return module.module if isinstance(module, DistributedDataParallel) else module


def broadcast_buffers(*modules: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DistributedDataParallel copies them at the start of each forward, but each rank then
    updates its own from its own batch. Copying them before evaluation makes every rank use the
    statistics that rank 0 saves in the checkpoint.
    """
    if not current_context().is_distributed:
        return
    for module in modules:
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)


def check_sync_bn(sync_bn: bool, device: str) -> None:
    """Reject ``sync_bn`` on a CPU device.

    Raises:
        ConfigError: if ``sync_bn`` is set and ``device`` is not CUDA.
    """
    if sync_bn and torch.device(device).type != "cuda":
        raise ConfigError(
            f"sync_bn (--sync-bn) needs --device cuda, got device {device!r}; torch's "
            "SyncBatchNorm runs on GPUs only, so drop --sync-bn when training on CPUs"
        )


# ---------------------------------------------------------------------------------------------
# Evaluation


def evaluate_sharded(
    model: BlockDropResNet,
    dataset: ImageDataset,
    policy_fn: PolicyFn,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> tuple[EvaluationResult, EvaluationRecord]:
    """Evaluate a policy with each rank scoring its shard, then combine the shards on every rank.

    The per-image records are put back in dataset order before the metrics are computed, so the
    result equals :func:`~agents.evaluation.evaluate_policy` on the whole split in one process.

    Args:
        model: The network, the same on every rank.
        dataset: The whole split, the same on every rank.
        policy_fn: Policy for each batch of uint8 images.
        batch_size: Images per forward pass on each rank.
        device: Where this rank's forward passes run.
        progress: Show a progress bar of this rank's shard.

    Returns:
        The metrics and the per-image record of the whole split.

    Raises:
        ConfigError: as :func:`~agents.evaluation.evaluate_policy`.
    """
    context = current_context()
    if not context.is_distributed:
        return _evaluate_with_record(model, dataset, policy_fn, batch_size, device, progress)
    shard = shard_dataset(dataset, context)
    local = None
    if len(shard) > 0:
        local = _evaluate_with_record(model, shard, policy_fn, batch_size, device, progress)[1]
    record = _interleave(gather_objects(local), len(dataset))
    return summarize(model, record.correct, record.policies), record


def _evaluate_with_record(
    model: BlockDropResNet,
    dataset: ImageDataset,
    policy_fn: PolicyFn,
    batch_size: int,
    device: str | torch.device,
    progress: bool,
) -> tuple[EvaluationResult, EvaluationRecord]:
    result = evaluate_policy(
        model, dataset, policy_fn, batch_size=batch_size, device=device, progress=progress, record=True
    )
    return cast(tuple[EvaluationResult, EvaluationRecord], result)  # record=True adds the record


def _interleave(parts: Sequence[EvaluationRecord | None], size: int) -> EvaluationRecord:
    """Put each rank's shard back at positions ``rank::world_size``; ranks with no images send None."""
    present = [part for part in parts if part is not None]
    fields = {}
    for name in ("predictions", "correct", "policies"):
        example = getattr(present[0], name)
        merged = torch.empty((size, *example.shape[1:]), dtype=example.dtype)
        for rank, part in enumerate(parts):
            if part is not None:
                merged[rank :: len(parts)] = getattr(part, name)
        fields[name] = merged
    return EvaluationRecord(**fields)
