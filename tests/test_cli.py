"""Tests for agents/cli.py: the evaluate command and the one-line error contract."""

from __future__ import annotations

import json

import pytest
import torch

from blockdrop_env.checkpoints import save_resnet
from blockdrop_env.resnet import CifarResNet
from tests.conftest import run_cli


@pytest.fixture()
def tiny_resnet(tmp_path) -> str:
    torch.manual_seed(0)
    path = tmp_path / "tiny.pt"
    save_resnet(CifarResNet(depth=8, num_classes=3).eval(), path)
    return str(path)


def test_evaluate_json_has_documented_keys(tiny_resnet, image_folder, capsys):
    status, out, _ = run_cli(
        ["evaluate", "--resnet", tiny_resnet, "--dataset", "imagefolder", "--data-dir", str(image_folder), "--policy", "first:2", "--json"],
        capsys,
    )
    assert status == 0
    report = json.loads(out)
    for key in ("accuracy", "blocks_mean", "blocks_std", "flops_mean", "unique_policies", "num_images"):
        assert key in report
    assert report["num_images"] == 12
    assert report["blocks_mean"] == 2
    assert report["unique_policies"] == 1
    assert report["checkpoint_format"] == "blockdrop"


def test_evaluate_prints_table(tiny_resnet, image_folder, capsys):
    status, out, _ = run_cli(["evaluate", "--resnet", tiny_resnet, "--dataset", "imagefolder", "--data-dir", str(image_folder)], capsys)
    assert status == 0
    assert "accuracy" in out
    assert "blocks          3.00 ± 0.00 of 3" in out


def test_evaluate_random_policy_is_seeded(tiny_resnet, image_folder, capsys):
    args = ["evaluate", "--resnet", tiny_resnet, "--dataset", "imagefolder", "--data-dir", str(image_folder), "--policy", "random:0.5", "--json"]
    first = json.loads(run_cli(args + ["--seed", "1"], capsys)[1])
    second = json.loads(run_cli(args + ["--seed", "1"], capsys)[1])
    assert first == second


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--policy", "first:9"], "`k` must be between 0 and the number of blocks 3, got 9"),
        (["--policy", "drop"], "`policy` must be all"),
        (["--batch-size", "0"], "'--batch-size': must be a positive integer, got 0"),
        (["--batch-size", "-3"], "'--batch-size': must be a positive integer, got -3"),
        (["--num-images", "0"], "'--num-images': must be a positive integer, got 0"),
        (["--split", "val"], "'--split'"),
        (["--dataset", "mnist"], "'--dataset'"),
        (["--dataset", "cifar10"], "cifar-10-batches-py"),
        (["--device", "tpu"], "'--device'"),
    ],
)
def test_evaluate_bad_option_exits_2(tiny_resnet, image_folder, capsys, extra, match):
    status, out, err = run_cli(["evaluate", "--resnet", tiny_resnet, "--dataset", "imagefolder", "--data-dir", str(image_folder), *extra], capsys)
    assert status == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert match in err
    assert "Traceback" not in err


def test_evaluate_missing_resnet_file_exits_2(image_folder, tmp_path, capsys):
    status, _, err = run_cli(["evaluate", "--resnet", str(tmp_path / "nope.th"), "--dataset", "imagefolder", "--data-dir", str(image_folder)], capsys)
    assert status == 2
    assert "nope.th" in err
    assert len(err.strip().splitlines()) == 1


def test_evaluate_missing_data_dir_exits_2(tiny_resnet, tmp_path, capsys):
    status, _, err = run_cli(["evaluate", "--resnet", tiny_resnet, "--dataset", "imagefolder", "--data-dir", str(tmp_path / "absent")], capsys)
    assert status == 2
    assert "absent" in err
    assert len(err.strip().splitlines()) == 1


def test_evaluate_class_count_mismatch_exits_2(tmp_path, image_folder, capsys):
    path = tmp_path / "ten.pt"
    save_resnet(CifarResNet(depth=8, num_classes=10), path)
    status, _, err = run_cli(["evaluate", "--resnet", str(path), "--dataset", "imagefolder", "--data-dir", str(image_folder)], capsys)
    assert status == 2
    assert "3 classes" in err
    assert "10" in err


def test_evaluate_without_resnet_exits_2(image_folder, capsys):
    status, _, err = run_cli(["evaluate", "--dataset", "imagefolder", "--data-dir", str(image_folder)], capsys)
    assert status == 2
    assert "pass exactly one of `--checkpoint`" in err


def test_unknown_command_exits_2(capsys):
    status, _, err = run_cli(["fly"], capsys)
    assert status == 2
    assert "No such command 'fly'" in err


def test_help_shows_defaults(capsys):
    status, out, _ = run_cli(["evaluate", "--help"], capsys)
    assert status == 0
    assert "[default: 256]" in out
