"""Tests for agents/cli_train.py: `blockdrop train` and `blockdrop finetune`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from agents.cli import cli
from agents.cli_train import finetune, train
from blockdrop_env.checkpoints import save_resnet
from blockdrop_env.resnet import CifarResNet
from tests.conftest import REPO_ROOT, run_cli, write_image_folder

pytestmark = pytest.mark.filterwarnings("ignore:the curriculum gives the agent")

# Runs `blockdrop` with the two commands registered, whether or not agents.cli lists them yet.
CLI_SCRIPT = (
    "from agents.cli import cli, main; from agents.cli_train import train; "
    "cli.commands.setdefault('train', train); main()"
)


@pytest.fixture(autouse=True, scope="module")
def registered_commands():
    added = [command for command in (train, finetune) if command.name not in cli.commands]
    for command in added:
        cli.add_command(command)
    yield
    for command in added:
        cli.commands.pop(command.name)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: faster for these tiny networks on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A ResNet-8 checkpoint for 16x16 images and an ImageFolder tree of 3 classes."""
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    save_resnet(CifarResNet(depth=8, num_classes=3, input_size=(16, 16)), root / "resnet.pt")
    write_image_folder(root / "images", num_classes=3, per_class=8, size=16)
    return root


def train_args(setup: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "train", "--resnet", str(setup / "resnet.pt"), "--dataset", "imagefolder", "--data-dir", str(setup / "images"),
        "--run-dir", str(run_dir), "--epochs", "2", "--batch-size", "8", "--quiet", *extra,
    ]


def test_train_writes_run_directory(tiny_setup, tmp_path, capsys):
    status, _, err = run_cli(train_args(tiny_setup, tmp_path / "run"), capsys)
    assert status == 0, err
    run = tmp_path / "run"
    for name in ("config.json", "metrics.jsonl", "last.pt", "best.pt"):
        assert (run / name).is_file(), name
    assert list(run.glob("events.out.tfevents.*"))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [0, 1]
    assert json.loads((run / "config.json").read_text())["epochs"] == 2


def test_train_prints_one_line_per_epoch(tiny_setup, tmp_path, capsys):
    args = [arg for arg in train_args(tiny_setup, tmp_path / "run", "--blocks-per-stage", "1") if arg != "--quiet"]
    status, _, err = run_cli(args, capsys)
    assert status == 0, err
    assert "epoch 1/2  controlled 1" in err
    assert "epoch 2/2  controlled 2" in err


def test_finetune_writes_run_directory(tiny_setup, tmp_path, capsys):
    assert run_cli(train_args(tiny_setup, tmp_path / "train"), capsys)[0] == 0
    status, _, err = run_cli(
        ["finetune", "--from", str(tmp_path / "train"), "--run-dir", str(tmp_path / "ft"),
         "--epochs", "1", "--batch-size", "8", "--quiet"],
        capsys,
    )
    assert status == 0, err
    for name in ("config.json", "metrics.jsonl", "last.pt", "best.pt"):
        assert (tmp_path / "ft" / name).is_file(), name


def test_finetune_rejects_missing_source_run(tmp_path, capsys):
    status, _, err = run_cli(["finetune", "--from", str(tmp_path / "none"), "--run-dir", str(tmp_path / "ft")], capsys)
    assert status == 2
    assert err.count("\n") == 1
    assert "does not exist" in err


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--epochs", "-1", "epochs (--epochs) must be an integer >= 1, got -1"),
        ("--batch-size", "0", "batch_size (--batch-size) must be an integer >= 1, got 0"),
        ("--alpha", "0.3", "alpha (--alpha) must be in (0.5, 1], got 0.3"),
        ("--alpha", "1.5", "alpha (--alpha) must be in (0.5, 1], got 1.5"),
        ("--beta", "-0.1", "beta (--beta) must be >= 0, got -0.1"),
        ("--penalty", "-2", "penalty (--penalty) must be >= 0, got -2.0"),
        ("--lr", "0", "lr (--lr) must be > 0, got 0.0"),
        ("--epochs-per-stage", "-1", "epochs_per_stage (--epochs-per-stage) must be an integer >= 0"),
        ("--blocks-per-stage", "0", "blocks_per_stage (--blocks-per-stage) must be an integer >= 1"),
        ("--max-train-images", "-1", "max_train_images (--max-train-images) must be an integer >= 0"),
        ("--epochs", "many", "Invalid value for '--epochs': 'many' is not a valid integer"),
        ("--device", "tpu", "Invalid value for '--device'"),
    ],
)
def test_train_rejects_invalid_option(tiny_setup, tmp_path, capsys, option, value, message):
    status, _, err = run_cli(train_args(tiny_setup, tmp_path / "run", option, value), capsys)
    assert status == 2
    assert err.count("\n") == 1
    assert message in err


def test_train_rejects_resume_without_checkpoint(tiny_setup, tmp_path, capsys):
    status, _, err = run_cli(train_args(tiny_setup, tmp_path / "run", "--resume"), capsys)
    assert status == 2
    assert err.count("\n") == 1
    assert "--resume was given but" in err


def test_train_rejects_missing_resnet(tiny_setup, tmp_path, capsys):
    args = train_args(tiny_setup, tmp_path / "run")
    args[args.index("--resnet") + 1] = str(tmp_path / "missing.pt")
    status, _, err = run_cli(args, capsys)
    assert status == 2
    assert err.count("\n") == 1
    assert "not found" in err


def test_killed_run_resumes_to_same_metrics(tmp_path):
    setup = tmp_path / "setup"
    torch.manual_seed(0)
    save_resnet(CifarResNet(depth=8, num_classes=3, input_size=(32, 32)), setup / "resnet.pt")
    write_image_folder(setup / "images", num_classes=3, per_class=48, size=32)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def start(run_dir: Path, *extra: str) -> subprocess.Popen:
        args = train_args(setup, run_dir, "--epochs", "3", "--max-test-images", "24", "--penalty", "2", *extra)
        command = [sys.executable, "-c", CLI_SCRIPT, *args]
        return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stderr=subprocess.PIPE, text=True)

    uninterrupted = start(tmp_path / "full")
    killed = start(tmp_path / "killed")
    last = tmp_path / "killed" / "last.pt"
    deadline = time.monotonic() + 120
    while not last.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, killed.stderr.read()
    epoch_at_kill = torch.load(last, weights_only=True)["epoch"]
    assert epoch_at_kill < 2

    resumed = start(tmp_path / "killed", "--resume")
    assert resumed.wait(timeout=180) == 0, resumed.stderr.read()
    assert uninterrupted.wait(timeout=180) == 0, uninterrupted.stderr.read()

    def rows(run: str) -> list[dict]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")} for line in lines]

    assert [row["epoch"] for row in rows("killed")] == [0, 1, 2]
    assert rows("killed") == rows("full")
