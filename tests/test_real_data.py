"""Checks against the real CIFAR-10 JPEG images and the public pre-trained CIFAR ResNets."""

from __future__ import annotations

import json

import pytest

from tests.conftest import CIFAR10_JPEG, MODELS, REPO_ROOT, require_real_data, run_cli

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


CIFAR10_RESULTS = REPO_ROOT / "docs" / "results" / "cifar10-resnet32"


@pytest.mark.parametrize("num_images", [2000])
def test_committed_cifar10_agent_reproduces_its_results(num_images, capsys):
    """The committed agent scores, on the first test images, what the pipeline recorded for them."""
    agent = CIFAR10_RESULTS / "agent.pt"
    require_real_data(CIFAR10_JPEG / "test", agent)
    recorded = json.loads((CIFAR10_RESULTS / "results.json").read_text(encoding="utf-8"))["checks"][str(num_images)]
    status, out, err = run_cli(
        [
            "evaluate",
            "--checkpoint",
            str(agent),
            "--dataset",
            "imagefolder",
            "--data-dir",
            str(CIFAR10_JPEG),
            "--split",
            "test",
            "--num-images",
            str(num_images),
            "--json",
        ],
        capsys,
    )
    assert status == 0, err
    report = json.loads(out)
    assert report["num_images"] == num_images
    # One image may flip: the last batch here is smaller than in the full evaluation, and a
    # different batch shape may round a keep probability or a logit the other way.
    assert report["accuracy"] == pytest.approx(recorded["accuracy"], abs=1.0 / num_images)
    assert report["blocks_mean"] == pytest.approx(recorded["blocks_mean"], abs=2.0 / num_images)
