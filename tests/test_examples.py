"""Each script in examples/ run end to end as a subprocess with a tiny budget on tiny data."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from blockdrop_env import CifarResNet, save_resnet
from tests.conftest import CIFAR10_JPEG, MODELS, REPO_ROOT, require_real_data, write_image_folder

EXAMPLES = REPO_ROOT / "examples"
NUMBER = r"(-?\d+(?:\.\d+)?)"
POLICY_LINE = re.compile(rf"^([\w-]+): accuracy {NUMBER}, mean blocks {NUMBER} of (\d+), mean reward {NUMBER}$", re.M)
PIPELINE_FILES = (
    "fewest_most_blocks.png", "block_usage.png", "blocks_per_class.png", "pareto.png", "results.json", "agent.pt",
)  # fmt: skip


def run_example(script: str, *args: str | Path, expected_status: int = 0) -> str:
    """Run ``python examples/SCRIPT ARGS`` from the repository root; return its stdout."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    completed = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *map(str, args)],
        cwd=REPO_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == expected_status, completed.stderr[-3000:]
    return completed.stdout + completed.stderr if expected_status else completed.stdout


def policy_results(output: str) -> dict[str, tuple[float, float, int, float]]:
    """``{name: (accuracy, mean blocks, K, mean reward)}`` from the examples' summary lines."""
    return {
        name: (float(accuracy), float(blocks), int(num_blocks), float(reward))
        for name, accuracy, blocks, num_blocks, reward in POLICY_LINE.findall(output)
    }


@pytest.fixture(scope="module")
def shapes_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 3-block CIFAR ResNet for the 10 shape classes."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("checkpoint") / "resnet8.pt"
    save_resnet(CifarResNet(depth=8, num_classes=10), path)
    return path


def test_random_agent_prints_episode_metrics(shapes_checkpoint: Path) -> None:
    output = run_example("random_agent.py", "--episodes", "6", "--checkpoint", shapes_checkpoint)

    values = dict(re.findall(rf"^([a-z ]+): {NUMBER}", output, re.M))
    assert values["episodes"] == "6"
    assert float(values["mean reward"]) <= 1.0
    assert 0.0 <= float(values["accuracy"]) <= 1.0
    assert 0.0 <= float(values["mean blocks used"]) <= 3.0
    assert 0.0 <= float(values["mean difficulty"]) <= 1.0
    assert "mean difficulty of correct images" in output
    assert "mean difficulty of wrong images" in output


def test_ppo_sb3_prints_test_metrics(shapes_checkpoint: Path) -> None:
    output = run_example(
        "ppo_sb3.py", "--timesteps", "64", "--num-envs", "16", "--checkpoint", shapes_checkpoint,
        "--test-images", "64", "--seed", "1",
    )  # fmt: skip

    results = policy_results(output)
    assert set(results) == {"ppo", "all-blocks"}
    accuracy, blocks, num_blocks, _ = results["ppo"]
    assert 0.0 <= accuracy <= 1.0
    assert num_blocks == 3
    assert 0.0 <= blocks <= 3.0
    assert results["all-blocks"][1] == 3.0
    assert "trained on 64 images, evaluated on 64 test images" in output


def test_bandit_learner_prints_policy_next_to_all_blocks(shapes_checkpoint: Path) -> None:
    output = run_example(
        "bandit_learner.py", "--budget", "128", "--num-envs", "32", "--checkpoint", shapes_checkpoint,
        "--test-images", "64", "--epsilon", "0.2",
    )  # fmt: skip

    results = policy_results(output)
    assert set(results) == {"bandit", "all-blocks"}
    assert 0.0 <= results["bandit"][0] <= 1.0
    assert 0.0 <= results["bandit"][1] <= 3.0
    assert results["all-blocks"][1] == 3.0
    assert "trained on 128 images" in output
    gains = re.findall(rf"layer\d\.\d {NUMBER}", output.replace("+", ""))
    assert len(gains) == 3


# ---------------------------------------------------------------------------------------------
# examples/cifar10_resnet32.py


def check_pipeline_outputs(out_dir: Path, num_blocks: int) -> dict:
    """Check the report and its folder; return results.json."""
    report = out_dir / "cifar10-resnet32.md"
    assert report.is_file()
    text = report.read_text(encoding="utf-8")
    for heading in ("## Goals", "## Test results", "## CPU latency", "## Time per stage", "## Machine"):
        assert heading in text
    assert "python examples/cifar10_resnet32.py --data-dir" in text
    for name in PIPELINE_FILES:
        assert (out_dir / "cifar10-resnet32" / name).stat().st_size > 0, name

    results = json.loads((out_dir / "cifar10-resnet32" / "results.json").read_text(encoding="utf-8"))
    evaluation = results["stages"]["evaluate"]
    for name in ("blockdrop", "curriculum_only", "all_blocks_finetuned", "all_blocks_adapted"):
        assert 0.0 <= evaluation[name]["accuracy"] <= 1.0
        assert 0.0 <= evaluation[name]["blocks_mean"] <= num_blocks
        assert evaluation[name]["unique_policies"] >= 1
    assert evaluation["all_blocks_adapted"]["blocks_mean"] == num_blocks
    baselines = results["stages"]["baselines"]
    assert [row["parameter"] for row in baselines["first_k_curve"]] == list(range(num_blocks + 1))
    assert len(baselines["random_drop_curve"]) == 11
    assert baselines["best_fixed"]["policy"].startswith("fixed:")
    latency = results["stages"]["latency"]
    for key in ("blockdrop_batch1_ms", "full_batch1_ms", "blockdrop_batch256_ms", "full_batch256_ms"):
        assert latency[key] > 0.0
    assert results["machine"]["cpu_count"] >= 1
    assert 0.0 <= results["stages"]["pretrain"]["original_accuracy"] <= 1.0
    assert set(results["stage_seconds"]) == {"decode", "pretrain", "reinforce", "finetune", "refine", "evaluate",
                                             "baselines", "latency", "pictures"}  # fmt: skip
    assert all(seconds > 0.0 for seconds in results["stage_seconds"].values())
    return results


@pytest.fixture()
def tiny_pipeline_args(tmp_path: Path) -> list[str | Path]:
    """Options that run the whole pipeline on a 3-class ImageFolder tree and a 3-block ResNet."""
    data = write_image_folder(tmp_path / "images", num_classes=3, per_class=16)
    torch.manual_seed(0)
    save_resnet(CifarResNet(depth=8, num_classes=3), tmp_path / "pretrained.pt")
    return [
        "--data-dir", data, "--resnet", tmp_path / "pretrained.pt",
        "--work-dir", tmp_path / "work", "--out-dir", tmp_path / "docs",
        "--pretrain-epochs", "1", "--pretrain-batch-size", "16", "--reinforce-epochs", "1",
        "--finetune-epochs", "1", "--batch-size", "16", "--fixed-search-images", "16", "--latency-images", "4",
    ]  # fmt: skip


def test_cifar10_pipeline_runs_every_stage_on_tiny_data(tmp_path: Path, tiny_pipeline_args: list[str | Path]) -> None:
    output = run_example("cifar10_resnet32.py", *tiny_pipeline_args)

    assert re.search(rf"estimated time on 2 idle CPU cores: {NUMBER} min", output)
    for index in (*range(7), "2b"):
        assert re.search(rf"stage {index} \(\w+\): finished in {NUMBER} s", output)
    assert re.search(rf"^blockdrop: accuracy {NUMBER}, blocks {NUMBER} ± {NUMBER}", output, re.M)
    assert re.search(rf"^joint_finetune_only: accuracy {NUMBER}", output, re.M)
    results = check_pipeline_outputs(tmp_path / "docs", num_blocks=3)
    assert (tmp_path / "work" / "finetune" / "last.pt").is_file()

    # The exported agent is stage 2b's without its training state: stage 2's policy with the
    # ResNet trained for it, and it scores what stage 3 recorded.
    agent = torch.load(tmp_path / "docs" / "cifar10-resnet32" / "agent.pt", weights_only=True)
    assert "training" not in agent
    joint = torch.load(tmp_path / "work" / "finetune" / "last.pt", weights_only=True)
    refined = torch.load(tmp_path / "work" / "refine" / "agent.pt", weights_only=True)
    for key, value in joint["policy"].items():
        assert torch.equal(agent["policy"][key], value), key
    for key, value in refined["resnet"]["state_dict"].items():
        assert torch.equal(agent["resnet"]["state_dict"][key], value), key
    assert results["stages"]["refine"]["accuracy_after"] == pytest.approx(
        results["stages"]["evaluate"]["blockdrop"]["accuracy"]
    )
    blockdrop = results["stages"]["evaluate"]["blockdrop"]
    checks = results["checks"][str(blockdrop["num_images"])]
    assert checks["accuracy"] == pytest.approx(blockdrop["accuracy"])
    assert checks["blocks_mean"] == pytest.approx(blockdrop["blocks_mean"])

    # The same command again resumes: every stage has finished, so none runs.
    rerun = run_example("cifar10_resnet32.py", *tiny_pipeline_args)

    assert rerun.count("done before, skipped") == 8
    assert "finished in" not in rerun
    check_pipeline_outputs(tmp_path / "docs", num_blocks=3)


def test_pipeline_without_refine_exports_joint_agent(
    tmp_path: Path, tiny_pipeline_args: list[str | Path]
) -> None:
    output = run_example("cifar10_resnet32.py", *tiny_pipeline_args, "--refine-epochs", "0")

    assert re.search(rf"stage 2b \(refine\): finished in {NUMBER} s", output)
    assert not (tmp_path / "work" / "refine").exists()
    results = check_pipeline_outputs(tmp_path / "docs", num_blocks=3)
    assert "joint_finetune_only" not in results["stages"]["evaluate"]
    agent = torch.load(tmp_path / "docs" / "cifar10-resnet32" / "agent.pt", weights_only=True)
    joint = torch.load(tmp_path / "work" / "finetune" / "last.pt", weights_only=True)
    for key, value in joint["resnet"]["state_dict"].items():
        assert torch.equal(agent["resnet"]["state_dict"][key], value), key


def test_cifar10_pipeline_rejects_changed_recipe(
    tmp_path: Path, tiny_pipeline_args: list[str | Path]
) -> None:
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "recipe.json").write_text(json.dumps({"reinforce_epochs": 99}), encoding="utf-8")

    output = run_example("cifar10_resnet32.py", *tiny_pipeline_args, expected_status=2)

    assert "Error:" in output
    assert "--reinforce-epochs 99 before, 1 now" in output
    assert "Traceback" not in output


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--pretrain-precision", "float16", "--pretrain-precision must be one of float32, bfloat16"),
        ("--pretrain-stochastic-depth", "0", "--pretrain-stochastic-depth must be a survival probability"),
        ("--penalty", "-1", "--penalty must be >= 0"),
        ("--refine-epochs", "-1", "--refine-epochs must be >= 0, got -1"),
        ("--refine-lr", "0", "--refine-lr must be a finite number > 0, got 0.0"),
        ("--refine-lr", "inf", "--refine-lr must be a finite number > 0, got inf"),
    ],
)
def test_cifar10_pipeline_rejects_bad_option_before_writing(
    tmp_path: Path, tiny_pipeline_args: list[str | Path], option: str, value: str, message: str
) -> None:
    output = run_example("cifar10_resnet32.py", *tiny_pipeline_args, option, value, expected_status=2)

    assert message in output
    assert "Traceback" not in output
    assert not (tmp_path / "work" / "recipe.json").exists()


@pytest.mark.real_data
@pytest.mark.slow
def test_cifar10_pipeline_smoke_run_on_real_data(tmp_path: Path) -> None:
    resnet = MODELS / "resnet32-d509ac18.th"
    require_real_data(CIFAR10_JPEG, resnet)

    run_example(
        "cifar10_resnet32.py", "--data-dir", CIFAR10_JPEG, "--resnet", resnet,
        "--work-dir", tmp_path / "work", "--out-dir", tmp_path / "docs",
        "--max-train-images", "256", "--max-test-images", "128", "--pretrain-epochs", "1",
        "--reinforce-epochs", "1", "--finetune-epochs", "1", "--fixed-search-images", "64", "--latency-images", "20",
    )  # fmt: skip

    results = check_pipeline_outputs(tmp_path / "docs", num_blocks=15)
    # The public ResNet-32 classifies 82.56% of the 10,000 JPEG test images with every block.
    assert results["stages"]["pretrain"]["original_accuracy"] > 0.6
    assert results["stages"]["evaluate"]["all_blocks_adapted"]["num_images"] == 128
