"""Tests for agents/baselines.py: static policies keep what they claim."""

from __future__ import annotations

import pytest
import torch

from agents.baselines import (
    AllBlocks,
    FirstK,
    FixedPolicy,
    RandomDrop,
    best_fixed_policy,
    greedy_elimination,
    parse_policy_spec,
)
from blockdrop_env.data import ImageDataset
from blockdrop_env.errors import ConfigError
from blockdrop_env.resnet import CifarResNet
from blockdrop_env.rewards import BlockUsageReward

IMAGES = torch.zeros(500, 3, 4, 4, dtype=torch.uint8)


def test_all_blocks_keeps_everything():
    assert AllBlocks(7)(IMAGES).all()


@pytest.mark.parametrize("k", [0, 1, 4, 7])
def test_first_k_keeps_exactly_the_first_k(k):
    policy = FirstK(7, k)(IMAGES)
    assert policy[:, :k].all()
    assert not policy[:, k:].any()


def test_random_drop_keep_rate_converges_to_p():
    policy = RandomDrop(10, 0.3, seed=1)(IMAGES)
    assert policy.double().mean().item() == pytest.approx(0.3, abs=0.02)


def test_random_drop_is_seeded():
    assert torch.equal(RandomDrop(10, 0.5, seed=3)(IMAGES), RandomDrop(10, 0.5, seed=3)(IMAGES))
    assert not torch.equal(RandomDrop(10, 0.5, seed=3)(IMAGES), RandomDrop(10, 0.5, seed=4)(IMAGES))


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("all", "all"), ("first:3", "first:3"), ("random:0.25", "random:0.25"), (" first:0 ", "first:0")],
)
def test_parse_policy_spec_round_trips(spec, expected):
    assert parse_policy_spec(spec, 5).name == expected


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("some", "`policy` must be all"),
        ("first", "`policy` must be all"),
        ("all:3", "`policy` must be all"),
        ("first:x", "is not a number"),
        ("first:6", "`k` must be between 0 and the number of blocks 5, got 6"),
        ("first:-1", "`k` must be between 0"),
        ("random:1.5", r"`p` must be a keep probability in \[0, 1\], got 1.5"),
    ],
)
def test_parse_policy_spec_rejects_bad_spec(spec, match):
    with pytest.raises(ConfigError, match=match):
        parse_policy_spec(spec, 5)


# -- fixed policies and the best-fixed-policy search --------------------------------------------


def test_fixed_policy_keeps_its_blocks_on_every_image():
    policy = FixedPolicy((False, True, True, False))
    kept = policy(IMAGES)
    assert kept.shape == (500, 4)
    assert kept.dtype == torch.bool
    assert torch.equal(kept, torch.tensor([False, True, True, False]).expand(500, -1))
    assert policy.name == "fixed:0110"


def test_fixed_policy_rejects_empty_keep():
    with pytest.raises(ConfigError, match="`keep` must have one entry per residual block"):
        FixedPolicy(())


def test_best_fixed_policy_finds_known_best():
    from tests.test_compare import NEEDED_BLOCK, last_block_resnet, red_green_images

    reward = BlockUsageReward(2.0)
    best = best_fixed_policy(last_block_resnet(), red_green_images(64, seed=0), reward, max_images=32)
    assert best.keep == tuple(i == NEEDED_BLOCK for i in range(3))
    assert best.objective == pytest.approx(1.0 - (1 / 3) ** 2)
    assert best.all_blocks_objective == pytest.approx(0.0)
    assert best.num_images == 32
    assert len(best.history) == 3 * 4 // 2 + 1


def test_best_fixed_policy_no_worse_than_all_blocks():
    torch.manual_seed(0)
    model = CifarResNet(depth=8, num_classes=3, input_size=(16, 16)).eval()
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8, generator=generator)
    data = ImageDataset(images, torch.randint(0, 3, (64,), generator=generator), ["a", "b", "c"])
    reward = BlockUsageReward(10.0)
    best = best_fixed_policy(model, data, reward, max_images=None, batch_size=16)
    assert best.objective >= best.all_blocks_objective
    assert best.history[0] == ((True,) * model.num_blocks, best.all_blocks_objective)
    assert best.objective == max(value for _, value in best.history)
    assert best.num_images == 64


def test_greedy_elimination_drops_best_block_first():
    # Objective: reward for dropping block 2, penalty for dropping block 0.
    def objective(keep):
        value = -0.1 * sum(keep)
        if not keep[0]:
            value -= 5.0
        if not keep[2]:
            value += 1.0
        return value

    history = greedy_elimination(3, objective)
    path = [keep for keep, _ in history]
    assert path[0] == (True, True, True)
    assert (True, True, False) in path[1:4]
    assert path[4:6] == [(False, True, False), (True, False, False)]
    assert max(history, key=lambda item: item[1])[0] == (True, False, False)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_images": 0}, "`max_images` must be a positive integer, got 0"),
        ({"batch_size": -1}, "`batch_size` must be a positive integer, got -1"),
    ],
)
def test_best_fixed_policy_rejects_bad_arguments(kwargs, match):
    from tests.test_compare import last_block_resnet, red_green_images

    with pytest.raises(ConfigError, match=match):
        best_fixed_policy(last_block_resnet(), red_green_images(8, seed=0), BlockUsageReward(2.0), **kwargs)
