"""Tests for agents/bandit.py: linear Thompson sampling learns the constructed case."""

from __future__ import annotations

import pytest
import torch

from agents.bandit import LinearThompsonBandit
from agents.baselines import RandomDrop
from agents.compare import score_policy
from blockdrop_env.errors import ConfigError
from tests.test_compare import NEEDED_BLOCK, constructed_problem, red_green_images


def test_bandit_learns_constructed_case():
    problem = constructed_problem()
    test_data = red_green_images(128, seed=1)
    policy_fn = LinearThompsonBandit().fit(problem, 1024, seed=0)

    learned = score_policy(problem.model, test_data, policy_fn, problem.reward)
    random = score_policy(problem.model, test_data, RandomDrop(3, 0.5, seed=0), problem.reward)
    assert learned.reward > random.reward + 1.0
    policy = policy_fn(test_data.images)
    assert policy[:, NEEDED_BLOCK].all()
    assert not policy[:, :NEEDED_BLOCK].any()


def test_bandit_uses_whole_batches_within_budget():
    bandit = LinearThompsonBandit()
    bandit.fit(constructed_problem(), 100, seed=0)
    assert bandit.images_seen == 96


def test_bandit_is_deterministic_by_seed():
    problem = constructed_problem(num_images=128)
    images = red_green_images(64, seed=2).images
    first = LinearThompsonBandit(noise_scale=5.0).fit(problem, 64, seed=1)(images)
    again = LinearThompsonBandit(noise_scale=5.0).fit(problem, 64, seed=1)(images)
    assert torch.equal(first, again)


def test_bandit_features_are_pooled_pixels_and_bias():
    images = torch.full((2, 3, 8, 8), 255, dtype=torch.uint8)
    features = LinearThompsonBandit(pool_size=2).features(images)
    assert features.shape == (2, 13)
    assert torch.allclose(features[:, :12], torch.full((2, 12), 0.5, dtype=torch.float64))
    assert torch.equal(features[:, 12], torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pool_size": 0}, "`pool_size` must be a positive integer, got 0"),
        ({"noise_scale": 0.0}, "`noise_scale` must be a finite number > 0, got 0.0"),
        ({"prior_precision": float("inf")}, "`prior_precision` must be a finite number > 0, got inf"),
    ],
)
def test_bandit_rejects_bad_settings(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LinearThompsonBandit(**kwargs)
