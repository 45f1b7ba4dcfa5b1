"""Tests for agents/pretrain.py and the `blockdrop pretrain` command in agents/cli_pretrain.py."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from agents.baselines import AllBlocks
from agents.cli_pretrain import pretrain_command
from agents.evaluation import evaluate_policy
from agents.pretrain import PretrainConfig, WarmupCosine, pretrain
from blockdrop_env.checkpoints import load_resnet, save_resnet
from blockdrop_env.data import ImageDataset
from blockdrop_env.errors import CheckpointError, ConfigError
from blockdrop_env.resnet import CIFAR10_NORMALIZATION, IMAGENET_NORMALIZATION, CifarResNet
from tests.conftest import run_cli

# Pure red, green and blue 16x16 images with noise: separable by colour alone.
COLOURS = torch.tensor([[200.0, 30.0, 30.0], [30.0, 200.0, 30.0], [30.0, 30.0, 200.0]])
TIMING_KEYS = {"train/images_per_second", "time/epoch_seconds"}


def make_colour_dataset(num_images: int, seed: int, num_classes: int = 3) -> ImageDataset:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_images) % num_classes
    noise = 40.0 * torch.randn(num_images, 3, 16, 16, generator=generator)
    images = (COLOURS[labels][:, :, None, None] + noise).clamp(0, 255).to(torch.uint8)
    return ImageDataset(images, labels, [f"class{i}" for i in range(num_classes)], f"colours-{seed}")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny networks gain nothing from a second thread. On a busy 2-core machine, OpenMP threads
    # waiting for a core slowed one tiny run from 0.3 s to 5 s.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def train_data() -> ImageDataset:
    return make_colour_dataset(48, seed=0)


@pytest.fixture(scope="module")
def test_data() -> ImageDataset:
    return make_colour_dataset(30, seed=1)


def tiny_config(**overrides: object) -> PretrainConfig:
    settings: dict[str, object] = {"arch": "cifar_resnet8", "epochs": 2, "batch_size": 16, "lr": 0.05}
    settings.update(overrides)
    return PretrainConfig(**settings)  # type: ignore[arg-type]


def run_tiny(run_dir: Path, train_data: ImageDataset, test_data: ImageDataset, **overrides: object):
    return pretrain(tiny_config(**overrides), run_dir, train_data=train_data, test_data=test_data, progress=False)


def accuracy_of(model: torch.nn.Module, data: ImageDataset) -> float:
    return evaluate_policy(model, data, AllBlocks(model.num_blocks)).accuracy  # type: ignore[union-attr]


def read_rows(run_dir: Path) -> list[dict[str, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def without_timing(rows: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{key: value for key, value in row.items() if key not in TIMING_KEYS} for row in rows]


class Interrupted(Exception):
    """Stands for the process being killed after an epoch's checkpoint."""


def stop_after_epoch_1(epoch: int, metrics: object) -> None:
    if epoch == 1:
        raise Interrupted


# -- training ---------------------------------------------------------------------------------


def test_pretrain_raises_accuracy_on_separable_data(tmp_path, train_data, test_data):
    torch.manual_seed(0)
    untrained = CifarResNet(depth=8, num_classes=3, input_size=(16, 16))
    before = accuracy_of(untrained, test_data)

    result = run_tiny(tmp_path / "run", train_data, test_data, epochs=3)

    assert result.final_accuracy >= 0.9
    assert result.final_accuracy > before + 0.3
    assert result.initial_accuracy is None
    assert result.epochs == 3


def test_pretrain_trains_in_bfloat16(tmp_path, train_data, test_data):
    result = run_tiny(tmp_path / "run", train_data, test_data, epochs=3, precision="bfloat16")

    assert result.final_accuracy >= 0.9


def test_pretrain_trains_contiguous(tmp_path, train_data, test_data):
    result = run_tiny(tmp_path / "run", train_data, test_data, epochs=3, channels_last=False)

    assert result.final_accuracy >= 0.9


def test_pretrain_logs_metrics_per_epoch(tmp_path, train_data, test_data):
    run_tiny(tmp_path / "run", train_data, test_data)

    rows = read_rows(tmp_path / "run")
    assert [row["epoch"] for row in rows] == [1, 2]
    for key in ("train/loss", "train/accuracy", "test/accuracy", "lr", "train/images_per_second", "time/epoch_seconds"):
        assert key in rows[0]
    assert rows[1]["lr"] < rows[0]["lr"]


def test_pretrain_writes_run_files(tmp_path, train_data, test_data):
    run_tiny(tmp_path / "run", train_data, test_data)

    for name in ("config.json", "metrics.jsonl", "last.pt", "best.pt", "model.pt", "best_model.pt"):
        assert (tmp_path / "run" / name).is_file(), name
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["arch"] == "cifar_resnet8"
    assert config["num_classes"] == 3
    assert config["normalization"] == "imagenet"


def test_pretrain_resolves_default_lr(tmp_path, train_data, test_data):
    run_tiny(tmp_path / "scratch", train_data, test_data, epochs=1, lr=None)
    checkpoint = tmp_path / "scratch" / "model.pt"
    run_tiny(tmp_path / "tuned", train_data, test_data, epochs=1, lr=None, arch=None, init=str(checkpoint))

    assert json.loads((tmp_path / "scratch" / "config.json").read_text())["lr"] == 0.1
    assert json.loads((tmp_path / "tuned" / "config.json").read_text())["lr"] == 0.01


def test_pretrain_is_deterministic_for_a_seed(tmp_path, train_data, test_data):
    run_tiny(tmp_path / "a", train_data, test_data)
    run_tiny(tmp_path / "b", train_data, test_data)

    first = load_resnet(tmp_path / "a" / "model.pt").model.state_dict()
    second = load_resnet(tmp_path / "b" / "model.pt").model.state_dict()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_model_file_reproduces_final_accuracy(tmp_path, train_data, test_data):
    result = run_tiny(tmp_path / "run", train_data, test_data)

    loaded = load_resnet(result.model_path)
    assert accuracy_of(loaded.model, test_data) == pytest.approx(result.final_accuracy)


# -- fine-tuning from a checkpoint --------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory, train_data, test_data) -> Path:
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    return run_tiny(run_dir, train_data, test_data, epochs=1).model_path


def test_init_logs_checkpoint_accuracy_at_epoch_0(tmp_path, trained_checkpoint, train_data, test_data):
    expected = accuracy_of(load_resnet(trained_checkpoint).model, test_data)

    result = run_tiny(tmp_path / "run", train_data, test_data, arch=None, init=str(trained_checkpoint), epochs=1)

    rows = read_rows(tmp_path / "run")
    assert rows[0] == {"epoch": 0, "test/accuracy": expected}
    assert result.initial_accuracy == expected
    assert result.head_replaced is False


def test_init_with_other_class_count_replaces_head(tmp_path, train_data, test_data):
    torch.manual_seed(1)
    five_class = CifarResNet(depth=8, num_classes=5, input_size=(16, 16))
    checkpoint = tmp_path / "five.pt"
    save_resnet(five_class, checkpoint)

    # A learning rate this small leaves the convolutions as they were loaded.
    result = run_tiny(tmp_path / "run", train_data, test_data, arch=None, init=str(checkpoint), epochs=1, lr=1e-12)

    tuned = load_resnet(result.model_path).model
    assert result.head_replaced is True
    assert tuned.num_classes == 3
    assert tuned.linear.weight.shape == (3, 64)
    assert torch.allclose(tuned.conv1.weight, five_class.conv1.weight)


def test_init_keeps_checkpoint_normalization(tmp_path, train_data, test_data):
    torch.manual_seed(2)
    checkpoint = tmp_path / "cifar_norm.pt"
    save_resnet(CifarResNet(depth=8, num_classes=3, normalization=CIFAR10_NORMALIZATION), checkpoint)

    result = run_tiny(tmp_path / "run", train_data, test_data, arch=None, init=str(checkpoint), epochs=1)

    assert load_resnet(result.model_path).model.normalization == CIFAR10_NORMALIZATION


def test_init_rejects_mismatched_arch(tmp_path, trained_checkpoint, train_data, test_data):
    with pytest.raises(CheckpointError, match="contains a cifar_resnet8, expected `arch` cifar_resnet14"):
        run_tiny(tmp_path / "run", train_data, test_data, arch="cifar_resnet14", init=str(trained_checkpoint))


# -- resume -------------------------------------------------------------------------------------


def test_resume_matches_uninterrupted_run(tmp_path, train_data, test_data):
    run_tiny(tmp_path / "whole", train_data, test_data)
    with pytest.raises(Interrupted):
        pretrain(
            tiny_config(),
            tmp_path / "split",
            train_data=train_data,
            test_data=test_data,
            progress=False,
            on_epoch_end=stop_after_epoch_1,
        )
    assert [row["epoch"] for row in read_rows(tmp_path / "split")] == [1]

    pretrain(tiny_config(), tmp_path / "split", train_data=train_data, test_data=test_data, resume=True, progress=False)

    whole = load_resnet(tmp_path / "whole" / "model.pt").model.state_dict()
    split = load_resnet(tmp_path / "split" / "model.pt").model.state_dict()
    for key in whole:
        assert torch.equal(whole[key], split[key]), key
    assert without_timing(read_rows(tmp_path / "split")) == without_timing(read_rows(tmp_path / "whole"))


def test_resume_drops_metrics_after_checkpoint(tmp_path, train_data, test_data):
    with pytest.raises(Interrupted):
        pretrain(
            tiny_config(),
            tmp_path / "run",
            train_data=train_data,
            test_data=test_data,
            progress=False,
            on_epoch_end=stop_after_epoch_1,
        )
    # A row of epoch 2 written before a crash, without its checkpoint.
    with open(tmp_path / "run" / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps({"epoch": 2, "test/accuracy": 0.5}) + "\n")

    pretrain(tiny_config(), tmp_path / "run", train_data=train_data, test_data=test_data, resume=True, progress=False)

    epochs = [row["epoch"] for row in read_rows(tmp_path / "run")]
    assert epochs == [1, 2]


def test_resume_rejects_changed_epochs(tmp_path, train_data, test_data):
    run_tiny(tmp_path / "run", train_data, test_data, epochs=1)

    with pytest.raises(ConfigError, match="epochs: 1 in the run, 2 now"):
        pretrain(tiny_config(epochs=2), tmp_path / "run", train_data=train_data, test_data=test_data, resume=True)


def test_resume_rejects_run_without_checkpoint(tmp_path, train_data, test_data):
    with pytest.raises(ConfigError, match="cannot resume: .*last.pt not found"):
        pretrain(tiny_config(), tmp_path / "empty", train_data=train_data, test_data=test_data, resume=True)


def test_new_run_rejects_existing_run(tmp_path, train_data, test_data):
    run_tiny(tmp_path / "run", train_data, test_data, epochs=1)

    with pytest.raises(ConfigError, match="already contains a run"):
        run_tiny(tmp_path / "run", train_data, test_data, epochs=1)


# -- saved model --------------------------------------------------------------------------------


def test_model_file_gives_trained_outputs(tmp_path, train_data, test_data):
    result = run_tiny(tmp_path / "run", train_data, test_data)
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    trained = CifarResNet(depth=8, num_classes=3, input_size=(16, 16))
    trained.load_state_dict(last["model"])

    loaded = load_resnet(result.model_path)

    inputs = trained.preprocess(test_data.images)
    with torch.no_grad():
        expected = trained.eval()(inputs)
        actual = loaded.model(loaded.model.preprocess(test_data.images))
    assert loaded.format == "blockdrop"
    assert loaded.arch == "cifar_resnet8"
    assert loaded.model.normalization == IMAGENET_NORMALIZATION
    assert torch.equal(actual, expected)
    assert loaded.extra["test_accuracy"] == result.final_accuracy
    assert loaded.extra["classes"] == ["class0", "class1", "class2"]


def test_best_model_file_has_best_accuracy(tmp_path, train_data, test_data):
    result = run_tiny(tmp_path / "run", train_data, test_data)

    best = load_resnet(result.best_model_path)

    assert best.extra["epoch"] == result.best_epoch
    assert best.extra["test_accuracy"] == result.best_accuracy
    assert result.best_accuracy == max(row["test/accuracy"] for row in read_rows(tmp_path / "run"))


# -- schedule and data helpers ------------------------------------------------------------------


def test_schedule_warms_up_linearly_then_decays_to_zero():
    schedule = WarmupCosine(total_steps=10, warmup_steps=4)

    assert [schedule(step) for step in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert schedule(4) == 1.0
    assert schedule(7) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert schedule(10) == pytest.approx(0.0)


def test_schedule_without_warmup_starts_at_peak():
    assert WarmupCosine(total_steps=5, warmup_steps=0)(0) == 1.0


def test_pretrain_rejects_batch_larger_than_training_set(tmp_path, train_data, test_data):
    with pytest.raises(ConfigError, match="`batch_size` 64 exceeds the 48 training images"):
        run_tiny(tmp_path / "run", train_data, test_data, batch_size=64)


def test_pretrain_rejects_missing_data_dir(tmp_path):
    with pytest.raises(ConfigError, match="`data_dir` is missing"):
        pretrain(tiny_config(), tmp_path / "run", progress=False)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"epochs": -1}, "`epochs` must be a positive integer, got -1"),
        ({"epochs": 0}, "`epochs` must be a positive integer, got 0"),
        ({"batch_size": 1}, "`batch_size` must be an integer >= 2, got 1"),
        ({"lr": 0.0}, "`lr` must be > 0, got 0.0"),
        ({"lr": -0.1}, "`lr` must be > 0, got -0.1"),
        ({"weight_decay": -1e-4}, "`weight_decay` must be >= 0"),
        ({"warmup_epochs": 3.0}, "`warmup_epochs` must be between 0 and `epochs` \\(2\\), got 3.0"),
        ({"label_smoothing": 1.0}, "`label_smoothing` must be in \\[0, 1\\)"),
        ({"max_train_images": 0}, "`max_train_images` must be a positive integer or None, got 0"),
        ({"arch": "cifar_resnet9"}, "`depth` must be 6n\\+2"),
        ({"arch": "vgg16"}, "`arch` must be cifar_resnet<depth>"),
        ({"init": "/nonexistent/model.pt"}, "`init` checkpoint /nonexistent/model.pt not found"),
        ({"normalization": "mnist"}, "`normalization` must be one of"),
        ({"device": "tpu"}, "`device` must be cpu, cuda or cuda:N, got 'tpu'"),
        ({"precision": "float16"}, "`precision` must be one of \\('float32', 'bfloat16'\\), got 'float16'"),
    ],
)
def test_config_rejects_invalid_value(overrides, match):
    with pytest.raises(ConfigError, match=match):
        tiny_config(**overrides)


# -- command line -------------------------------------------------------------------------------


@pytest.fixture()
def registered() -> None:
    from agents.cli import cli

    if "pretrain" not in cli.commands:
        cli.add_command(pretrain_command)


def test_cli_pretrain_trains_and_prints_summary(registered, tmp_path, image_folder, capsys):
    run_dir = tmp_path / "run"
    args = ["pretrain", "--data-dir", str(image_folder), "--run-dir", str(run_dir), "--arch", "cifar_resnet8"]
    status, out, err = run_cli(args + ["--epochs", "1", "--batch-size", "4", "--quiet"], capsys)

    assert status == 0, err
    assert "test accuracy" in out
    assert f"model           {run_dir / 'model.pt'}" in out
    assert load_resnet(run_dir / "model.pt").model.num_classes == 3


def test_cli_pretrain_with_init_prints_accuracy_before(registered, tmp_path, image_folder, capsys):
    checkpoint = tmp_path / "init.pt"
    save_resnet(CifarResNet(depth=8, num_classes=3), checkpoint)
    args = ["pretrain", "--init", str(checkpoint), "--data-dir", str(image_folder), "--run-dir", str(tmp_path / "run")]
    status, out, err = run_cli(args + ["--epochs", "1", "--batch-size", "4", "--quiet"], capsys)

    assert status == 0, err
    assert "before training (epoch 0)" in out
    assert "after epoch 1" in out


def test_cli_resume_takes_saved_options(registered, tmp_path, image_folder, capsys):
    run_dir = tmp_path / "run"
    args = ["pretrain", "--data-dir", str(image_folder), "--run-dir", str(run_dir), "--arch", "cifar_resnet8"]
    run_cli(args + ["--epochs", "1", "--batch-size", "4", "--lr", "0.02", "--quiet"], capsys)

    status, out, err = run_cli(["pretrain", "--run-dir", str(run_dir), "--resume", "--quiet"], capsys)

    assert status == 0, err
    assert "after epoch 1" in out


def test_cli_resume_rejects_changed_option(registered, tmp_path, image_folder, capsys):
    run_dir = tmp_path / "run"
    args = ["pretrain", "--data-dir", str(image_folder), "--run-dir", str(run_dir), "--arch", "cifar_resnet8"]
    run_cli(args + ["--epochs", "1", "--batch-size", "4", "--quiet"], capsys)

    status, _, err = run_cli(["pretrain", "--run-dir", str(run_dir), "--resume", "--epochs", "3"], capsys)

    assert status == 2
    assert "epochs: 1 in the run, 3 now" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--epochs", "-2"], "`epochs` must be a positive integer, got -2"),
        (["--lr", "0"], "`lr` must be > 0, got 0.0"),
        (["--lr", "-1"], "`lr` must be > 0, got -1.0"),
        (["--batch-size", "1"], "`batch_size` must be an integer >= 2, got 1"),
        (["--init", "missing.pt"], "`init` checkpoint missing.pt not found"),
        (["--arch", "resnet7"], "`arch` must be cifar_resnet<depth>"),
        (["--resume"], "`--resume` given but .*last.pt not found"),
        (["--max-train-images", "0"], "'--max-train-images': must be a positive integer, got 0"),
        (["--warmup-epochs", "20"], "`warmup_epochs` must be between 0 and `epochs`"),
        (["--device", "tpu"], "'--device'"),
    ],
)
def test_cli_pretrain_rejects_bad_option(registered, tmp_path, image_folder, capsys, extra, match):
    args = ["pretrain", "--data-dir", str(image_folder), "--run-dir", str(tmp_path / "run")]
    status, out, err = run_cli(args + extra, capsys)

    assert status == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("Error: ")
    assert re.search(match, err), err


def test_stochastic_depth_policy_follows_linear_decay():
    from agents.pretrain import stochastic_depth_policy

    generator = torch.Generator().manual_seed(0)
    policy = stochastic_depth_policy(20000, 4, 0.5, generator)
    keep_rates = policy.double().mean(dim=0)
    for rate, expected in zip(keep_rates.tolist(), [0.875, 0.75, 0.625, 0.5]):
        assert rate == pytest.approx(expected, abs=0.015)


def test_stochastic_depth_trains_with_sampled_policies(tmp_path, train_data, test_data, monkeypatch):
    from blockdrop_env.resnet import BlockDropResNet

    calls: list[tuple[float, str]] = []
    original = BlockDropResNet.forward

    def recording_forward(self, x, policy=None, mode="sparse"):
        if self.training:
            calls.append((float(policy.double().mean()) if policy is not None else 1.0, mode))
        return original(self, x, policy, mode)

    monkeypatch.setattr(BlockDropResNet, "forward", recording_forward)
    result = run_tiny(tmp_path / "run", train_data, test_data, stochastic_depth=0.5)

    assert calls
    assert all(mode == "sparse" for _, mode in calls)
    mean_keep = sum(rate for rate, _ in calls) / len(calls)
    # Survival falls linearly from 1 - 1/(2K) to 0.5 over K = 3 blocks: mean (5/6 + 4/6 + 3/6) / 3.
    assert mean_keep == pytest.approx(2 / 3, abs=0.1)
    assert result.final_accuracy is not None


def test_config_rejects_stochastic_depth_out_of_range():
    with pytest.raises(ConfigError, match="`stochastic_depth` must be a survival probability in \\(0, 1\\], got 0"):
        PretrainConfig(dataset="shapes", stochastic_depth=0.0)


# -- --agent: the ResNet trained for a frozen policy's blocks ---------------------------------


def save_fixed_agent(path: Path, train_data: ImageDataset, keep: list[bool], num_classes: int = 3) -> Path:
    """Save an agent checkpoint whose policy keeps the blocks in ``keep`` for every image."""
    from agents.agent_checkpoint import agent_state
    from agents.reinforce import build_policy

    torch.manual_seed(0)
    model = CifarResNet(depth=8, num_classes=num_classes, input_size=(16, 16)).eval()
    policy = build_policy(model.num_blocks, train_data, None)
    with torch.no_grad():
        policy.logits.weight.zero_()
        policy.logits.bias.copy_(torch.tensor([8.0 if kept else -8.0 for kept in keep]))
    state = agent_state(policy, model, num_controlled=model.num_blocks, epoch=4, metrics={})
    torch.save(state, path)
    return path


def test_agent_trains_for_policy_blocks(tmp_path, train_data, test_data, monkeypatch):
    from agents.agent_checkpoint import agent_policy_fn, load_agent
    from blockdrop_env.resnet import BlockDropResNet

    source = save_fixed_agent(tmp_path / "agent.pt", train_data, [True, False, True])
    calls: list[tuple[torch.Tensor, str]] = []
    original = BlockDropResNet.forward

    def recording_forward(self, x, policy=None, mode="sparse"):
        if self.training:
            calls.append((policy.clone(), mode))
        return original(self, x, policy, mode)

    monkeypatch.setattr(BlockDropResNet, "forward", recording_forward)
    result = run_tiny(tmp_path / "run", train_data, test_data, agent=str(source), epochs=3)
    monkeypatch.setattr(BlockDropResNet, "forward", original)

    assert calls
    assert all(mode == "sparse" for _, mode in calls)
    assert all(policy.tolist() == [[True, False, True]] * policy.shape[0] for policy, _ in calls)
    rows = read_rows(tmp_path / "run")
    assert [row["epoch"] for row in rows] == [0, 1, 2, 3]
    assert all(row["test/blocks_mean"] == 2.0 for row in rows)
    assert result.final_accuracy >= 0.9
    assert result.final_accuracy > result.initial_accuracy + 0.3

    policy, loaded, info = load_agent(result.agent_path)
    source_policy, source_model, _ = load_agent(source)
    for key, value in source_policy.state_dict().items():
        assert torch.equal(policy.state_dict()[key], value), key
    assert not torch.equal(loaded.model.linear.weight, source_model.model.linear.weight)
    assert info.epoch == 4
    assert info.metrics["test/accuracy"] == result.final_accuracy
    reloaded = evaluate_policy(loaded.model, test_data, agent_policy_fn(policy, info.num_controlled))
    assert reloaded.accuracy == result.final_accuracy
    assert (tmp_path / "run" / "best_agent.pt").is_file()


def test_agent_resume_matches_whole_run(tmp_path, train_data, test_data):
    source = str(save_fixed_agent(tmp_path / "agent.pt", train_data, [True, True, False]))
    run_tiny(tmp_path / "whole", train_data, test_data, agent=source)
    with pytest.raises(Interrupted):
        pretrain(
            tiny_config(agent=source),
            tmp_path / "split",
            train_data=train_data,
            test_data=test_data,
            progress=False,
            on_epoch_end=stop_after_epoch_1,
        )
    pretrain(tiny_config(agent=source), tmp_path / "split", train_data=train_data, test_data=test_data, resume=True)

    whole = torch.load(tmp_path / "whole" / "agent.pt", weights_only=True)
    split = torch.load(tmp_path / "split" / "agent.pt", weights_only=True)
    for key, value in whole["resnet"]["state_dict"].items():
        assert torch.equal(value, split["resnet"]["state_dict"][key]), key
    assert whole["metrics"] == split["metrics"]


def test_agent_resume_rejects_changed_file(tmp_path, train_data, test_data):
    source = save_fixed_agent(tmp_path / "agent.pt", train_data, [True, True, False])
    with pytest.raises(Interrupted):
        pretrain(
            tiny_config(agent=str(source)),
            tmp_path / "run",
            train_data=train_data,
            test_data=test_data,
            progress=False,
            on_epoch_end=stop_after_epoch_1,
        )
    save_fixed_agent(source, train_data, [False, True, True])

    with pytest.raises(CheckpointError, match="differs from the one this run started with"):
        pretrain(tiny_config(agent=str(source)), tmp_path / "run", train_data=train_data, test_data=test_data, resume=True)


def test_agent_resume_error_suggests_agent(tmp_path, train_data, test_data):
    source = str(save_fixed_agent(tmp_path / "agent.pt", train_data, [True, True, False]))
    run_tiny(tmp_path / "run", train_data, test_data, agent=source)

    with pytest.raises(ConfigError, match=f"start a new run with --agent {tmp_path / 'run' / 'agent.pt'}"):
        pretrain(tiny_config(agent=source, lr=0.2), tmp_path / "run", train_data=train_data, test_data=test_data, resume=True)


def test_agent_rejects_other_class_count(tmp_path, train_data, test_data):
    source = save_fixed_agent(tmp_path / "agent.pt", train_data, [True, True, True], num_classes=5)
    with pytest.raises(ConfigError, match="has a 5-class ResNet but the dataset colours-0 has 3 classes"):
        run_tiny(tmp_path / "run", train_data, test_data, agent=str(source))


def test_agent_rejects_plain_resnet(tmp_path, train_data, test_data):
    checkpoint = tmp_path / "resnet.pt"
    save_resnet(CifarResNet(depth=8, num_classes=3), checkpoint)
    with pytest.raises(CheckpointError, match="is not an agent checkpoint .*use --init instead"):
        run_tiny(tmp_path / "run", train_data, test_data, agent=str(checkpoint))
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"init": "{agent}"}, "`agent` .* and `init` .* both name the network to train; pass only --agent"),
        ({"stochastic_depth": 0.5}, "`stochastic_depth` must be 1 with `agent`, got 0.5"),
        ({"agent": "/nonexistent/agent.pt"}, "`agent` /nonexistent/agent.pt not found"),
    ],
)
def test_config_rejects_agent_conflicts(tmp_path, train_data, overrides, match):
    source = str(save_fixed_agent(tmp_path / "agent.pt", train_data, [True, True, True]))
    settings: dict[str, object] = {"agent": source}
    for key, value in overrides.items():
        settings[key] = value.format(agent=source) if isinstance(value, str) else value

    with pytest.raises(ConfigError, match=match):
        tiny_config(**settings)


def test_cli_pretrain_agent_prints_file(registered, tmp_path, capsys):
    data = make_colour_dataset(12, seed=2)
    from tests.conftest import write_image_folder

    folder = write_image_folder(tmp_path / "images", size=16)
    source = save_fixed_agent(tmp_path / "agent.pt", data, [True, False, True])
    run_dir = tmp_path / "run"
    args = ["pretrain", "--agent", str(source), "--data-dir", str(folder), "--run-dir", str(run_dir)]
    status, out, err = run_cli(args + ["--epochs", "1", "--batch-size", "4", "--quiet"], capsys)

    assert status == 0, err
    assert f"agent           {run_dir / 'agent.pt'}" in out
    assert "before training (epoch 0)" in out
