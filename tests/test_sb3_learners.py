"""Tests for agents/sb3_learners.py: algorithm resolution by name and budgeted training."""

from __future__ import annotations

import pytest
import torch
from stable_baselines3 import A2C, PPO

from agents.sb3_learners import SB3Learner, resolve_sb3_algorithm, sb3_algorithm_names, supports_multibinary
from blockdrop_env.errors import ConfigError
from tests.test_compare import constructed_problem, red_green_images


@pytest.mark.parametrize(("name", "expected"), [("PPO", PPO), ("ppo", PPO), ("A2C", A2C), ("a2c", A2C)])
def test_resolve_finds_multibinary_algorithms(name, expected):
    assert resolve_sb3_algorithm(name) is expected


@pytest.mark.parametrize("name", ["SAC", "DQN", "td3"])
def test_resolve_rejects_algorithm_without_multibinary(name):
    with pytest.raises(ConfigError, match=f"{name.upper()} does not support MultiBinary actions.*use one of \\['A2C', 'PPO'\\]"):
        resolve_sb3_algorithm(name)


def test_resolve_rejects_unknown_name():
    with pytest.raises(ConfigError, match=r"unknown Stable-Baselines3 algorithm 'TRPO'; stable_baselines3 .* has \['A2C'"):
        resolve_sb3_algorithm("TRPO")


def test_algorithm_names_exclude_helpers():
    names = sb3_algorithm_names()
    assert {"A2C", "PPO", "SAC", "DQN"} <= set(names)
    assert "HerReplayBuffer" not in names


def test_supports_multibinary_tells_ppo_from_sac():
    from stable_baselines3 import SAC

    assert supports_multibinary(PPO)
    assert not supports_multibinary(SAC)


@pytest.mark.parametrize(("algorithm", "budget", "expected_seen"), [("ppo", 100, 96), ("a2c", 300, 256), ("ppo", 20, 20)])
def test_learner_stays_within_budget(algorithm, budget, expected_seen):
    learner = SB3Learner(algorithm=algorithm, n_steps=4)
    policy_fn = learner.fit(constructed_problem(num_images=128), budget, seed=0)
    assert learner.images_seen == expected_seen
    policy = policy_fn(red_green_images(5, seed=1).images)
    assert policy.dtype == torch.bool
    assert policy.shape == (5, 3)


def test_ppo_learner_learns_constructed_case():
    problem = constructed_problem()
    test_data = red_green_images(64, seed=1)
    policy = SB3Learner(algorithm="ppo").fit(problem, 512, seed=0)(test_data.images)
    assert policy[:, 2].all()
    assert policy.sum(dim=1).double().mean() < 1.5


def test_learner_is_deterministic_by_seed():
    images = red_green_images(16, seed=2).images
    first = SB3Learner(algorithm="a2c").fit(constructed_problem(num_images=64), 64, seed=3)(images)
    again = SB3Learner(algorithm="a2c").fit(constructed_problem(num_images=64), 64, seed=3)(images)
    assert torch.equal(first, again)


@pytest.mark.parametrize(("field", "value"), [("n_steps", 0), ("features_dim", -1)])
def test_learner_rejects_bad_settings(field, value):
    with pytest.raises(ConfigError, match=f"`{field}` must be a positive integer, got {value}"):
        SB3Learner(**{field: value})
