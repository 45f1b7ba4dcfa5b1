"""Tests for agents/finetune.py: joint training of the policy network and the ResNet."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from agents.agent_checkpoint import load_agent
from agents.finetune import FinetuneConfig, JointFinetuner, fill_from_source
from agents.reinforce import CurriculumTrainer, TrainConfig
from blockdrop_env.data import ImageDataset
from blockdrop_env.errors import ConfigError
from blockdrop_env.resnet import CifarResNet


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: faster for these tiny networks on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_dataset(count: int, seed: int) -> ImageDataset:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, 3, 16, 16), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 3, (count,), generator=generator)
    return ImageDataset(images, labels, ["a", "b", "c"], "random")


@pytest.fixture()
def source_run(tmp_path):
    torch.manual_seed(0)
    model = CifarResNet(depth=8, num_classes=3, input_size=(16, 16)).eval()
    config = TrainConfig(
        resnet="in-memory", dataset="imagefolder", data_dir="data", run_dir=str(tmp_path / "train"),
        epochs=1, batch_size=16, penalty=3.0, epochs_per_stage=0,
    )
    CurriculumTrainer(config, model, random_dataset(32, 0), random_dataset(16, 1)).fit()
    return tmp_path / "train"


def finetuner(config: FinetuneConfig) -> JointFinetuner:
    policy, loaded, _ = load_agent(config.from_run)
    return JointFinetuner(config, policy, loaded.model, random_dataset(32, 0), random_dataset(16, 1))


def test_fill_from_source_copies_penalty_and_data(source_run, tmp_path):
    config = fill_from_source(FinetuneConfig(from_run=str(source_run), run_dir=str(tmp_path / "ft")))
    assert config.penalty == 3.0
    assert config.dataset == "imagefolder"
    assert config.data_dir == "data"


def test_fill_from_source_accepts_checkpoint_file(source_run, tmp_path):
    checkpoint = next(source_run.glob("*.pt"))
    config = fill_from_source(FinetuneConfig(from_run=str(checkpoint), run_dir=str(tmp_path / "ft")))
    assert config.penalty == 3.0
    assert config.data_dir == "data"


def test_fill_from_source_rejects_file_outside_run(tmp_path):
    stray = tmp_path / "agent.pt"
    stray.write_bytes(b"not a run")
    with pytest.raises(ConfigError, match="is not inside a `blockdrop train` run directory"):
        fill_from_source(FinetuneConfig(from_run=str(stray), run_dir=str(tmp_path / "ft")))


def test_fill_from_source_requires_penalty(source_run, tmp_path):
    refine = tmp_path / "refine"
    refine.mkdir()
    (refine / "config.json").write_text('{"agent": "train/last.pt", "dataset": "imagefolder"}')
    (refine / "agent.pt").write_bytes((source_run / "last.pt").read_bytes())

    with pytest.raises(ConfigError, match="penalty is missing: --penalty is not given .* has none; pass --penalty"):
        fill_from_source(FinetuneConfig(from_run=str(refine), run_dir=str(tmp_path / "ft")))
    filled = fill_from_source(FinetuneConfig(from_run=str(refine), run_dir=str(tmp_path / "ft"), penalty=2.0))
    assert filled.penalty == 2.0


def test_fill_from_source_rejects_missing_run(tmp_path):
    with pytest.raises(ConfigError, match="does not exist; pass the run directory"):
        fill_from_source(FinetuneConfig(from_run=str(tmp_path / "none"), run_dir=str(tmp_path / "ft")))


def test_finetune_trains_resnet_and_logs_cross_entropy(source_run, tmp_path):
    config = fill_from_source(FinetuneConfig(from_run=str(source_run), run_dir=str(tmp_path / "ft"), epochs=1, batch_size=16))
    _, before, _ = load_agent(source_run)
    rows = finetuner(config).fit()

    _, after, info = load_agent(tmp_path / "ft" / "last.pt")
    changed = [
        name for name, value in after.model.state_dict().items()
        if value.is_floating_point() and not torch.equal(value, before.model.state_dict()[name])
    ]
    assert "layer1.0.conv1.weight" in changed
    assert "loss/cross_entropy" in rows[0]
    assert rows[0]["curriculum/num_controlled"] == 3
    assert info.num_controlled == 3


def test_finetune_resume_matches_uninterrupted_run(source_run, tmp_path):
    config = fill_from_source(FinetuneConfig(from_run=str(source_run), run_dir=str(tmp_path / "full"), epochs=2, batch_size=16))
    full = finetuner(config).fit()

    first = replace(config, run_dir=str(tmp_path / "split"), epochs=1)
    finetuner(first).fit()
    policy, _, _ = load_agent(source_run)
    _, resumed_resnet, _ = load_agent(tmp_path / "split" / "last.pt")
    resumed = JointFinetuner(
        replace(first, epochs=2), policy, resumed_resnet.model, random_dataset(32, 0), random_dataset(16, 1)
    ).fit(resume=True)

    strip = lambda rows: [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows]  # noqa: E731
    assert strip(resumed) == strip(full)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("lr_resnet", 0.0, r"lr_resnet \(--lr-resnet\) must be > 0"),
        ("lr_policy", -1.0, r"lr_policy \(--lr-policy\) must be > 0"),
        ("from_run", "", r"from_run \(--from\) is missing"),
        ("alpha", 0.2, r"alpha \(--alpha\) must be in \(0.5, 1\]"),
    ],
)
def test_config_rejects_invalid_value(field, value, message):
    values = {"from_run": "train", "run_dir": "ft", field: value}
    with pytest.raises(ConfigError, match=message):
        FinetuneConfig(**values)
