"""Tests for agents/distributed.py: data-parallel training over processes with torch.distributed.

The multi-process tests start 2 CPU processes with the gloo backend on the loopback interface
(127.0.0.1, a free port from binding port 0) and compare them with one process on the union of
their shards.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from agents import reinforce
from agents.distributed import (
    DistributedContext,
    _interleave,
    check_sync_bn,
    evaluate_sharded,
    gather_objects,
    launch_context,
    rank_seed,
    reject_default_run_dir,
    shard_dataset,
    shard_order,
    shard_positions,
)
from agents.evaluation import EvaluationRecord, evaluate_policy
from agents.finetune import FinetuneConfig
from agents.pretrain import PretrainConfig, _make_trainer, _train_step
from agents.reinforce import CurriculumTrainer, RolloutStats, TrainConfig
from agents.runs import RunDirectory
from blockdrop_env.checkpoints import save_resnet
from blockdrop_env.data import ImageDataset
from blockdrop_env.errors import ConfigError
from blockdrop_env.resnet import CifarResNet
from tests.conftest import REPO_ROOT, run_cli, write_image_folder

WORLD_SIZE = 2
NUM_TRAIN = 8  # 4 images per rank: each rank's first batch is its whole shard
NUM_TEST = 7  # odd, so the two evaluation shards differ in size
LOOPBACK = {"MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: faster for these tiny networks on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def random_dataset(count: int, seed: int) -> ImageDataset:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, 3, 16, 16), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 3, (count,), generator=generator)
    return ImageDataset(images, labels, ["a", "b", "c"], "random")


def tiny_resnet() -> CifarResNet:
    torch.manual_seed(0)
    return CifarResNet(depth=8, num_classes=3, input_size=(16, 16)).eval()


def image_bits(images: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """A fixed 0/1 policy (B, K) per image, from its pixel sum: the same image gets the same bits in any batch."""
    codes = images.long().sum(dim=(1, 2, 3))
    return ((codes[:, None] >> torch.arange(num_blocks, device=images.device)) & 1).bool()


# -- steps run both in one process and in each of two ranks ------------------------------------


def policy_gradient_step(run_dir: Path, batch_size: int) -> dict[str, Any]:
    """One REINFORCE step of CurriculumTrainer with fixed actions and eval-mode BatchNorm, then an evaluation."""
    config = TrainConfig(
        run_dir=str(run_dir), epochs=1, batch_size=batch_size, lr=1e-2, alpha=0.8, beta=0.1,
        penalty=2.0, epochs_per_stage=0, augment=False, seed=0,
    )
    trainer = CurriculumTrainer(config, tiny_resnet(), random_dataset(NUM_TRAIN, 0), random_dataset(NUM_TEST, 1))
    num_blocks = trainer.env.num_blocks

    def fixed_actions(probs: torch.Tensor, alpha: float, mask: torch.Tensor) -> torch.Tensor:
        return image_bits(trainer.env.current_images, num_blocks) | ~mask

    trainer.env.set_curriculum(num_blocks)
    trainer.env.reset(seed=0)
    trainer.policy.eval()  # batch statistics frozen, so the step does not depend on how images are split
    stats = RolloutStats()
    with mock.patch.object(reinforce, "sample_actions", fixed_actions):
        trainer.train_step(stats)
    return {
        "parameters": {name: p.detach().clone() for name, p in trainer.policy.named_parameters()},
        "gradients": {name: p.grad.clone() for name, p in trainer.policy.named_parameters()},
        "train": RolloutStats.combine(gather_objects(stats)).metrics(),
        "test": trainer.evaluate(num_blocks),
    }


def pretrain_sgd_step(images: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """One SGD step of the pretrain trainer with eval-mode BatchNorm."""
    config = PretrainConfig(dataset="shapes", batch_size=len(images), lr=0.1, channels_last=False, augment=False)
    trainer = _make_trainer(tiny_resnet(), config, NUM_TRAIN, torch.device("cpu"), head_replaced=False)
    trainer.model.eval()
    _train_step(trainer, images, labels, config)
    return {
        "parameters": {name: p.detach().clone() for name, p in trainer.model.named_parameters()},
        "gradients": {name: p.grad.clone() for name, p in trainer.model.named_parameters()},
    }


def sharded_evaluation() -> tuple[dict[str, Any], EvaluationRecord]:
    model = tiny_resnet()
    result, record = evaluate_sharded(
        model, random_dataset(NUM_TEST, 1), lambda images: image_bits(images, model.num_blocks), batch_size=2
    )
    return result.to_dict(), record


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(LOOPBACK, MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    try:
        train = random_dataset(NUM_TRAIN, 0)
        shard = shard_dataset(train)
        results = {
            "policy": policy_gradient_step(Path(out_dir) / "run", batch_size=len(shard)),
            "pretrain": pretrain_sgd_step(shard.images, shard.labels),
            "evaluation": sharded_evaluation(),
        }
        shared = RunDirectory(Path(out_dir) / "shared", tensorboard=False)
        shared.log(0, {"rank": float(rank)})
        shared.save_checkpoint({"rank": rank})
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict[str, Any]]:
    """Results of the steps above in 2 gloo processes, in rank order."""
    out_dir = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(WORLD_SIZE, free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=True)
    results = [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]
    results[0]["shared_dir"] = out_dir / "shared"
    return results


def assert_close_to_scale(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], tolerance: float) -> None:
    """Check that each tensor's largest difference is at most ``tolerance`` times its largest magnitude.

    Relative to the tensor's scale rather than per element: float32 sums taken in another order
    differ by a few ulps of the largest terms, which is large relative to an element near 0.
    """
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        error = float((actual[name] - value).abs().max())
        scale = float(value.abs().max())
        assert error <= tolerance * scale, f"{name}: max difference {error:.3g} > {tolerance:g} x {scale:.3g}"


# -- two processes against one ------------------------------------------------------------------


def test_policy_step_leaves_ranks_identical(two_ranks):
    first, second = (rank["policy"]["parameters"] for rank in two_ranks)
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_policy_step_equals_single_process_on_union(two_ranks, tmp_path):
    single = policy_gradient_step(tmp_path / "run", batch_size=NUM_TRAIN)
    assert_close_to_scale(two_ranks[0]["policy"]["gradients"], single["gradients"], 1e-5)
    # Adam's first step moves a weight by about lr * g / (|g| + eps), so float32 noise of ~1e-8
    # in a gradient near 0 moves it by up to ~1e-5 at lr 1e-2; the gradients are the tight check.
    assert_close_to_scale(two_ranks[0]["policy"]["parameters"], single["parameters"], 1e-4)


def test_policy_step_actually_changes_weights(two_ranks):
    gradients = two_ranks[0]["policy"]["gradients"]
    assert any(float(gradient.abs().max()) > 0 for gradient in gradients.values())


def test_train_metrics_equal_single_process(two_ranks, tmp_path):
    single = policy_gradient_step(tmp_path / "run", batch_size=NUM_TRAIN)["train"]
    for rank in two_ranks:
        assert rank["policy"]["train"] == pytest.approx(single, rel=1e-6)


def test_test_metrics_equal_single_process(two_ranks, tmp_path):
    single = policy_gradient_step(tmp_path / "run", batch_size=NUM_TRAIN)["test"]
    for rank in two_ranks:
        assert rank["policy"]["test"] == pytest.approx(single, rel=1e-12)


def test_pretrain_step_leaves_ranks_identical(two_ranks):
    first, second = (rank["pretrain"]["parameters"] for rank in two_ranks)
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_pretrain_sgd_step_equals_union(two_ranks):
    train = random_dataset(NUM_TRAIN, 0)
    single = pretrain_sgd_step(train.images, train.labels)
    assert_close_to_scale(two_ranks[0]["pretrain"]["gradients"], single["gradients"], 1e-5)
    assert_close_to_scale(two_ranks[0]["pretrain"]["parameters"], single["parameters"], 1e-6)


def test_sharded_evaluation_equals_single_process(two_ranks):
    model = tiny_resnet()
    data = random_dataset(NUM_TEST, 1)
    result, record = evaluate_policy(
        model, data, lambda images: image_bits(images, model.num_blocks), batch_size=2, record=True
    )
    for rank in two_ranks:
        sharded, sharded_record = rank["evaluation"]
        assert sharded == result.to_dict()
        assert torch.equal(sharded_record.predictions, record.predictions)
        assert torch.equal(sharded_record.policies, record.policies)


def test_only_rank_zero_writes_run_directory(two_ranks):
    shared = two_ranks[0]["shared_dir"]
    rows = [json.loads(line) for line in (shared / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"epoch": 0, "rank": 0.0}]
    assert torch.load(shared / "last.pt", weights_only=True) == {"rank": 0}


# -- torchrun end to end ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    save_resnet(tiny_resnet(), root / "resnet.pt")
    write_image_folder(root / "images", num_classes=3, per_class=8, size=16)
    return root


def train_args(setup: Path, run_dir: Path, epochs: int) -> list[str]:
    return [
        "train", "--resnet", str(setup / "resnet.pt"), "--dataset", "imagefolder",
        "--data-dir", str(setup / "images"), "--run-dir", str(run_dir), "--epochs", str(epochs),
        "--batch-size", "4", "--epochs-per-stage", "0", "--quiet",
    ]


def torchrun(args: list[str]) -> subprocess.CompletedProcess[str]:
    launcher = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD_SIZE),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "agents.cli",
    ]
    env = {**os.environ, **LOOPBACK}
    return subprocess.run(launcher + args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180)


def test_torchrun_run_resumes_with_other_world_size(tiny_setup, tmp_path, capsys):
    run_dir = tmp_path / "run"
    done = torchrun(train_args(tiny_setup, run_dir, epochs=1))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [0]
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    assert done.stdout.count("best policy of") == 1
    assert torch.load(run_dir / "last.pt", weights_only=True)["epoch"] == 0

    status, _, err = run_cli([*train_args(tiny_setup, run_dir, epochs=2), "--resume"], capsys)
    assert status == 0, err
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [0, 1]
    assert torch.load(run_dir / "last.pt", weights_only=True)["epoch"] == 1

    done = torchrun([*train_args(tiny_setup, run_dir, epochs=3), "--resume"])
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [0, 1, 2]


# -- helpers without processes ------------------------------------------------------------------


@pytest.fixture()
def launch_environment(monkeypatch) -> Iterator[None]:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    yield


def test_launch_context_without_variables_is_single(launch_environment):
    assert launch_context() == DistributedContext(0, 1, 0)


def test_launch_context_reads_torchrun_variables(launch_environment, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert launch_context() == DistributedContext(3, 4, 1)


def test_launch_context_rejects_partial_variables(launch_environment, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match=r"sets \['RANK'\] but not \['WORLD_SIZE', 'LOCAL_RANK'\]"):
        launch_context()


def test_launch_context_rejects_non_integer(launch_environment, monkeypatch):
    monkeypatch.setenv("RANK", "zero")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ConfigError, match="RANK must be an integer, got 'zero'"):
        launch_context()


def test_launch_context_rejects_rank_out_of_range(launch_environment, monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ConfigError, match=r"RANK must be in \[0, WORLD_SIZE\), got RANK=2"):
        launch_context()


def test_default_run_dir_rejected_under_torchrun(launch_environment, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ConfigError, match="under torchrun pass --run-dir"):
        reject_default_run_dir()


def test_default_run_dir_allowed_in_single_process(launch_environment):
    reject_default_run_dir()


def test_shard_positions_partition_the_dataset():
    shards = [shard_positions(11, DistributedContext(rank, 3)) for rank in range(3)]
    assert [len(shard) for shard in shards] == [4, 4, 3]
    assert sorted(torch.cat(shards).tolist()) == list(range(11))


def test_shard_order_gives_equal_disjoint_parts():
    order = torch.randperm(11, generator=torch.Generator().manual_seed(0))
    parts = [shard_order(order, DistributedContext(rank, 3)) for rank in range(3)]
    assert [len(part) for part in parts] == [3, 3, 3]
    assert len(set(torch.cat(parts).tolist())) == 9


def test_shard_order_single_process_keeps_order():
    order = torch.randperm(5)
    assert torch.equal(shard_order(order, DistributedContext()), order)


def test_rank_seed_differs_per_rank():
    seeds = {rank_seed(7, DistributedContext(rank, 4)) for rank in range(4)}
    assert len(seeds) == 4


def test_rank_seed_single_process_is_identity():
    assert rank_seed(7, DistributedContext()) == 7


def test_interleave_restores_dataset_order():
    policies = torch.arange(7 * 2).reshape(7, 2) % 2 == 0
    parts = [
        EvaluationRecord(torch.arange(7)[rank::2], torch.ones(7, dtype=torch.bool)[rank::2], policies[rank::2])
        for rank in range(2)
    ]
    merged = _interleave(parts, 7)
    assert torch.equal(merged.predictions, torch.arange(7))
    assert torch.equal(merged.policies, policies)


def test_interleave_skips_ranks_without_images():
    record = EvaluationRecord(torch.tensor([5]), torch.tensor([True]), torch.ones(1, 3, dtype=torch.bool))
    merged = _interleave([record, None], 1)
    assert merged.predictions.tolist() == [5]


def test_rollout_stats_combine_equals_one_record():
    info = {
        "correct": [True, False], "blocks_used": [2, 3], "flops": [1.0, 2.0],
        "policy": [[1, 1, 0], [1, 1, 1]],
    }
    first, second, both = RolloutStats(), RolloutStats(), RolloutStats()
    first.add([1.0, -1.0], torch.tensor([0.5, 0.5]), info, **{"loss/total": 1.0})
    second.add([2.0, 0.0], torch.tensor([0.0, 0.0]), info, **{"loss/total": 3.0})
    both.add([1.0, -1.0], torch.tensor([0.5, 0.5]), info, **{"loss/total": 1.0})
    both.add([2.0, 0.0], torch.tensor([0.0, 0.0]), info, **{"loss/total": 3.0})
    assert RolloutStats.combine([first, second]).metrics() == both.metrics()


def test_check_sync_bn_rejects_cpu():
    with pytest.raises(ConfigError, match="sync_bn \\(--sync-bn\\) needs --device cuda, got device 'cpu'"):
        check_sync_bn(True, "cpu")


def test_finetune_config_rejects_sync_bn_on_cpu():
    with pytest.raises(ConfigError, match="sync_bn \\(--sync-bn\\) needs --device cuda"):
        FinetuneConfig(from_run="run", run_dir="ft", sync_bn=True)


def test_pretrain_config_rejects_sync_bn_on_cpu():
    with pytest.raises(ConfigError, match="sync_bn \\(--sync-bn\\) needs --device cuda"):
        PretrainConfig(dataset="shapes", sync_bn=True)
