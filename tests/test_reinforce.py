"""Tests for agents/reinforce.py: REINFORCE pieces, curriculum, configuration and the trainer."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from agents.agent_checkpoint import agent_policy_fn
from agents.reinforce import (
    CurriculumSchedule,
    CurriculumTrainer,
    TrainConfig,
    bound_probabilities,
    check_resumable,
    policy_gradient_loss,
    sample_actions,
)
from agents.policy import controlled_mask
from blockdrop_env.data import ImageDataset
from blockdrop_env.errors import ConfigError
from blockdrop_env.resnet import CifarResNet

# Blocks of the constructed ResNet-14 that the prediction needs: layer1.1 and layer3.1.
NEEDED_BLOCKS = (1, 5)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: faster for these tiny networks on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def constructed_resnet() -> CifarResNet:
    """ResNet-14 (K=6) on 8x8 images whose best policy is known: keep blocks 1 and 5 only.

    The stem writes relu(R - G) to channel 0 and relu(G - R) to channel 1. Block 1 (layer1.1)
    copies them to channels 2 and 3, which the shortcuts carry to channels 26 and 27; block 5
    (layer3.1) copies those to channels 40 and 41, the only ones the head reads for classes 0
    and 1. Without either block the logits of classes 0 and 1 are 0 and the small bias of
    class 2, which no image has, wins. Every other block has a zeroed last BN, so its
    residual is 0 and, its input being post-ReLU, relu(x + 0) = x: executing it changes nothing.
    """
    model = CifarResNet(depth=14, num_classes=3, normalization=None, input_size=(8, 8))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.fill_(1.0)
        model.conv1.weight[0, 0, 1, 1], model.conv1.weight[0, 1, 1, 1] = 1.0, -1.0
        model.conv1.weight[1, 1, 1, 1], model.conv1.weight[1, 0, 1, 1] = 1.0, -1.0
        for index, block in enumerate(model._blocks):
            if index not in NEEDED_BLOCKS:
                block.bn2.weight.zero_()
        _copy_channels(model.layer1[1], [(0, 2), (1, 3)])
        _copy_channels(model.layer3[1], [(26, 40), (27, 41)])
        model.linear.weight[0, 40] = 1.0
        model.linear.weight[1, 41] = 1.0
        model.linear.bias[2] = 0.01
    return model.eval()


def _copy_channels(block: torch.nn.Module, pairs: list[tuple[int, int]]) -> None:
    for source, target in pairs:
        block.conv1.weight[target, source, 1, 1] = 1.0
        block.conv2.weight[target, target, 1, 1] = 1.0


def red_green_images(count: int, seed: int) -> ImageDataset:
    """8x8 images: class 0 mostly red, class 1 mostly green, random blue."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % 2
    high = torch.randint(150, 250, (count, 8, 8), generator=generator)
    low = torch.randint(0, 100, (count, 8, 8), generator=generator)
    blue = torch.randint(0, 256, (count, 8, 8), generator=generator)
    is_red = (labels == 0)[:, None, None]
    red, green = torch.where(is_red, high, low), torch.where(is_red, low, high)
    images = torch.stack([red, green, blue], dim=1).to(torch.uint8)
    return ImageDataset(images, labels, ["red", "green", "blue"], "red-green")


def random_dataset(count: int, size: int = 16, num_classes: int = 3, seed: int = 0) -> ImageDataset:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, num_classes, (count,), generator=generator)
    return ImageDataset(images, labels, [f"c{i}" for i in range(num_classes)], "random")


def tiny_resnet(num_classes: int = 3, size: int = 16) -> CifarResNet:
    torch.manual_seed(0)
    return CifarResNet(depth=8, num_classes=num_classes, input_size=(size, size)).eval()


def without_time(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows]


# -- the constructed case ---------------------------------------------------------------------


def test_constructed_resnet_needs_exactly_blocks_1_and_5():
    model = constructed_resnet()
    data = red_green_images(32, seed=1)
    keep = torch.zeros(32, 6, dtype=torch.bool)
    keep[:, list(NEEDED_BLOCKS)] = True
    with torch.no_grad():
        x = model.preprocess(data.images)
        assert bool((model(x, keep).argmax(1) == data.labels).all())
        assert bool((model(x).argmax(1) == data.labels).all())
        for needed in NEEDED_BLOCKS:
            dropped = keep.clone()
            dropped[:, needed] = False
            assert not bool((model(x, dropped).argmax(1) == data.labels).any())


def test_agent_learns_to_drop_identity_blocks(tmp_path):
    config = TrainConfig(
        run_dir=str(tmp_path / "run"),
        epochs=16,
        batch_size=64,
        lr=3e-3,
        beta=0.01,
        penalty=2.0,
        seed=0,
    )
    test_data = red_green_images(64, seed=1)
    trainer = CurriculumTrainer(config, constructed_resnet(), red_green_images(512, seed=0), test_data)
    rows = trainer.fit()

    policy = agent_policy_fn(trainer.policy)(test_data.images)
    expected = torch.zeros(6, dtype=torch.bool)
    expected[list(NEEDED_BLOCKS)] = True
    assert bool((policy == expected).all()), policy.float().mean(0)
    assert rows[-1]["test/accuracy"] == 1.0
    assert rows[-1]["test/blocks_mean"] == 2.0
    assert rows[-1]["curriculum/num_controlled"] == 6


# -- policy-gradient pieces -----------------------------------------------------------------------


def test_bound_probabilities_maps_into_alpha_range():
    probs = torch.tensor([0.0, 0.5, 1.0])
    assert bound_probabilities(probs, 0.8).tolist() == pytest.approx([0.2, 0.5, 0.8])


def test_sample_actions_forces_uncontrolled_blocks_and_follows_bound():
    torch.manual_seed(0)
    probs = torch.ones(20000, 4)
    actions = sample_actions(probs, 0.8, controlled_mask(4, 2))
    assert bool(actions[:, :2].all())
    assert actions[:, 2:].float().mean().item() == pytest.approx(0.8, abs=0.01)


def test_loss_ignores_uncontrolled_blocks():
    probs = torch.full((3, 4), 0.6, requires_grad=True)
    actions = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    loss = policy_gradient_loss(probs, actions, torch.tensor([1.0, -2.0, 0.5]), controlled_mask(4, 2), 0.8, 0.1)
    loss.total.backward()
    assert bool((probs.grad[:, :2] == 0).all())
    assert bool((probs.grad[:, 2:] != 0).all())


def test_loss_raises_probability_of_rewarded_action():
    probs = torch.full((1, 2), 0.5, requires_grad=True)
    actions = torch.tensor([[1, 0]], dtype=torch.bool)
    loss = policy_gradient_loss(probs, actions, torch.tensor([1.0]), controlled_mask(2, 2), 0.8, 0.0)
    loss.total.backward()
    assert probs.grad[0, 0] < 0
    assert probs.grad[0, 1] > 0


def test_loss_entropy_is_bernoulli_entropy_of_controlled_blocks():
    probs = torch.full((2, 3), 0.5)
    loss = policy_gradient_loss(probs, torch.ones(2, 3, dtype=torch.bool), torch.zeros(2), controlled_mask(3, 2), 0.8, 1.0)
    assert loss.entropy.item() == pytest.approx(2 * torch.log(torch.tensor(2.0)).item())
    assert loss.total.item() == pytest.approx(-loss.entropy.item())


# -- curriculum ------------------------------------------------------------------------------------


def test_schedule_adds_one_block_per_epoch_by_default():
    schedule = CurriculumSchedule(num_blocks=4)
    assert [schedule.num_controlled(epoch) for epoch in range(6)] == [1, 2, 3, 4, 4, 4]
    assert schedule.first_full_epoch == 3


def test_schedule_follows_blocks_and_epochs_per_stage():
    schedule = CurriculumSchedule(num_blocks=5, blocks_per_stage=2, epochs_per_stage=3)
    assert [schedule.num_controlled(epoch) for epoch in range(10)] == [2, 2, 2, 4, 4, 4, 5, 5, 5, 5]
    assert schedule.first_full_epoch == 6


def test_schedule_without_stages_controls_all_blocks():
    schedule = CurriculumSchedule(num_blocks=5, epochs_per_stage=0)
    assert schedule.num_controlled(0) == 5
    assert schedule.first_full_epoch == 0


def test_trainer_warns_when_curriculum_outlasts_run(tmp_path):
    config = TrainConfig(run_dir=str(tmp_path), epochs=2, batch_size=8, blocks_per_stage=1)
    with pytest.warns(UserWarning, match="all 3 blocks only in epoch 3, but the run has 2 epochs"):
        CurriculumTrainer(config, tiny_resnet(), random_dataset(16), random_dataset(8, seed=1))


# -- configuration ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("epochs", 0, r"epochs \(--epochs\) must be an integer >= 1, got 0"),
        ("epochs", -3, r"epochs \(--epochs\) must be an integer >= 1, got -3"),
        ("batch_size", 0, r"batch_size \(--batch-size\) must be an integer >= 1, got 0"),
        ("alpha", 0.5, r"alpha \(--alpha\) must be in \(0.5, 1\], got 0.5"),
        ("alpha", 1.2, r"alpha \(--alpha\) must be in \(0.5, 1\], got 1.2"),
        ("beta", -0.1, r"beta \(--beta\) must be >= 0, got -0.1"),
        ("penalty", -1.0, r"penalty \(--penalty\) must be >= 0, got -1.0"),
        ("lr", 0.0, r"lr \(--lr\) must be > 0, got 0.0"),
        ("lr", float("nan"), r"lr \(--lr\) must be a finite number, got nan"),
        ("epochs_per_stage", -1, r"epochs_per_stage \(--epochs-per-stage\) must be an integer >= 0"),
        ("blocks_per_stage", 0, r"blocks_per_stage \(--blocks-per-stage\) must be an integer >= 1"),
        ("max_train_images", -1, r"max_train_images \(--max-train-images\) must be an integer >= 0"),
        ("max_test_images", -5, r"max_test_images \(--max-test-images\) must be an integer >= 0"),
        ("policy_input_size", 0, r"policy_input_size \(--policy-input-size\) must be an integer >= 1"),
        ("seed", -1, r"seed \(--seed\) must be an integer >= 0"),
        ("device", "tpu", r"device \(--device\) must be 'cpu' or 'cuda', got 'tpu'"),
        ("run_dir", "", r"run_dir \(--run-dir\) is missing"),
    ],
)
def test_config_rejects_invalid_value(field, value, message):
    values = {"run_dir": "run", field: value}
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**values)


def test_check_resumable_allows_more_epochs():
    check_resumable({"epochs": 3, "lr": 0.1}, {"epochs": 5, "lr": 0.1})


def test_check_resumable_rejects_changed_learning_rate():
    with pytest.raises(ConfigError, match=r"cannot resume: lr is 0.2 but the run in this directory used 0.1"):
        check_resumable({"epochs": 3, "lr": 0.1}, {"epochs": 3, "lr": 0.2})


# -- runs, checkpoints and resume ----------------------------------------------------------------


def small_trainer(config: TrainConfig) -> CurriculumTrainer:
    return CurriculumTrainer(config, tiny_resnet(), random_dataset(48), random_dataset(16, seed=1))


def test_fit_writes_run_directory(tmp_path):
    config = TrainConfig(run_dir=str(tmp_path / "run"), epochs=2, batch_size=16, epochs_per_stage=0)
    rows = small_trainer(config).fit()
    run = tmp_path / "run"
    assert [row["epoch"] for row in rows] == [0, 1]
    assert json.loads((run / "config.json").read_text())["batch_size"] == 16
    assert (run / "last.pt").is_file()
    assert (run / "best.pt").is_file()
    assert list(run.glob("events.out.tfevents.*"))
    expected = {"train/accuracy", "train/reward", "train/blocks_mean", "train/blocks_std", "train/flops_mean",
                "train/unique_policies", "test/accuracy", "test/reward", "test/blocks_mean", "test/blocks_std",
                "test/flops_mean", "test/unique_policies", "loss/policy", "policy/entropy"}
    assert expected <= set(rows[0])


def test_fit_rejects_existing_run_without_resume(tmp_path):
    config = TrainConfig(run_dir=str(tmp_path / "run"), epochs=1, batch_size=16, epochs_per_stage=0)
    small_trainer(config).fit()
    with pytest.raises(ConfigError, match=r"already contains a run \(last.pt\); pass --resume"):
        small_trainer(config).fit()


@pytest.mark.filterwarnings("ignore:the curriculum gives the agent")
def test_resume_after_partial_epoch_matches_uninterrupted_run(tmp_path):
    config = TrainConfig(run_dir=str(tmp_path / "full"), epochs=3, batch_size=16, penalty=1.0)
    full = small_trainer(config).fit()

    interrupted = replace(config, run_dir=str(tmp_path / "killed"), epochs=2)
    small_trainer(interrupted).fit()
    metrics = Path(interrupted.run_dir) / "metrics.jsonl"
    # A run killed after logging epoch 2 but before its checkpoint leaves this row behind.
    with open(metrics, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"epoch": 2, "train/reward": 123.0}) + "\n")
    resumed = small_trainer(replace(interrupted, epochs=3)).fit(resume=True)

    assert [row["epoch"] for row in resumed] == [0, 1, 2]
    assert without_time(resumed) == without_time(full)


def test_resume_rejects_changed_penalty(tmp_path):
    config = TrainConfig(run_dir=str(tmp_path / "run"), epochs=1, batch_size=16, epochs_per_stage=0)
    small_trainer(config).fit()
    with pytest.raises(ConfigError, match="cannot resume: penalty is 3.0"):
        small_trainer(replace(config, epochs=2, penalty=3.0)).fit(resume=True)
