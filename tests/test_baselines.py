"""Tests for agents/baselines.py: static policies keep what they claim."""

from __future__ import annotations

import pytest
import torch

from agents.baselines import AllBlocks, FirstK, RandomDrop, parse_policy_spec
from blockdrop_env.errors import ConfigError

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
