"""Checks against the real CIFAR-10 JPEG images and the public pre-trained CIFAR ResNets."""

from __future__ import annotations

import json

import pytest

from tests.conftest import CIFAR10_JPEG, MODELS, require_real_data, run_cli

pytestmark = pytest.mark.real_data


@pytest.mark.parametrize(
    ("checkpoint", "expected_accuracy", "num_blocks"),
    [("resnet32-d509ac18.th", 0.8256, 15), ("resnet20-12fca82f.th", 0.8103, 9)],
)
def test_pretrained_resnet_accuracy_on_cifar10_jpeg(checkpoint, expected_accuracy, num_blocks, capsys):
    require_real_data(CIFAR10_JPEG / "test", MODELS / checkpoint)
    status, out, err = run_cli(
        [
            "evaluate",
            "--resnet",
            str(MODELS / checkpoint),
            "--dataset",
            "imagefolder",
            "--data-dir",
            str(CIFAR10_JPEG),
            "--split",
            "test",
            "--json",
        ],
        capsys,
    )
    assert status == 0, err
    report = json.loads(out)
    assert report["num_images"] == 10000
    assert report["num_blocks"] == num_blocks
    assert report["checkpoint_format"] == "pytorch_resnet_cifar10"
    assert report["accuracy"] == pytest.approx(expected_accuracy, abs=0.002)
