"""Tests for agents/report.py: the learned-policy-versus-baselines table."""

from __future__ import annotations

import math

import pytest
import torch

from agents.baselines import FirstK
from agents.report import compare_with_baselines, spearman
from blockdrop_env.data import ImageDataset
from blockdrop_env.resnet import CifarResNet


def test_spearman_of_monotone_data_is_one():
    x = torch.tensor([0.1, 0.5, 0.2, 0.9])
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)


def test_spearman_averages_tied_ranks():
    # Pearson correlation of the average ranks [1, 2.5, 2.5, 4] and [1, 2, 3, 4].
    value = spearman(torch.tensor([1.0, 2.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert value == pytest.approx(0.9486833, abs=1e-6)


def test_spearman_of_constant_input_is_nan():
    assert math.isnan(spearman(torch.ones(5), torch.arange(5.0)))


@pytest.fixture(scope="module")
def model_and_data() -> tuple[CifarResNet, ImageDataset]:
    torch.manual_seed(0)
    model = CifarResNet(depth=14, num_classes=3).eval()
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 3, (40,), generator=generator)
    difficulty = torch.linspace(0, 1, 40)
    data = ImageDataset(images, labels, ["a", "b", "c"], "random", factors={"difficulty": difficulty})
    return model, data


def test_comparison_interpolates_first_k_between_neighbours(model_and_data):
    model, data = model_and_data

    def policy_fn(images: torch.Tensor) -> torch.Tensor:
        # Half the images keep 2 blocks and half keep 3: mean 2.5 blocks.
        policy = torch.zeros(images.shape[0], model.num_blocks, dtype=torch.bool)
        policy[:, :2] = True
        policy[::2, 2] = True
        return policy

    comparison = compare_with_baselines(model, data, policy_fn, batch_size=8)
    assert comparison.learned.blocks_mean == pytest.approx(2.5)
    assert comparison.first_k_floor.blocks_mean == 2
    assert comparison.first_k_ceil.blocks_mean == 3
    midpoint = (comparison.first_k_floor.accuracy + comparison.first_k_ceil.accuracy) / 2
    assert comparison.first_k_accuracy == pytest.approx(midpoint)
    assert comparison.all_blocks.blocks_mean == model.num_blocks


def test_comparison_reports_difficulty_correlation(model_and_data):
    model, data = model_and_data
    num_blocks = model.num_blocks

    def harder_gets_more(images: torch.Tensor) -> torch.Tensor:
        # Images arrive in dataset order, where difficulty rises; give later images more blocks.
        count = images.shape[0]
        keep = torch.linspace(1, num_blocks, count).round().long()
        return torch.arange(num_blocks)[None, :] < keep[:, None]

    comparison = compare_with_baselines(model, data, harder_gets_more, batch_size=40)
    assert comparison.difficulty_correlation is not None
    assert comparison.difficulty_correlation > 0.9
    assert "Spearman rank correlation" in comparison.format_table()


def test_comparison_without_factors_has_no_correlation(model_and_data):
    model, data = model_and_data
    plain = ImageDataset(data.images, data.labels, data.classes, "plain")
    comparison = compare_with_baselines(model, plain, FirstK(model.num_blocks, 3), batch_size=16)
    assert comparison.difficulty_correlation is None
    assert "Spearman" not in comparison.format_table()
