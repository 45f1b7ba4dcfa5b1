"""Bad option values for every `blockdrop` command: one line on stderr, exit status 2, no traceback.

Also checks that `--help` of every registered command shows the default of every option that has
one, so a newly added command or option is covered without editing this file.
"""

from __future__ import annotations

import enum
import re
from pathlib import Path

import click
import pytest
import torch

from agents.cli import cli
from blockdrop_env.checkpoints import save_resnet
from blockdrop_env.resnet import CifarResNet
from tests.conftest import run_cli, write_image_folder

pytestmark = pytest.mark.filterwarnings("ignore:the curriculum gives the agent")


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: faster for these tiny networks on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    """A ResNet-8 (3 blocks, 3 classes, 16x16), an image folder and a one-epoch `train` run."""
    root = tmp_path_factory.mktemp("cli_errors")
    torch.manual_seed(0)
    save_resnet(CifarResNet(depth=8, num_classes=3, input_size=(16, 16)), root / "resnet.pt")
    write_image_folder(root / "images", num_classes=3, per_class=4, size=16)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from agents.cli import main

        main(["train", "--resnet", str(root / "resnet.pt"), "--dataset", "imagefolder", "--data-dir", str(root / "images"),
              "--run-dir", str(root / "run"), "--epochs", "1", "--batch-size", "4", "--quiet"])
    except SystemExit as done:
        assert done.code in (0, None)
    finally:
        torch.set_num_threads(threads)
    return root


def assert_one_line_error(status: int, out: str, err: str, pattern: str) -> None:
    assert status == 2, err
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("Error: ")
    assert "Traceback" not in err
    assert re.search(pattern, err), err


def evaluate_args(setup: Path) -> list[str]:
    return ["evaluate", "--resnet", str(setup / "resnet.pt"), "--dataset", "imagefolder", "--data-dir", str(setup / "images")]


def train_args(setup: Path, run_dir: Path) -> list[str]:
    return ["train", "--resnet", str(setup / "resnet.pt"), "--dataset", "imagefolder", "--data-dir", str(setup / "images"),
            "--run-dir", str(run_dir), "--epochs", "1", "--batch-size", "4", "--quiet"]


def finetune_args(setup: Path, run_dir: Path) -> list[str]:
    return ["finetune", "--from", str(setup / "run"), "--run-dir", str(run_dir), "--epochs", "1",
            "--batch-size", "4", "--quiet"]


def pretrain_args(setup: Path, run_dir: Path) -> list[str]:
    return ["pretrain", "--arch", "cifar_resnet8", "--dataset", "imagefolder", "--data-dir", str(setup / "images"), "--run-dir",
            str(run_dir), "--epochs", "1", "--batch-size", "4", "--quiet"]


def replace_option(args: list[str], option: str, value: str) -> list[str]:
    """Return ``args`` with ``option`` set to ``value``, replacing an earlier value."""
    if option in args:
        index = args.index(option)
        return [*args[:index], option, value, *args[index + 2 :]]
    return [*args, option, value]


# -- evaluate -------------------------------------------------------------------------------------

EVALUATE_CASES = [
    ("--resnet", "MISSING/none.pt", r"checkpoint file .*none\.pt not found; check the path"),
    ("--checkpoint", "MISSING/none.pt", r"agent checkpoint .*none\.pt not found"),
    ("--data-dir", "MISSING/data", r"dataset directory .*data not found"),
    ("--batch-size", "0", r"'--batch-size': must be a positive integer, got 0"),
    ("--batch-size", "-4", r"'--batch-size': must be a positive integer, got -4"),
    ("--num-images", "0", r"'--num-images': must be a positive integer, got 0"),
    ("--num-images", "-1", r"'--num-images': must be a positive integer, got -1"),
    ("--policy", "drop", r"`policy` must be all"),
    ("--policy", "first:9", r"`k` must be between 0 and the number of blocks 3, got 9"),
    ("--policy", "first:-1", r"`k` must be between 0 and the number of blocks 3, got -1"),
    ("--policy", "random:1.5", r"random:P"),
    ("--policy", "random:nan", r"random:P"),
    ("--policy", "random:x", r"random:P"),
    ("--dataset", "mnist", r"Invalid value for '--dataset'"),
    ("--split", "val", r"Invalid value for '--split'"),
    ("--normalization", "mnist", r"Invalid value for '--normalization'"),
    ("--device", "tpu", r"Invalid value for '--device'"),
    ("--seed", "one", r"Invalid value for '--seed': 'one' is not a valid integer"),
]


@pytest.mark.parametrize(("option", "value", "pattern"), EVALUATE_CASES)
def test_evaluate_rejects_bad_value(setup, tmp_path, capsys, option, value, pattern):
    args = evaluate_args(setup)
    if option == "--checkpoint":
        args = ["evaluate", "--dataset", "imagefolder", "--data-dir", str(setup / "images")]
    args = replace_option(args, option, value.replace("MISSING", str(tmp_path)))

    assert_one_line_error(*run_cli(args, capsys), pattern)


# -- train ----------------------------------------------------------------------------------------

TRAIN_CASES = [
    ("--resnet", "MISSING/none.pt", r"checkpoint file .*none\.pt not found"),
    ("--data-dir", "MISSING/data", r"dataset directory .*data not found"),
    ("--dataset", "mnist", r"Invalid value for '--dataset'"),
    ("--epochs", "0", r"epochs \(--epochs\) must be an integer >= 1, got 0"),
    ("--batch-size", "-1", r"batch_size \(--batch-size\) must be an integer >= 1, got -1"),
    ("--lr", "-0.1", r"lr \(--lr\) must be > 0, got -0.1"),
    ("--lr", "nan", r"lr \(--lr\) must be a finite number, got nan"),
    ("--lr", "inf", r"lr \(--lr\) must be a finite number, got inf"),
    ("--penalty", "-1", r"penalty \(--penalty\) must be >= 0, got -1.0"),
    ("--penalty", "nan", r"penalty \(--penalty\) must be a finite number, got nan"),
    ("--alpha", "0.5", r"alpha \(--alpha\) must be in \(0.5, 1\], got 0.5"),
    ("--alpha", "1.01", r"alpha \(--alpha\) must be in \(0.5, 1\], got 1.01"),
    ("--alpha", "nan", r"alpha \(--alpha\) must be a finite number, got nan"),
    ("--beta", "-1", r"beta \(--beta\) must be >= 0, got -1.0"),
    ("--epochs-per-stage", "-2", r"epochs_per_stage \(--epochs-per-stage\) must be an integer >= 0, got -2"),
    ("--blocks-per-stage", "0", r"blocks_per_stage \(--blocks-per-stage\) must be an integer >= 1, got 0"),
    ("--blocks-per-stage", "4", r"blocks_per_stage \(--blocks-per-stage\) must be at most the ResNet's 3 blocks, got 4"),
    ("--policy-input-size", "0", r"policy_input_size \(--policy-input-size\) must be an integer >= 1, got 0"),
    ("--max-train-images", "-1", r"max_train_images \(--max-train-images\) must be an integer >= 0, got -1"),
    ("--max-test-images", "-5", r"max_test_images \(--max-test-images\) must be an integer >= 0, got -5"),
    ("--seed", "-1", r"seed \(--seed\) must be an integer >= 0, got -1"),
    ("--device", "tpu", r"Invalid value for '--device'"),
]


@pytest.mark.parametrize(("option", "value", "pattern"), TRAIN_CASES)
def test_train_rejects_bad_value(setup, tmp_path, capsys, option, value, pattern):
    args = replace_option(train_args(setup, tmp_path / "run"), option, value.replace("MISSING", str(tmp_path)))

    assert_one_line_error(*run_cli(args, capsys), pattern)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_train_rejects_resume_without_run(setup, tmp_path, capsys):
    args = [*train_args(setup, tmp_path / "run"), "--resume"]

    assert_one_line_error(*run_cli(args, capsys), r"--resume was given but .*last\.pt does not exist")


# -- finetune -------------------------------------------------------------------------------------

FINETUNE_CASES = [
    ("--from", "MISSING/none", r"from_run \(--from\) .*none does not exist"),
    ("--data-dir", "MISSING/data", r"dataset directory .*data not found"),
    ("--dataset", "mnist", r"Invalid value for '--dataset'"),
    ("--epochs", "0", r"epochs \(--epochs\) must be an integer >= 1, got 0"),
    ("--batch-size", "0", r"batch_size \(--batch-size\) must be an integer >= 1, got 0"),
    ("--lr-resnet", "0", r"lr_resnet \(--lr-resnet\) must be > 0, got 0.0"),
    ("--lr-policy", "nan", r"lr_policy \(--lr-policy\) must be a finite number, got nan"),
    ("--penalty", "-3", r"penalty \(--penalty\) must be >= 0, got -3.0"),
    ("--penalty", "nan", r"penalty \(--penalty\) must be a finite number, got nan"),
    ("--alpha", "0.4", r"alpha \(--alpha\) must be in \(0.5, 1\], got 0.4"),
    ("--beta", "-0.5", r"beta \(--beta\) must be >= 0, got -0.5"),
    ("--max-train-images", "-1", r"max_train_images \(--max-train-images\) must be an integer >= 0, got -1"),
    ("--device", "tpu", r"Invalid value for '--device'"),
]


@pytest.mark.parametrize(("option", "value", "pattern"), FINETUNE_CASES)
def test_finetune_rejects_bad_value(setup, tmp_path, capsys, option, value, pattern):
    args = replace_option(finetune_args(setup, tmp_path / "ft"), option, value.replace("MISSING", str(tmp_path)))

    assert_one_line_error(*run_cli(args, capsys), pattern)


# -- pretrain -------------------------------------------------------------------------------------

PRETRAIN_CASES = [
    ("--data-dir", "MISSING/data", r"dataset directory .*data not found"),
    ("--init", "MISSING/none.pt", r"`init` checkpoint .*none\.pt not found"),
    ("--dataset", "mnist", r"Invalid value for '--dataset'"),
    ("--arch", "resnet7", r"`arch` must be cifar_resnet<depth>"),
    ("--arch", "cifar_resnet9", r"`depth` must be 6n\+2"),
    ("--epochs", "0", r"`epochs` must be a positive integer, got 0"),
    ("--batch-size", "1", r"`batch_size` must be an integer >= 2, got 1"),
    ("--batch-size", "100", r"`batch_size` 100 exceeds the 12 training images"),
    ("--lr", "-1", r"`lr` must be > 0, got -1.0"),
    ("--lr", "nan", r"`lr` must be > 0, got nan"),
    ("--lr", "inf", r"`lr` must be > 0, got inf"),
    ("--weight-decay", "-0.1", r"`weight_decay` must be >= 0, got -0.1"),
    ("--warmup-epochs", "-1", r"`warmup_epochs` must be between 0 and `epochs` \(1\), got -1.0"),
    ("--max-train-images", "0", r"'--max-train-images': must be a positive integer, got 0"),
    ("--max-test-images", "-2", r"'--max-test-images': must be a positive integer, got -2"),
    ("--num-threads", "0", r"'--num-threads': must be a positive integer, got 0"),
    ("--precision", "float16", r"Invalid value for '--precision'"),
    ("--normalization", "mnist", r"Invalid value for '--normalization'"),
    ("--device", "tpu", r"Invalid value for '--device'"),
]


@pytest.mark.parametrize(("option", "value", "pattern"), PRETRAIN_CASES)
def test_pretrain_rejects_bad_value(setup, tmp_path, capsys, option, value, pattern):
    args = replace_option(pretrain_args(setup, tmp_path / "run"), option, value.replace("MISSING", str(tmp_path)))

    assert_one_line_error(*run_cli(args, capsys), pattern)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_pretrain_rejects_resume_without_run(setup, tmp_path, capsys):
    args = [*pretrain_args(setup, tmp_path / "run"), "--resume"]

    assert_one_line_error(*run_cli(args, capsys), r"`--resume` given but .*last\.pt not found")


# -- every command ----------------------------------------------------------------------------------

COMMANDS = sorted(cli.commands)


def test_commands_include_the_documented_four():
    assert {"evaluate", "train", "finetune", "pretrain"} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_unknown_option_is_one_line_error(command, capsys):
    assert_one_line_error(*run_cli([command, "--no-such-option"], capsys), r"No such option '--no-such-option'")


@pytest.mark.parametrize("command", COMMANDS)
def test_missing_required_option_is_one_line_error(command, capsys):
    if not any(isinstance(p, click.Option) and p.required for p in cli.commands[command].params):
        pytest.skip(f"`{command}` has no required option")

    assert_one_line_error(*run_cli([command], capsys), r"Missing option '--|\(--[a-z-]+\) is missing")


def has_default(option: click.Option, ctx: click.Context) -> bool:
    """Whether the option's default means something: not None, not click's UNSET marker, and not
    the False of a plain on/off flag such as --quiet."""
    default = option.get_default(ctx, call=False)
    if default is None or isinstance(default, enum.Enum):
        return False
    return not (option.is_flag and not option.secondary_opts and default is False)


def options_with_defaults(command: click.Command, ctx: click.Context) -> list[click.Option]:
    return [p for p in command.params if isinstance(p, click.Option) and not p.hidden and has_default(p, ctx)]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_every_default(command, capsys):
    status, out, _ = run_cli([command, "--help"], capsys)
    assert status == 0
    parent = click.Context(cli, info_name="blockdrop", **cli.context_settings)
    ctx = click.Context(cli.commands[command], info_name=command, parent=parent)
    options = options_with_defaults(cli.commands[command], ctx)
    assert options, f"`{command}` has no option with a default"

    for option in options:
        record = option.get_help_record(ctx)
        assert record is not None, option.name
        assert "[default: " in record[1], f"`{command} --help` hides the default of {record[0]}"
    assert len(re.findall(r"\[default:\s", out)) >= len(options)
