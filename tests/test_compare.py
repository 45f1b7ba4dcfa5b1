"""Tests for agents/compare.py and agents/cli_compare.py: learners on equal budgets, bootstrap
intervals and the `blockdrop compare` command."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from agents.bandit import LinearThompsonBandit
from agents.compare import (
    LearningProblem,
    ReinforceLearner,
    bootstrap_ci,
    resolve_learner,
    score_policy,
)
from agents.sb3_learners import SB3Learner
from blockdrop_env.data import ImageDataset
from blockdrop_env.errors import ConfigError
from blockdrop_env.resnet import CifarResNet
from tests.conftest import run_cli

# The constructed ResNet-8 needs only its last block (layer3.0) to classify the red-green images.
NEEDED_BLOCK = 2


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: faster for these tiny networks on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- shared helpers (also used by tests/test_bandit.py and tests/test_baselines.py) -------------


def last_block_resnet() -> CifarResNet:
    """ResNet-8 (K=3) on 8x8 images whose best policy is known: keep only block 2 (layer3.0).

    The stem writes relu(R - G) to channel 0 and relu(G - R) to channel 1. The option-A
    shortcuts carry them to channels 8 and 9 after layer2.0; layer3.0's residual copies those to
    channels 40 and 41, the only ones the head reads for classes 0 and 1. Without that block
    the small bias of class 2, which no image has, wins. Blocks 0 and 1 have a zeroed last BN,
    so their residual is 0 and executing them changes nothing.
    """
    model = CifarResNet(depth=8, num_classes=3, normalization=None, input_size=(8, 8))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.fill_(1.0)
        model.conv1.weight[0, 0, 1, 1], model.conv1.weight[0, 1, 1, 1] = 1.0, -1.0
        model.conv1.weight[1, 1, 1, 1], model.conv1.weight[1, 0, 1, 1] = 1.0, -1.0
        model.layer1[0].bn2.weight.zero_()
        model.layer2[0].bn2.weight.zero_()
        for source, target in ((8, 40), (9, 41)):
            model.layer3[0].conv1.weight[target, source, 1, 1] = 1.0
            model.layer3[0].conv2.weight[target, target, 1, 1] = 1.0
        model.linear.weight[0, 40] = 1.0
        model.linear.weight[1, 41] = 1.0
        model.linear.bias[2] = 0.01
    return model.eval()


def red_green_images(count: int, seed: int) -> ImageDataset:
    """8x8 images: class 0 mostly red, class 1 mostly green, random blue; class 2 never occurs."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % 2
    high = torch.randint(150, 250, (count, 8, 8), generator=generator)
    low = torch.randint(0, 100, (count, 8, 8), generator=generator)
    blue = torch.randint(0, 256, (count, 8, 8), generator=generator)
    is_red = (labels == 0)[:, None, None]
    images = torch.stack([torch.where(is_red, high, low), torch.where(is_red, low, high), blue], dim=1)
    return ImageDataset(images.to(torch.uint8), labels, ["red", "green", "blue"], "red-green")


def constructed_problem(num_images: int = 512, penalty: float = 2.0) -> LearningProblem:
    return LearningProblem(last_block_resnet(), red_green_images(num_images, seed=0), penalty=penalty, batch_size=32)


def keep_only_needed_block(images: torch.Tensor) -> torch.Tensor:
    policy = torch.zeros(images.shape[0], 3, dtype=torch.bool)
    policy[:, NEEDED_BLOCK] = True
    return policy


# -- the constructed case ---------------------------------------------------------------------


def test_constructed_resnet_needs_only_last_block():
    model = last_block_resnet()
    data = red_green_images(32, seed=1)
    for keep in range(8):
        bits = [bool(keep >> i & 1) for i in range(3)]
        policy = torch.tensor(bits).expand(32, -1)
        with torch.no_grad():
            correct = model(model.preprocess(data.images), policy, mode="sparse").argmax(1) == data.labels
        assert bool(correct.all()) == bits[NEEDED_BLOCK], bits
        assert bool(correct.any()) == bits[NEEDED_BLOCK], bits


# -- bootstrap intervals ------------------------------------------------------------------------


def test_bootstrap_ci_brackets_mean():
    values = [0.71, 0.74, 0.69, 0.77, 0.72]
    interval = bootstrap_ci(values)
    assert interval.mean == pytest.approx(np.mean(values))
    assert interval.low < interval.mean < interval.high
    assert min(values) <= interval.low
    assert interval.high <= max(values)


def test_bootstrap_ci_narrows_with_more_values():
    rng = np.random.default_rng(0)
    few = bootstrap_ci(rng.normal(0.0, 1.0, 20))
    many = bootstrap_ci(rng.normal(0.0, 1.0, 2000))
    assert many.high - many.low < (few.high - few.low) / 4
    assert many.low < 0.0 < many.high


def test_bootstrap_ci_is_deterministic_by_seed():
    values = np.random.default_rng(0).normal(0.0, 1.0, 30).tolist()
    assert bootstrap_ci(values, num_resamples=200, seed=3) == bootstrap_ci(values, num_resamples=200, seed=3)
    assert bootstrap_ci(values, num_resamples=200, seed=3) != bootstrap_ci(values, num_resamples=200, seed=4)


def test_bootstrap_ci_single_value_has_nan_bounds():
    interval = bootstrap_ci([0.5])
    assert interval.mean == 0.5
    assert math.isnan(interval.low)
    assert math.isnan(interval.high)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"values": []}, "non-empty 1-D sequence"),
        ({"values": [1.0, float("nan")]}, "finite numbers"),
        ({"values": [1.0, 2.0], "confidence": 1.0}, r"`confidence` must be in \(0, 1\), got 1.0"),
        ({"values": [1.0, 2.0], "num_resamples": 0}, "`num_resamples` must be a positive integer, got 0"),
    ],
)
def test_bootstrap_ci_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        bootstrap_ci(**kwargs)


# -- learners --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [("reinforce", ReinforceLearner), ("bandit", LinearThompsonBandit), ("ppo", SB3Learner), ("A2C", SB3Learner)],
)
def test_resolve_learner_builds_each_agent(name, expected):
    learner = resolve_learner(name)
    assert isinstance(learner, expected)
    assert learner.name == name.lower()


def test_resolve_learner_rejects_unknown_name():
    with pytest.raises(ConfigError, match="unknown agent 'qlearn'; use reinforce, bandit"):
        resolve_learner("qlearn")


def test_resolve_learner_rejects_sac():
    with pytest.raises(ConfigError, match="SAC does not support MultiBinary"):
        resolve_learner("sac")


@pytest.mark.parametrize(("budget", "expected_seen"), [(20, 20), (96, 96), (1000, 960), (1500, 1440)])
def test_reinforce_learner_stays_within_budget(budget, expected_seen):
    problem = LearningProblem(last_block_resnet(), red_green_images(512, seed=0), penalty=2.0, batch_size=32)
    learner = ReinforceLearner(validation_images=16)
    learner.fit(problem, budget, seed=0)
    assert learner.images_seen == expected_seen
    assert learner.images_seen <= budget


def test_reinforce_learner_learns_constructed_case():
    problem = constructed_problem()
    test_data = red_green_images(128, seed=1)
    policy_fn = ReinforceLearner(lr=3e-3, beta=0.01).fit(problem, 4096, seed=0)
    score = score_policy(problem.model, test_data, policy_fn, problem.reward)
    assert score.accuracy == 1.0
    assert score.blocks < 1.5


# -- blockdrop compare --------------------------------------------------------------------------


@pytest.fixture()
def blockdrop_cli():
    """The `blockdrop` group with `compare` registered, as agents.cli will register it."""
    from agents.cli import cli
    from agents.cli_compare import compare

    cli.add_command(compare)
    return cli


def write_red_green_folder(root: Path) -> Path:
    """ImageFolder tree of red-green images; the folder names sort into the model's label order."""
    from PIL import Image

    for split, seed, count in (("train", 0, 96), ("test", 1, 32)):
        data = red_green_images(count, seed)
        for label in range(3):
            (root / split / f"c{label}").mkdir(parents=True, exist_ok=True)
        for i, (image, label) in enumerate(zip(data.images, data.labels)):
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(root / split / f"c{int(label)}" / f"{i:03d}.png")
        # A gray image has R = G, so the constructed network predicts class 2 for it.
        gray = np.full((8, 8, 3), 120, dtype=np.uint8)
        Image.fromarray(gray).save(root / split / "c2" / "gray.png")
    return root


@pytest.fixture()
def compare_inputs(tmp_path: Path) -> list[str]:
    from blockdrop_env.checkpoints import save_resnet

    save_resnet(last_block_resnet(), tmp_path / "resnet.pt")
    data_dir = write_red_green_folder(tmp_path / "images")
    return ["compare", "--resnet", str(tmp_path / "resnet.pt"), "--dataset", "imagefolder", "--data-dir", str(data_dir)]


def test_compare_writes_tables_and_plot(blockdrop_cli, compare_inputs, tmp_path, capsys):
    out = tmp_path / "out"
    options = ["--agents", "reinforce,ppo,a2c,bandit", "--seeds", "2", "--budget", "64", "--batch-size", "32"]
    status, stdout, stderr = run_cli([*compare_inputs, *options, "--fixed-search-images", "32", "--out", str(out)], capsys)
    assert status == 0, stderr

    with open(out / "results.csv", encoding="utf-8") as handle:
        rows = {row["name"]: row for row in csv.DictReader(handle)}
    for agent in ("reinforce", "ppo", "a2c", "bandit"):
        assert rows[agent]["kind"] == "learner"
        assert rows[agent]["num_seeds"] == "2"
        assert rows[agent]["images_seen"] == "64"
        assert float(rows[agent]["accuracy_ci_low"]) <= float(rows[agent]["accuracy"]) <= float(rows[agent]["accuracy_ci_high"])
        assert f"first-k@{agent}" in rows
        assert rows[f"random-drop@{agent}"]["num_seeds"] == "2"
    assert rows["best-fixed"]["policy"] == "fixed:001"
    assert float(rows["best-fixed"]["accuracy"]) == 1.0
    assert rows["all-blocks"]["policy"] == "all"
    for metric in ("accuracy", "blocks", "flops", "reward"):
        assert {f"{metric}_ci_low", f"{metric}_ci_high"} <= set(rows["ppo"])

    markdown = (out / "results.md").read_text(encoding="utf-8")
    assert markdown.count("| learner |") == 4
    assert "| best-fixed | baseline | `fixed:001` |" in markdown
    report = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert len(report["curves"]["first_k"]) == 4
    assert [len(row["per_seed"]) for row in report["rows"] if row["kind"] == "learner"] == [2, 2, 2, 2]
    assert report["budget"] == 64
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "bandit seed 1: test accuracy" in stderr
    assert "| bandit |" in stdout


def test_compare_quiet_prints_nothing(blockdrop_cli, compare_inputs, tmp_path, capsys):
    options = ["--agents", "bandit", "--seeds", "1", "--budget", "32", "--quiet"]
    status, stdout, stderr = run_cli([*compare_inputs, *options, "--out", str(tmp_path / "out")], capsys)
    assert status == 0, stderr
    assert stdout == ""
    assert (tmp_path / "out" / "results.md").is_file()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--agents", "reinforce,qlearn"], "unknown agent 'qlearn'"),
        (["--agents", "dqn"], "DQN does not support MultiBinary"),
        (["--agents", ","], "must list at least one agent"),
        (["--seeds", "0"], "--seeds': must be a positive integer, got 0"),
        (["--budget", "-5"], "--budget': must be a positive integer, got -5"),
    ],
)
def test_compare_rejects_bad_option(blockdrop_cli, compare_inputs, tmp_path, capsys, options, message):
    status, stdout, stderr = run_cli([*compare_inputs, *options, "--out", str(tmp_path / "out")], capsys)
    assert status == 2
    assert message in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_compare_requires_data_dir_for_files(blockdrop_cli, tmp_path, capsys):
    from blockdrop_env.checkpoints import save_resnet

    save_resnet(last_block_resnet(), tmp_path / "resnet.pt")
    args = ["compare", "--resnet", str(tmp_path / "resnet.pt"), "--dataset", "imagefolder", "--out", str(tmp_path / "out")]
    status, _, stderr = run_cli(args, capsys)
    assert status == 2
    assert "--data-dir is required for --dataset imagefolder" in stderr
