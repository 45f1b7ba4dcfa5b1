"""Reliability: killed runs resume exactly, diverged runs stop cleanly, equal seeds give equal runs.

The kill tests start `blockdrop train` and `blockdrop pretrain` in a subprocess and SIGKILL it,
either at seeded random moments or inside a checkpoint write. The write is paused by patching
``torch.save`` or ``os.replace`` in the child process only, so the product has no test hook.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
import types
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from agents.finetune import FinetuneConfig, JointFinetuner
from agents.pretrain import PretrainConfig, pretrain
from agents.reinforce import CurriculumTrainer, TrainConfig, build_policy
from blockdrop_env.checkpoints import save_resnet
from blockdrop_env.data import ImageDataset
from blockdrop_env.errors import TrainingError
from blockdrop_env.resnet import CifarResNet
from tests.conftest import REPO_ROOT, run_cli, write_image_folder

pytestmark = pytest.mark.filterwarnings("ignore:the curriculum gives the agent")

# Runs `blockdrop ARGS` in a child process. RELIABILITY_PAUSE="MODE:N:MARKER" pauses the N-th write
# of last.pt and creates MARKER: "torn" after half of the bytes are in the temporary file,
# "before_replace" after the whole temporary file is written but before the rename.
CHILD_SCRIPT = r"""
import io, os, sys, time
import torch

torch.set_num_threads(1)
pause = os.environ.get("RELIABILITY_PAUSE")
if pause:
    mode, nth, marker = pause.split(":", 2)
    count = [0]

    def pause_here():
        open(marker, "w").close()
        time.sleep(600)

    if mode == "torn":
        real_save = torch.save

        def torn_save(obj, file, *args, **kwargs):
            target = os.readlink(f"/proc/self/fd/{file.fileno()}") if hasattr(file, "fileno") else ""
            if os.path.basename(target).startswith(".last.pt."):
                count[0] += 1
                if count[0] == int(nth):
                    buffer = io.BytesIO()
                    real_save(obj, buffer, *args, **kwargs)
                    file.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                    file.flush()
                    os.fsync(file.fileno())
                    pause_here()
            return real_save(obj, file, *args, **kwargs)

        torch.save = torn_save
    else:
        real_replace = os.replace

        def slow_replace(source, target, *args, **kwargs):
            if os.path.basename(str(target)) == "last.pt":
                count[0] += 1
                if count[0] == int(nth):
                    pause_here()
            return real_replace(source, target, *args, **kwargs)

        os.replace = slow_replace

from agents.cli import main
main(sys.argv[1:])
"""

TIMING_KEYS = ("time/", "train/images_per_second")


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread, as in the child processes: equal arithmetic and faster tiny networks."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    """A ResNet-8 checkpoint for 16x16 images and an ImageFolder tree of 3 classes, 8 images each."""
    root = tmp_path_factory.mktemp("reliability")
    torch.manual_seed(0)
    save_resnet(CifarResNet(depth=8, num_classes=3, input_size=(16, 16)), root / "resnet.pt")
    write_image_folder(root / "images", num_classes=3, per_class=8, size=16)
    return root


def train_args(setup: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["train", "--resnet", str(setup / "resnet.pt"), "--dataset", "imagefolder", "--data-dir",
            str(setup / "images"), "--run-dir", str(run_dir), "--epochs", "3", "--batch-size", "8",
            "--penalty", "2", "--quiet", *extra]


def pretrain_args(setup: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["pretrain", "--arch", "cifar_resnet8", "--dataset", "imagefolder", "--data-dir",
            str(setup / "images"), "--run-dir", str(run_dir), "--epochs", "3", "--batch-size", "8",
            "--lr", "0.05", "--quiet", *extra]


def start_child(args: list[str], pause: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RELIABILITY_PAUSE", None)
    if pause is not None:
        env["RELIABILITY_PAUSE"] = pause
    return subprocess.Popen(
        [sys.executable, "-c", CHILD_SCRIPT, *args],
        cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.02)


def rows(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if not k.startswith(TIMING_KEYS)} for line in lines]


def saved_epoch(run_dir: Path) -> int | None:
    """Epoch stored in last.pt, which must load with weights_only=True; None when there is none."""
    last = run_dir / "last.pt"
    if not last.exists():
        return None
    return int(torch.load(last, map_location="cpu", weights_only=True)["epoch"])


def temporaries(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob(".*.tmp")) + sorted(run_dir.glob(".*.tmp-*"))


def assert_lost_at_most_one_epoch(run_dir: Path) -> None:
    """Rows are logged just before each checkpoint, so at most one row is newer than last.pt."""
    epoch = saved_epoch(run_dir)
    logged = [row["epoch"] for row in rows(run_dir)] if (run_dir / "metrics.jsonl").exists() else []
    newest = max(logged, default=-1)
    assert newest - (epoch if epoch is not None else -1) <= 1


@pytest.fixture(scope="module")
def reference_train(setup, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference") / "train"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from agents.cli import main

        main(train_args(setup, run_dir))
    finally:
        torch.set_num_threads(threads)
    return run_dir


@pytest.fixture(scope="module")
def reference_pretrain(setup, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference") / "pretrain"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from agents.cli import main

        main(pretrain_args(setup, run_dir))
    finally:
        torch.set_num_threads(threads)
    return run_dir


def model_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)["state_dict"]


# -- kill and resume --------------------------------------------------------------------------------


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name the file being written")
def test_train_killed_mid_checkpoint_write_resumes_exactly(setup, reference_train, tmp_path):
    run_dir = tmp_path / "run"
    marker = tmp_path / "paused"
    child = start_child(train_args(setup, run_dir), pause=f"torn:2:{marker}")
    wait_for(marker, child)
    kill(child)

    assert saved_epoch(run_dir) == 0, "last.pt must still hold epoch 1 (index 0), not a torn file"
    assert temporaries(run_dir), "the killed write should have left its temporary file"
    assert_lost_at_most_one_epoch(run_dir)

    resumed = start_child(train_args(setup, run_dir, "--resume"))
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()

    assert rows(run_dir) == rows(reference_train)
    assert saved_epoch(run_dir) == 2
    assert temporaries(run_dir) == [], "the next save should delete the stale temporary file"


def test_pretrain_killed_before_rename_resumes_exactly(setup, reference_pretrain, tmp_path):
    run_dir = tmp_path / "run"
    marker = tmp_path / "paused"
    # Write 1 is the state before training, so write 3 is the end of epoch 2.
    child = start_child(pretrain_args(setup, run_dir), pause=f"before_replace:3:{marker}")
    wait_for(marker, child)
    kill(child)

    assert saved_epoch(run_dir) == 1
    assert_lost_at_most_one_epoch(run_dir)

    resumed = start_child(["pretrain", "--run-dir", str(run_dir), "--resume", "--quiet"])
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()

    assert rows(run_dir) == rows(reference_pretrain)
    reference = model_weights(reference_pretrain)
    for key, value in model_weights(run_dir).items():
        assert torch.equal(value, reference[key]), key
    assert temporaries(run_dir) == []


def logged_rows(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def kill_at_random_until_done(args: list[str], resume_args: list[str], run_dir: Path, seed: int, kills: int) -> list[int | None]:
    """Kill the run ``kills`` times and resume it; return the epoch in last.pt after each kill.

    Each child is killed a seeded random 0-0.6 s after it logs an epoch, so every child makes
    progress and the kills land anywhere in the next epoch, checkpoint writes included.
    """
    generator = random.Random(seed)
    epochs = []
    child = start_child(args)
    for _ in range(kills):
        logged = logged_rows(run_dir)
        deadline = time.monotonic() + 120
        while logged_rows(run_dir) <= logged and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(generator.uniform(0.0, 0.6))
        if child.poll() is not None:
            break
        kill(child)
        epochs.append(saved_epoch(run_dir))
        assert_lost_at_most_one_epoch(run_dir)
        child = start_child(resume_args if saved_epoch(run_dir) is not None else args)
    assert child.wait(timeout=300) == 0, child.stderr.read()
    return epochs


@pytest.fixture(scope="module")
def long_setup(tmp_path_factory) -> Path:
    """The ResNet-8 and 3 classes of 48 images each: about half a second per epoch."""
    root = tmp_path_factory.mktemp("long")
    torch.manual_seed(0)
    save_resnet(CifarResNet(depth=8, num_classes=3, input_size=(16, 16)), root / "resnet.pt")
    write_image_folder(root / "images", num_classes=3, per_class=48, size=16)
    return root


@pytest.mark.slow
def test_train_survives_random_kills(long_setup, tmp_path, capsys):
    reference = tmp_path / "reference"
    assert run_cli(train_args(long_setup, reference, "--epochs", "8"), capsys)[0] == 0
    run_dir = tmp_path / "run"
    args = train_args(long_setup, run_dir, "--epochs", "8")

    epochs = kill_at_random_until_done(args, [*args, "--resume"], run_dir, seed=7, kills=4)

    assert len(epochs) >= 2, f"fewer than two kills landed before the run finished: {epochs}"
    assert rows(run_dir) == rows(reference)
    assert temporaries(run_dir) == []


@pytest.mark.slow
def test_pretrain_survives_random_kills(long_setup, tmp_path, capsys):
    reference = tmp_path / "reference"
    assert run_cli(pretrain_args(long_setup, reference, "--epochs", "8"), capsys)[0] == 0
    run_dir = tmp_path / "run"
    args = pretrain_args(long_setup, run_dir, "--epochs", "8")
    resume = ["pretrain", "--run-dir", str(run_dir), "--resume", "--quiet"]

    epochs = kill_at_random_until_done(args, resume, run_dir, seed=11, kills=4)

    assert len(epochs) >= 2, f"fewer than two kills landed before the run finished: {epochs}"
    assert rows(run_dir) == rows(reference)
    expected = model_weights(reference)
    for key, value in model_weights(run_dir).items():
        assert torch.equal(value, expected[key]), key


# -- NaN and inf ---------------------------------------------------------------------------------------


def random_dataset(count: int, seed: int) -> ImageDataset:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, 3, 16, 16), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 3, (count,), generator=generator)
    return ImageDataset(images, labels, ["c0", "c1", "c2"], "random")


def tiny_resnet() -> CifarResNet:
    torch.manual_seed(0)
    return CifarResNet(depth=8, num_classes=3, input_size=(16, 16)).eval()


def train_config(run_dir: Path, **overrides: Any) -> TrainConfig:
    settings: dict[str, Any] = {"epochs": 3, "batch_size": 16, "epochs_per_stage": 0, **overrides}
    return TrainConfig(run_dir=str(run_dir), **settings)


def last_checkpoint(run_dir: Path) -> dict[str, Any]:
    return torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)


def all_finite(state: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(value).all()) for value in state.values() if value.is_floating_point())


def test_train_stops_on_nan_probabilities(tmp_path):
    trainer = CurriculumTrainer(train_config(tmp_path / "run"), tiny_resnet(), random_dataset(48, 0), random_dataset(16, 1))

    def poison(epoch: int, metrics: object) -> None:
        with torch.no_grad():
            for parameter in trainer.policy.parameters():
                parameter.fill_(math.nan)

    trainer.on_epoch = poison
    message = (
        r"training diverged at epoch 2, step 1 of 3: the keep-probability tensor contains NaN or inf; "
        r"last\.pt still contains epoch 1\. Start again in a new --run-dir with a lower --lr"
    )
    with pytest.raises(TrainingError, match=message):
        trainer.fit()

    assert last_checkpoint(tmp_path / "run")["epoch"] == 0
    assert all_finite(last_checkpoint(tmp_path / "run")["policy"])
    assert [row["epoch"] for row in rows(tmp_path / "run")] == [0]


def test_train_stops_on_nan_loss(tmp_path, monkeypatch):
    import agents.reinforce as reinforce

    real_loss = reinforce.policy_gradient_loss
    calls = []

    def nan_after_first_epoch(*args: Any, **kwargs: Any) -> Any:
        loss = real_loss(*args, **kwargs)
        calls.append(1)
        return loss._replace(total=loss.total * math.nan) if len(calls) == 5 else loss

    monkeypatch.setattr(reinforce, "policy_gradient_loss", nan_after_first_epoch)
    trainer = CurriculumTrainer(train_config(tmp_path / "run"), tiny_resnet(), random_dataset(48, 0), random_dataset(16, 1))

    with pytest.raises(TrainingError, match=r"at epoch 2, step 2 of 3: loss/total contains NaN or inf; last\.pt still contains epoch 1"):
        trainer.fit()

    assert last_checkpoint(tmp_path / "run")["epoch"] == 0


def test_train_never_saves_nan_weights(tmp_path):
    # One step per epoch, so weights poisoned by a step reach the end-of-epoch check, not a step.
    trainer = CurriculumTrainer(
        train_config(tmp_path / "run", batch_size=48), tiny_resnet(), random_dataset(48, 0), random_dataset(16, 1)
    )
    real_step = trainer.optimizer.step
    steps = []

    def poisoning_step(*args: Any, **kwargs: Any) -> Any:
        result = real_step(*args, **kwargs)
        steps.append(1)
        if len(steps) == 2:
            with torch.no_grad():
                next(trainer.policy.parameters()).fill_(math.inf)
        return result

    trainer.optimizer.step = poisoning_step  # type: ignore[method-assign]
    with pytest.raises(TrainingError, match=r"at the end of epoch 2: a trained weight contains NaN or inf; last\.pt still contains epoch 1"):
        trainer.fit()

    assert last_checkpoint(tmp_path / "run")["epoch"] == 0
    assert all_finite(last_checkpoint(tmp_path / "run")["policy"])


def test_cli_train_reports_divergence_in_one_line(setup, tmp_path, capsys, monkeypatch):
    import agents.reinforce as reinforce

    real_loss = reinforce.policy_gradient_loss
    def infinite_loss(*args: Any, **kwargs: Any) -> Any:
        loss = real_loss(*args, **kwargs)
        return loss._replace(total=loss.total * math.inf)

    monkeypatch.setattr(reinforce, "policy_gradient_loss", infinite_loss)

    status, out, err = run_cli(train_args(setup, tmp_path / "run"), capsys)

    assert status == 2
    assert len(err.strip().splitlines()) == 1, err
    assert "Error: training diverged at epoch 1, step 1 of 3: loss/total contains NaN or inf; no checkpoint was written yet" in err
    assert "lower --lr" in err
    assert not (tmp_path / "run" / "last.pt").exists()


def test_finetune_stops_on_nan_cross_entropy(tmp_path, monkeypatch):
    import agents.finetune as finetune_module

    calls = []

    def cross_entropy(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(1)
        loss = torch.nn.functional.cross_entropy(*args, **kwargs)
        return loss * math.nan if len(calls) > 3 else loss

    monkeypatch.setattr(finetune_module, "F", types.SimpleNamespace(cross_entropy=cross_entropy))
    train_data = random_dataset(48, 0)
    config = FinetuneConfig(from_run="unused", run_dir=str(tmp_path / "ft"), epochs=3, batch_size=16, penalty=2.0)
    torch.manual_seed(0)
    trainer = JointFinetuner(config, build_policy(3, train_data, None), tiny_resnet(), train_data, random_dataset(16, 1))

    with pytest.raises(TrainingError, match=r"at epoch 2, step 1 of 3: loss/cross_entropy contains NaN or inf; .*lower --lr-policy or --lr-resnet"):
        trainer.fit()

    saved = last_checkpoint(tmp_path / "ft")
    assert saved["epoch"] == 0
    assert all_finite(saved["resnet"]["state_dict"])
    assert all_finite(saved["policy"])


def test_pretrain_stops_on_nan_loss(tmp_path, monkeypatch):
    import agents.pretrain as pretrain_module

    calls = []

    def cross_entropy(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(1)
        loss = torch.nn.functional.cross_entropy(*args, **kwargs)
        return loss * math.nan if len(calls) > 3 else loss

    monkeypatch.setattr(pretrain_module, "F", types.SimpleNamespace(cross_entropy=cross_entropy))
    config = PretrainConfig(arch="cifar_resnet8", epochs=3, batch_size=16, lr=0.05)

    with pytest.raises(TrainingError, match=r"train/loss of epoch 2, steps 1-3 of 3 contains NaN or inf; last\.pt still contains epoch 1\. .*lower --lr than 0\.05"):
        pretrain(config, tmp_path / "run", train_data=random_dataset(48, 0), test_data=random_dataset(16, 1), progress=False)

    saved = last_checkpoint(tmp_path / "run")
    assert saved["epoch"] == 1
    assert all_finite(saved["model"])
    assert not (tmp_path / "run" / "model.pt").exists()


# -- determinism ---------------------------------------------------------------------------------------


def test_train_is_deterministic(setup, reference_train, tmp_path, capsys):
    status, _, err = run_cli(train_args(setup, tmp_path / "run"), capsys)

    assert status == 0, err
    assert rows(tmp_path / "run") == rows(reference_train)


def test_finetune_is_deterministic(setup, reference_train, tmp_path, capsys):
    args = ["finetune", "--from", str(reference_train), "--epochs", "2", "--batch-size", "8", "--quiet"]
    for name in ("first", "second"):
        status, _, err = run_cli([*args, "--run-dir", str(tmp_path / name)], capsys)
        assert status == 0, err

    assert rows(tmp_path / "first") == rows(tmp_path / "second")
    assert len(rows(tmp_path / "first")) == 2


def test_pretrain_cli_is_deterministic(setup, reference_pretrain, tmp_path, capsys):
    status, _, err = run_cli(pretrain_args(setup, tmp_path / "run"), capsys)

    assert status == 0, err
    assert rows(tmp_path / "run") == rows(reference_pretrain)


@pytest.mark.parametrize("source", ["agent", "random:0.5"])
def test_evaluate_is_deterministic(setup, reference_train, capsys, source):
    args = ["evaluate", "--dataset", "imagefolder", "--data-dir", str(setup / "images"), "--json", "--seed", "3"]
    if source == "agent":
        args += ["--checkpoint", str(reference_train)]
    else:
        args += ["--resnet", str(setup / "resnet.pt"), "--policy", source]

    reports = [run_cli(args, capsys) for _ in range(2)]

    assert reports[0][0] == 0, reports[0][2]
    assert json.loads(reports[0][1]) == json.loads(reports[1][1])


def test_evaluate_random_policy_depends_on_seed(setup, capsys):
    args = ["evaluate", "--resnet", str(setup / "resnet.pt"), "--dataset", "imagefolder", "--data-dir",
            str(setup / "images"), "--policy", "random:0.5", "--json"]

    first = json.loads(run_cli([*args, "--seed", "1"], capsys)[1])
    second = json.loads(run_cli([*args, "--seed", "2"], capsys)[1])

    assert first["blocks_std"] > 0
    assert first != second


def test_resume_accepts_moved_run_directory(setup, reference_train, tmp_path, capsys):
    moved = tmp_path / "moved"
    first = tmp_path / "first"
    assert run_cli(train_args(setup, first, "--epochs", "2"), capsys)[0] == 0
    first.rename(moved)

    status, _, err = run_cli(train_args(setup, moved, "--resume"), capsys)

    assert status == 0, err
    assert rows(moved) == rows(reference_train)
