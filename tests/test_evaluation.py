"""Tests for agents/evaluation.py: metrics of a policy over a dataset split."""

from __future__ import annotations

import pytest
import torch

from agents.baselines import AllBlocks, FirstK, RandomDrop
from agents.evaluation import evaluate_policy
from blockdrop_env.data import ImageDataset
from blockdrop_env.errors import ConfigError
from blockdrop_env.resnet import CifarResNet


@pytest.fixture(scope="module")
def model() -> CifarResNet:
    torch.manual_seed(0)
    return CifarResNet(depth=14, num_classes=4).eval()


@pytest.fixture(scope="module")
def dataset() -> ImageDataset:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 4, (50,), generator=generator)
    return ImageDataset(images, labels, ["a", "b", "c", "d"], "random")


def test_accuracy_matches_plain_forward(model, dataset):
    result = evaluate_policy(model, dataset, AllBlocks(model.num_blocks), batch_size=16)
    with torch.no_grad():
        predictions = model(model.preprocess(dataset.images)).argmax(dim=1)
    assert result.accuracy == pytest.approx((predictions == dataset.labels).double().mean().item())
    assert result.num_images == 50
    assert result.blocks_mean == model.num_blocks
    assert result.blocks_std == 0
    assert result.flops_mean == model.flops_table.total
    assert result.unique_policies == 1


def test_first_k_reports_k_blocks_and_their_flops(model, dataset):
    result = evaluate_policy(model, dataset, FirstK(model.num_blocks, 2), batch_size=7)
    table = model.flops_table
    assert result.blocks_mean == 2
    assert result.flops_mean == table.fixed + table.blocks[0] + table.blocks[1]
    assert result.block_usage == [1.0, 1.0] + [0.0] * (model.num_blocks - 2)


def test_random_drop_records_each_policy(model, dataset):
    result, record = evaluate_policy(model, dataset, RandomDrop(model.num_blocks, 0.5, seed=2), record=True)
    assert record.policies.shape == (50, model.num_blocks)
    assert result.blocks_mean == pytest.approx(record.policies.sum(dim=1).double().mean().item())
    assert result.unique_policies == torch.unique(record.policies.to(torch.uint8), dim=0).shape[0]
    assert result.unique_policies > 1
    assert result.accuracy == pytest.approx(record.correct.double().mean().item())


def test_evaluate_rejects_class_count_mismatch(model, dataset):
    other = CifarResNet(depth=8, num_classes=10)
    with pytest.raises(ConfigError, match="the dataset has 4 classes but the model predicts 10"):
        evaluate_policy(other, dataset, AllBlocks(other.num_blocks))


def test_evaluate_rejects_zero_batch_size(model, dataset):
    with pytest.raises(ConfigError, match="`batch_size` must be a positive integer, got 0"):
        evaluate_policy(model, dataset, AllBlocks(model.num_blocks), batch_size=0)
