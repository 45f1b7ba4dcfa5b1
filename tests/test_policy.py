"""Tests for agents/policy.py: the policy network, its configuration and the policy helpers."""

from __future__ import annotations

import pytest
import torch

from agents.policy import (
    PolicyConfig,
    PolicyNetwork,
    controlled_mask,
    image_statistics,
    threshold_policy,
)
from blockdrop_env.data import ImageDataset
from blockdrop_env.errors import ConfigError


def random_images(count: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=generator)


def test_forward_gives_probabilities_per_block():
    torch.manual_seed(0)
    policy = PolicyNetwork(PolicyConfig(num_blocks=15))
    probs = policy(random_images(4, 32))
    assert probs.shape == (4, 15)
    assert bool(((probs > 0) & (probs < 1)).all())


def test_for_images_picks_cifar_layout_for_small_images():
    config = PolicyConfig.for_images(15, (32, 32))
    assert config.input_size == 32
    assert config.channels == (16, 32, 64)
    assert not config.imagenet_stem


def test_for_images_picks_resnet10_layout_for_large_images():
    config = PolicyConfig.for_images(33, (224, 224))
    assert config.input_size == 112
    assert config.channels == (64, 128, 256, 512)
    assert config.imagenet_stem


def test_for_images_accepts_input_size_override():
    assert PolicyConfig.for_images(5, (224, 224), input_size=64).input_size == 64


def test_preprocess_resizes_large_images():
    policy = PolicyNetwork(PolicyConfig(num_blocks=3, input_size=32))
    assert policy.preprocess(random_images(2, 96)).shape == (2, 3, 32, 32)


def test_preprocess_keeps_small_images_unresized():
    policy = PolicyNetwork(PolicyConfig(num_blocks=3, input_size=32))
    assert policy.preprocess(random_images(2, 8)).shape == (2, 3, 8, 8)


def test_preprocess_halving_equals_average_pooling():
    policy = PolicyNetwork(PolicyConfig(num_blocks=3, input_size=16, mean=(0, 0, 0), std=(1, 1, 1)))
    images = random_images(2, 32)
    expected = torch.nn.functional.avg_pool2d(images.float() / 255.0, 2)
    assert torch.allclose(policy.preprocess(images), expected, atol=1e-6)


def test_preprocess_normalises_with_config_statistics():
    policy = PolicyNetwork(PolicyConfig(num_blocks=3, mean=(0.5, 0.25, 1.0), std=(0.5, 0.25, 0.5)))
    images = torch.tensor([255, 0, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    x = policy.preprocess(images.contiguous())
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([1.0, -1.0, 0.0]))


def test_forward_handles_odd_image_sizes():
    policy = PolicyNetwork(PolicyConfig(num_blocks=4))
    assert policy(random_images(2, 30)).shape == (2, 4)


def test_imagenet_layout_runs_on_large_images():
    torch.manual_seed(0)
    policy = PolicyNetwork(PolicyConfig.for_images(33, (224, 224)))
    assert policy(random_images(1, 224)).shape == (1, 33)


def test_preprocess_rejects_float_images():
    policy = PolicyNetwork(PolicyConfig(num_blocks=3))
    with pytest.raises(ConfigError, match="`images` must be a uint8 tensor"):
        policy(torch.rand(1, 3, 32, 32))


def test_preprocess_rejects_grey_images():
    policy = PolicyNetwork(PolicyConfig(num_blocks=3))
    with pytest.raises(ConfigError, match=r"shape \(1, 1, 32, 32\)"):
        policy(torch.zeros(1, 1, 32, 32, dtype=torch.uint8))


def test_config_rejects_zero_blocks():
    with pytest.raises(ConfigError, match="`num_blocks` must be a positive integer, got 0"):
        PolicyConfig(num_blocks=0)


def test_config_rejects_zero_input_size():
    with pytest.raises(ConfigError, match="`input_size` must be a positive integer, got 0"):
        PolicyConfig(num_blocks=3, input_size=0)


def test_config_rejects_decreasing_channels():
    with pytest.raises(ConfigError, match="non-decreasing"):
        PolicyConfig(num_blocks=3, channels=(32, 16))


def test_config_rejects_empty_channels():
    with pytest.raises(ConfigError, match="`channels` must be one or more"):
        PolicyConfig(num_blocks=3, channels=())


def test_config_rejects_zero_std():
    with pytest.raises(ConfigError, match="std > 0"):
        PolicyConfig(num_blocks=3, std=(1.0, 0.0, 1.0))


def test_config_round_trips_through_dict():
    config = PolicyConfig.for_images(7, (224, 224), mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))
    data = config.to_dict()
    assert data["channels"] == [64, 128, 256, 512]
    assert PolicyConfig.from_dict(data) == config


def test_config_from_dict_rejects_unknown_field():
    with pytest.raises(ConfigError, match=r"unknown policy configuration field\(s\) \['depth'\]"):
        PolicyConfig.from_dict({"num_blocks": 3, "depth": 8})


def test_controlled_mask_marks_trailing_blocks():
    assert controlled_mask(5, 2).tolist() == [False, False, False, True, True]


@pytest.mark.parametrize("num_controlled", [0, 6])
def test_controlled_mask_rejects_out_of_range(num_controlled):
    with pytest.raises(ConfigError, match=r"`num_controlled` must be an integer in 1\.\.5"):
        controlled_mask(5, num_controlled)


def test_threshold_policy_forces_uncontrolled_blocks_on():
    probs = torch.tensor([[0.1, 0.2, 0.5, 0.49], [0.9, 0.0, 0.7, 0.51]])
    policy = threshold_policy(probs, controlled_mask(4, 2))
    assert policy.tolist() == [[True, True, True, False], [True, True, True, True]]


def test_image_statistics_match_direct_computation():
    images = random_images(20, 8)
    mean, std = image_statistics(ImageDataset(images, torch.zeros(20, dtype=torch.long), ["a"]))
    pixels = images.double() / 255.0
    assert mean == pytest.approx(pixels.mean(dim=(0, 2, 3)).tolist(), abs=1e-9)
    assert std == pytest.approx(pixels.std(dim=(0, 2, 3), unbiased=False).tolist(), abs=1e-6)


def test_image_statistics_keep_constant_channel_std_positive():
    images = torch.full((4, 3, 8, 8), 7, dtype=torch.uint8)
    _, std = image_statistics(ImageDataset(images, torch.zeros(4, dtype=torch.long), ["a"]))
    assert min(std) >= 1e-3
