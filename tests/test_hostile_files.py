"""Hostile and broken files at every entry point that reads one, through the CLI and the API.

Each bad file must be rejected with one line on stderr and exit status 2, naming the file, and a
checkpoint that carries pickled code must be rejected without running it.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from agents.agent_checkpoint import load_agent
from agents.runs import RunDirectory
from blockdrop_env.checkpoints import resnet_to_state, save_resnet
from blockdrop_env.errors import CheckpointError
from blockdrop_env.resnet import CifarResNet
from tests.conftest import run_cli, write_image_folder

pytestmark = pytest.mark.filterwarnings("ignore:the curriculum gives the agent")

KINDS = ("pickled_code", "empty", "truncated", "text", "wrong_architecture")


class RunsShellCommand:
    """Pickles as a call to os.system, so unpickling it with weights_only=False runs the command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (self.command,))


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: faster for these tiny networks on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    """A ResNet-8 (3 classes, 16x16), an image folder, one-epoch `train` and `pretrain` runs."""
    root = tmp_path_factory.mktemp("hostile")
    torch.manual_seed(0)
    save_resnet(CifarResNet(depth=8, num_classes=3, input_size=(16, 16)), root / "resnet.pt")
    write_image_folder(root / "images", num_classes=3, per_class=4, size=16)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for args in (
            ["train", "--resnet", str(root / "resnet.pt"), "--run-dir", str(root / "train_run")],
            ["pretrain", "--arch", "cifar_resnet8", "--run-dir", str(root / "pretrain_run")],
        ):
            status = _main([*args, "--dataset", "imagefolder", "--data-dir", str(root / "images"),
                            "--epochs", "1", "--batch-size", "4", "--quiet"])
            assert status == 0
    finally:
        torch.set_num_threads(threads)
    return root


def _main(args: list[str]) -> int:
    from agents.cli import main

    try:
        main(args)
    except SystemExit as done:
        return int(done.code or 0)
    return 0


def write_bad_file(kind: str, path: Path, setup: Path, marker: Path) -> Path:
    """Write a file of ``kind`` at ``path``; a pickled-code file would create ``marker`` when run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "pickled_code":
        payload = RunsShellCommand(f"touch {marker}")
        torch.save({"format": "blockdrop_agent", "state_dict": payload, "model": payload, "policy": payload}, path)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        data = (setup / "train_run" / "last.pt").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "text":
        path.write_text("epoch 3, accuracy 0.9\n")
    else:
        # A ResNet-14 state dict under a header that claims ResNet-8.
        state = resnet_to_state(CifarResNet(depth=14, num_classes=3, input_size=(16, 16)))
        state["arch"] = "cifar_resnet8"
        torch.save(state, path)
    return path


def assert_one_line_error(status: int, out: str, err: str, path: Path) -> str:
    assert status == 2, err
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert str(path) in err, err
    # Every message ends with what to do, after a semicolon.
    assert "; " in err
    return err


# Expected message per kind, for loaders that read ResNet or run checkpoints.
RESNET_MESSAGES = {
    "pickled_code": r"rejected: it contains pickled Python objects that could run code when loaded \(posix\.system\)",
    "empty": r"is empty \(0 bytes\).*copy or download it again",
    "truncated": r"could not be read, it is probably truncated or corrupted.*copy or download the file again",
    "text": r"is not a PyTorch checkpoint: it starts with b'epoc', expected a zip archive",
}


# -- ResNet checkpoints: evaluate --resnet, train --resnet, pretrain --init -------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("command", ["evaluate", "train", "pretrain"])
def test_resnet_entry_point_rejects_bad_file(setup, tmp_path, capsys, command, kind):
    marker = tmp_path / "code_ran"
    path = write_bad_file(kind, tmp_path / f"{kind}.pt", setup, marker)
    common = ["--dataset", "imagefolder", "--data-dir", str(setup / "images")]
    args = {
        "evaluate": ["evaluate", "--resnet", str(path), *common],
        "train": ["train", "--resnet", str(path), "--run-dir", str(tmp_path / "run"), *common, "--quiet"],
        "pretrain": ["pretrain", "--init", str(path), "--run-dir", str(tmp_path / "run"), *common, "--batch-size", "4", "--quiet"],
    }[command]

    err = assert_one_line_error(*run_cli(args, capsys), path)

    expected = RESNET_MESSAGES.get(kind, r"does not fit cifar_resnet8: missing keys .*, unexpected keys .*another architecture")
    assert re.search(expected, err), err
    assert not marker.exists()
    assert not (tmp_path / "run" / "last.pt").exists()


def test_resnet_entry_point_rejects_agent_checkpoint(setup, capsys):
    path = setup / "train_run" / "last.pt"
    status, out, err = run_cli(["evaluate", "--resnet", str(path), "--dataset", "imagefolder", "--data-dir",
                                str(setup / "images")], capsys)

    assert_one_line_error(status, out, err, path)
    assert "is an agent checkpoint (format 'blockdrop_agent'), expected a ResNet checkpoint; pass it as `--checkpoint`" in err


def test_pretrain_init_rejects_other_architecture(setup, tmp_path, capsys):
    path = tmp_path / "resnet14.pt"
    save_resnet(CifarResNet(depth=14, num_classes=3, input_size=(16, 16)), path)
    args = ["pretrain", "--init", str(path), "--arch", "cifar_resnet8", "--run-dir", str(tmp_path / "run"),
            "--dataset", "imagefolder", "--data-dir", str(setup / "images"), "--batch-size", "4", "--quiet"]

    err = assert_one_line_error(*run_cli(args, capsys), path)

    assert "contains a cifar_resnet14, expected `arch` cifar_resnet8; pass arch='cifar_resnet14'" in err


# -- agent checkpoints: evaluate --checkpoint, load_agent, finetune --from -----------------------

# NOTE: agents/agent_checkpoint.py reads with torch.load(weights_only=True) directly, so its
# messages quote torch's error instead of naming the rejected global; these patterns pin that.
AGENT_MESSAGES = {
    **RESNET_MESSAGES,
    "wrong_architecture": r"is not an agent checkpoint \(format 'blockdrop', expected 'blockdrop_agent'\)",
}


@pytest.mark.parametrize("kind", KINDS)
def test_evaluate_checkpoint_rejects_bad_file(setup, tmp_path, capsys, kind):
    marker = tmp_path / "code_ran"
    path = write_bad_file(kind, tmp_path / f"{kind}.pt", setup, marker)
    if kind == "wrong_architecture":
        path = setup / "resnet.pt"
    args = ["evaluate", "--checkpoint", str(path), "--dataset", "imagefolder", "--data-dir", str(setup / "images")]

    err = assert_one_line_error(*run_cli(args, capsys), path)

    assert re.search(AGENT_MESSAGES[kind], err), err
    assert not marker.exists()


def test_load_agent_rejects_pickled_code_without_running_it(setup, tmp_path):
    marker = tmp_path / "code_ran"
    path = write_bad_file("pickled_code", tmp_path / "evil.pt", setup, marker)

    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load_agent(path)

    assert not marker.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_finetune_from_rejects_bad_checkpoint(setup, tmp_path, capsys, kind):
    marker = tmp_path / "code_ran"
    source = tmp_path / "source"
    shutil.copytree(setup / "train_run", source)
    for name in ("best.pt", "last.pt"):
        write_bad_file(kind, source / name, setup, marker)
        if kind == "wrong_architecture":
            shutil.copy(setup / "resnet.pt", source / name)
    args = ["finetune", "--from", str(source), "--run-dir", str(tmp_path / "ft"), "--epochs", "1", "--quiet"]

    err = assert_one_line_error(*run_cli(args, capsys), source / "best.pt")

    assert re.search(AGENT_MESSAGES[kind], err), err
    assert not marker.exists()
    assert not (tmp_path / "ft" / "last.pt").exists()


# -- run checkpoints: --resume and RunDirectory.load_checkpoint ------------------------------------


def resume_args(command: str, run_dir: Path, setup: Path) -> list[str]:
    common = ["--dataset", "imagefolder", "--data-dir", str(setup / "images"), "--batch-size", "4",
              "--quiet", "--resume", "--run-dir", str(run_dir)]
    if command == "train":
        return ["train", "--resnet", str(setup / "resnet.pt"), "--epochs", "2", *common]
    return ["pretrain", "--arch", "cifar_resnet8", "--epochs", "1", *common]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("command", ["train", "pretrain"])
def test_resume_rejects_bad_last_checkpoint(setup, tmp_path, capsys, command, kind):
    marker = tmp_path / "code_ran"
    run_dir = tmp_path / "run"
    shutil.copytree(setup / f"{command}_run", run_dir)
    last = run_dir / "last.pt"
    write_bad_file(kind, last, setup, marker)
    if kind == "wrong_architecture":
        # The other command's last.pt: a valid checkpoint of another kind of run.
        shutil.copy(setup / ("pretrain_run" if command == "train" else "train_run") / "last.pt", last)
    before = last.read_bytes()

    err = assert_one_line_error(*run_cli(resume_args(command, run_dir, setup), capsys), last)

    expected = RESNET_MESSAGES.get(kind, r"is not a checkpoint of this run: expected keys \[.*\], found \[.*\]; restore")
    assert re.search(expected, err), err
    assert not marker.exists()
    assert last.read_bytes() == before


def test_run_directory_rejects_pickled_code(setup, tmp_path):
    marker = tmp_path / "code_ran"
    write_bad_file("pickled_code", tmp_path / "run" / "last.pt", setup, marker)

    with pytest.raises(CheckpointError, match=r"rejected: it contains pickled Python objects"):
        RunDirectory(tmp_path / "run", tensorboard=False).load_checkpoint()

    assert not marker.exists()


def test_run_directory_rejects_checkpoint_without_required_keys(setup, tmp_path):
    run = RunDirectory(tmp_path / "run", tensorboard=False)
    torch.save([1, 2, 3], run.path / "last.pt")

    with pytest.raises(CheckpointError, match=r"expected keys \['policy'\], found list"):
        run.load_checkpoint(required_keys=("policy",))


# -- image folders ------------------------------------------------------------------------------------


def broken_folder(setup: Path, tmp_path: Path, fault: str) -> tuple[Path, Path]:
    """Copy the image folder and break one training image; return the folder and that file."""
    root = tmp_path / "images"
    shutil.copytree(setup / "images", root)
    path = root / "train" / "class1" / "0002.png"
    if fault == "unreadable":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    elif fault == "empty":
        path.write_bytes(b"")
    elif fault == "grayscale":
        Image.new("L", (16, 16), 128).save(path)
    else:
        Image.new("RGB", (20, 16)).save(path)
    return root, path


IMAGE_MESSAGES = {
    "unreadable": r"is not a readable image \((UnidentifiedImageError|OSError): .*; replace or remove the file",
    "empty": r"is not a readable image \(UnidentifiedImageError.*; replace or remove the file",
    "grayscale": r"has mode L, expected RGB; convert it to RGB",
    "other_size": r"has \(height, width\) \(16, 20\), expected \(16, 16\) like the first image .*; resize all images",
}


@pytest.mark.parametrize("fault", list(IMAGE_MESSAGES))
@pytest.mark.parametrize("command", ["evaluate", "train", "pretrain"])
def test_broken_image_is_one_line_error(setup, tmp_path, capsys, command, fault):
    root, path = broken_folder(setup, tmp_path, fault)
    common = ["--dataset", "imagefolder", "--data-dir", str(root)]
    args = {
        "evaluate": ["evaluate", "--resnet", str(setup / "resnet.pt"), "--split", "train", *common],
        "train": ["train", "--resnet", str(setup / "resnet.pt"), "--run-dir", str(tmp_path / "run"), "--quiet", *common],
        "pretrain": ["pretrain", "--arch", "cifar_resnet8", "--run-dir", str(tmp_path / "run"), "--quiet", *common],
    }[command]

    err = assert_one_line_error(*run_cli(args, capsys), path)

    assert re.search(IMAGE_MESSAGES[fault], err), err


# -- class counts -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def five_classes(setup) -> Path:
    return write_image_folder(setup / "five", num_classes=5, per_class=2, size=16)


CLASS_MISMATCH = r"predicts 3 classes, but dataset imagefolder:.*five/(train|test) has 5 classes; pass a checkpoint trained on these classes"


def test_evaluate_resnet_rejects_other_class_count(setup, five_classes, capsys):
    args = ["evaluate", "--resnet", str(setup / "resnet.pt"), "--dataset", "imagefolder", "--data-dir", str(five_classes)]

    err = assert_one_line_error(*run_cli(args, capsys), setup / "resnet.pt")

    assert re.search(CLASS_MISMATCH, err), err


def test_evaluate_checkpoint_rejects_other_class_count(setup, five_classes, capsys):
    agent = setup / "train_run" / "best.pt"
    args = ["evaluate", "--checkpoint", str(agent), "--dataset", "imagefolder", "--data-dir", str(five_classes)]

    err = assert_one_line_error(*run_cli(args, capsys), agent)

    assert re.search(CLASS_MISMATCH, err), err


def test_train_rejects_other_class_count(setup, five_classes, tmp_path, capsys):
    args = ["train", "--resnet", str(setup / "resnet.pt"), "--dataset", "imagefolder", "--data-dir", str(five_classes),
            "--run-dir", str(tmp_path / "run"), "--quiet"]

    err = assert_one_line_error(*run_cli(args, capsys), setup / "resnet.pt")

    assert re.search(CLASS_MISMATCH, err), err
    assert not (tmp_path / "run" / "last.pt").exists()


def test_finetune_rejects_other_class_count(setup, five_classes, tmp_path, capsys):
    args = ["finetune", "--from", str(setup / "train_run"), "--dataset", "imagefolder", "--data-dir", str(five_classes),
            "--run-dir", str(tmp_path / "ft"), "--quiet"]

    err = assert_one_line_error(*run_cli(args, capsys), setup / "train_run" / "best.pt")

    assert re.search(CLASS_MISMATCH, err), err


@pytest.mark.parametrize("command", ["train", "pretrain"])
def test_split_class_mismatch_is_one_line_error(setup, tmp_path, capsys, command):
    root = tmp_path / "images"
    shutil.copytree(setup / "images", root)
    (root / "test" / "class9").mkdir()
    Image.new("RGB", (16, 16)).save(root / "test" / "class9" / "0000.png")
    common = ["--dataset", "imagefolder", "--data-dir", str(root), "--run-dir", str(tmp_path / "run"), "--quiet"]
    first = ["train", "--resnet", str(setup / "resnet.pt")] if command == "train" else ["pretrain", "--arch", "cifar_resnet8"]

    err = assert_one_line_error(*run_cli([*first, *common], capsys), root / "test")

    assert "have different classes (only in imagefolder:" in err
    assert "['class9']); give both splits the same class folders" in err
