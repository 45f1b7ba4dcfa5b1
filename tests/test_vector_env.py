"""Tests for blockdrop_env.vector_env."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gymnasium import spaces
from gymnasium.error import ResetNeeded
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import batch_space

from blockdrop_env.data import ImageDataset
from blockdrop_env.env import BlockDropEnv
from blockdrop_env.errors import ConfigError
from blockdrop_env.resnet import CifarResNet
from blockdrop_env.vector_env import BlockDropVectorEnv

IMAGE_SIZE = (16, 16)
K = 3
N = 8


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    # Tiny networks gain nothing from threads, and two threads slow down badly on a busy 2-core CPU.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_model(seed: int = 0) -> CifarResNet:
    """Tiny ResNet whose BatchNorm statistics come from random images, so predictions vary."""
    torch.manual_seed(seed)
    model = CifarResNet(depth=8, num_classes=3, input_size=IMAGE_SIZE)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None
    model.train()
    with torch.no_grad():
        images = torch.randint(0, 256, (64, 3, *IMAGE_SIZE), dtype=torch.uint8)
        model(model.preprocess(images), mode="full")
    return model.eval()


def make_dataset(size: int = 20, seed: int = 1) -> ImageDataset:
    # A random colour per image plus noise, so the tiny network's predictions differ by image.
    generator = torch.Generator().manual_seed(seed)
    colours = torch.randint(0, 256, (size, 3, 1, 1), generator=generator)
    noise = torch.randint(-40, 41, (size, 3, *IMAGE_SIZE), generator=generator)
    images = (colours + noise).clamp(0, 255).to(torch.uint8)
    labels = torch.randint(0, 3, (size,), generator=generator)
    return ImageDataset(images, labels, ["a", "b", "c"], "random")


def make_envs(num_envs: int = N, **kwargs) -> BlockDropVectorEnv:
    return BlockDropVectorEnv(make_model(), make_dataset(), num_envs, **kwargs)


def random_actions(rng: np.random.Generator, num_envs: int = N) -> np.ndarray:
    return rng.integers(0, 2, (num_envs, K)).astype(np.float32)


def rollout(envs: BlockDropVectorEnv, seed: int, steps: int) -> list[tuple]:
    rng = np.random.default_rng(5)
    obs, infos = envs.reset(seed=seed)
    history = [(obs, None, infos)]
    for _ in range(steps):
        obs, rewards, _, _, infos = envs.step(random_actions(rng))
        history.append((obs, rewards, infos))
    return history


def assert_infos_equal(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for key in first:
        if isinstance(first[key], dict):
            assert_infos_equal(first[key], second[key])
        elif key == "final_obs":
            for a, b in zip(first[key], second[key]):
                np.testing.assert_array_equal(a, b)
        else:
            np.testing.assert_array_equal(first[key], second[key])


# -- spaces and metadata ---------------------------------------------------------------------------


def test_spaces_are_batched():
    envs = make_envs()
    assert envs.single_observation_space == spaces.Box(0, 255, (3, *IMAGE_SIZE), np.uint8)
    assert envs.observation_space.shape == (N, 3, *IMAGE_SIZE)
    assert envs.single_action_space == spaces.MultiBinary(K)
    # Gymnasium 1.x batches MultiBinary(K) into Box(0, 1, (N, K), int8).
    assert envs.action_space == batch_space(spaces.MultiBinary(K), N)
    assert envs.action_space.shape == (N, K)
    assert envs.metadata["autoreset_mode"] == AutoresetMode.SAME_STEP


def test_reset_returns_batch_in_observation_space():
    envs = make_envs()
    obs, infos = envs.reset(seed=0)
    assert envs.observation_space.contains(obs)
    np.testing.assert_array_equal(obs, envs.dataset.images[infos["index"]].numpy())
    np.testing.assert_array_equal(infos["label"], envs.dataset.labels[infos["index"]].numpy())
    assert infos["_label"].all()


def test_read_only_views_describe_model_and_batch():
    envs = make_envs()
    obs, infos = envs.reset(seed=0)
    assert envs.num_blocks == K
    assert envs.block_names == ["layer1.0", "layer2.0", "layer3.0"]
    np.testing.assert_array_equal(envs.current_indices, infos["index"])
    np.testing.assert_array_equal(envs.current_labels.numpy(), infos["label"])
    assert envs.current_images.dtype == torch.uint8


def test_observations_share_memory_with_current_images():
    envs = make_envs()
    obs, _ = envs.reset(seed=0)
    assert np.shares_memory(obs, envs.current_images.numpy())


# -- stepping -----------------------------------------------------------------------------------


def test_step_accepts_sampled_actions():
    envs = make_envs()
    envs.action_space.seed(0)
    envs.reset(seed=0)
    rewards = envs.step(envs.action_space.sample())[1]
    assert rewards.shape == (N,)


def test_step_autoresets_in_same_step():
    envs = make_envs()
    obs, infos = envs.reset(seed=0)
    actions = random_actions(np.random.default_rng(0))
    next_obs, rewards, terminations, truncations, next_infos = envs.step(actions)
    assert terminations.all()
    assert not truncations.any()
    assert rewards.shape == (N,)
    final = next_infos["final_info"]
    np.testing.assert_array_equal(final["index"], infos["index"])
    np.testing.assert_array_equal(final["label"], infos["label"])
    np.testing.assert_array_equal(final["policy"], actions.astype(np.int8))
    assert final["_correct"].all()
    assert next_infos["_final_info"].all()
    for old, final_obs in zip(obs, next_infos["final_obs"]):
        np.testing.assert_array_equal(old, final_obs)
    np.testing.assert_array_equal(next_obs, envs.dataset.images[next_infos["index"]].numpy())


def test_same_seed_gives_same_rollout():
    first = rollout(make_envs(augment=True), seed=3, steps=5)
    second = rollout(make_envs(augment=True), seed=3, steps=5)
    for (obs_a, rewards_a, infos_a), (obs_b, rewards_b, infos_b) in zip(first, second):
        np.testing.assert_array_equal(obs_a, obs_b)
        np.testing.assert_array_equal(rewards_a, rewards_b)
        assert_infos_equal(infos_a, infos_b)


def test_different_seeds_give_different_batches():
    first = rollout(make_envs(), seed=1, steps=0)[0][2]["index"]
    second = rollout(make_envs(), seed=2, steps=0)[0][2]["index"]
    assert not np.array_equal(first, second)


def test_sparse_batch_matches_single_env():
    envs = make_envs()
    single = BlockDropEnv(envs.model, envs.dataset)
    _, infos = envs.reset(seed=0)
    actions = random_actions(np.random.default_rng(1))
    _, rewards, _, _, next_infos = envs.step(actions)
    final = next_infos["final_info"]
    assert len(set(final["prediction"].tolist())) > 1
    for i, index in enumerate(infos["index"]):
        single.reset(options={"index": int(index)})
        _, reward, _, _, info = single.step(actions[i])
        assert info["prediction"] == final["prediction"][i]
        assert reward == pytest.approx(rewards[i])
        assert info["flops"] == final["flops"][i]
        np.testing.assert_array_equal(info["policy"], final["policy"][i])


def test_curriculum_forces_leading_blocks_on():
    envs = make_envs(num_controlled=1)
    envs.reset(seed=0)
    final = envs.step(np.zeros((N, K)))[4]["final_info"]
    np.testing.assert_array_equal(final["policy"], np.tile([1, 1, 0], (N, 1)))
    envs.reset(options={"num_controlled": 2})
    final = envs.step(np.zeros((N, K)))[4]["final_info"]
    np.testing.assert_array_equal(final["policy"], np.tile([1, 0, 0], (N, 1)))


def test_score_actions_matches_step_and_does_not_advance():
    scored, plain = make_envs(augment=True), make_envs(augment=True)
    scored.reset(seed=4)
    plain.reset(seed=4)
    actions = random_actions(np.random.default_rng(2))
    scores = scored.score_actions(actions)
    scored.score_actions(np.ones((N, K)))
    step_scored = scored.step(actions)
    step_plain = plain.step(actions)
    np.testing.assert_allclose(scores.rewards.numpy(), step_scored[1])
    np.testing.assert_array_equal(scores.predictions.numpy(), step_scored[4]["final_info"]["prediction"])
    np.testing.assert_array_equal(step_scored[0], step_plain[0])
    np.testing.assert_array_equal(step_scored[1], step_plain[1])


def test_sequential_sampling_wraps_around():
    envs = BlockDropVectorEnv(make_model(), make_dataset(size=10), 4, sampling="sequential")
    _, infos = envs.reset(seed=0)
    seen = [infos["index"]]
    for _ in range(2):
        seen.append(envs.step(np.ones((4, K)))[4]["index"])
    np.testing.assert_array_equal(np.concatenate(seen), [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1])


# -- evaluation ---------------------------------------------------------------------------------


def test_evaluate_covers_each_image_once_in_order():
    envs = make_envs(num_envs=8)
    calls = []

    def keep_all(images: torch.Tensor) -> np.ndarray:
        calls.append(images.shape[0])
        return np.ones((images.shape[0], K))

    result = envs.evaluate(keep_all)
    assert calls == [8, 8, 4]
    assert result.scores.rewards.shape == (20,)
    np.testing.assert_array_equal(result.labels.numpy(), envs.dataset.labels.numpy())
    assert result.mean_blocks_used == K


def test_evaluate_matches_stepping_through_sequential_batches():
    envs = BlockDropVectorEnv(make_model(), make_dataset(size=8), 4, sampling="sequential")
    result = envs.evaluate(lambda images: np.tile([1, 0, 1], (images.shape[0], 1)), batch_size=3)
    envs.reset(seed=0)
    rewards = [envs.step(np.tile([1, 0, 1], (4, 1)))[1] for _ in range(2)]
    np.testing.assert_allclose(result.scores.rewards.numpy(), np.concatenate(rewards))
    assert result.accuracy == pytest.approx(float(result.scores.correct.float().mean()))


def test_evaluate_leaves_current_batch_untouched():
    envs = make_envs()
    obs, _ = envs.reset(seed=0)
    envs.evaluate(lambda images: np.ones((images.shape[0], K)))
    np.testing.assert_array_equal(envs.current_images.numpy(), obs)


# -- invalid input ------------------------------------------------------------------------------


def test_step_rejects_wrong_action_shape():
    envs = make_envs()
    envs.reset(seed=0)
    with pytest.raises(ConfigError, match=r"`actions` must have shape \(8, 3\), got \(3,\)"):
        envs.step(np.ones(K))


def test_step_rejects_fractional_actions():
    envs = make_envs()
    envs.reset(seed=0)
    with pytest.raises(ConfigError, match="entries must be 0 or 1, got 0.5"):
        envs.step(np.full((N, K), 0.5))


def test_step_before_reset_raises():
    with pytest.raises(ResetNeeded, match="call `envs.reset\\(\\)` first"):
        make_envs().step(np.ones((N, K)))


def test_reset_rejects_list_of_seeds():
    with pytest.raises(ConfigError, match="`seed` must be an int or None"):
        make_envs().reset(seed=[1, 2])


def test_zero_num_envs_is_rejected():
    with pytest.raises(ConfigError, match="`num_envs` must be a positive integer, got 0"):
        make_envs(num_envs=0)


def test_curriculum_out_of_range_is_rejected():
    envs = make_envs()
    with pytest.raises(ConfigError, match=r"in 1\.\.3 .*got 0"):
        envs.set_curriculum(0)


def test_evaluate_rejects_bad_policy_output():
    envs = make_envs()
    with pytest.raises(ConfigError, match=r"`policy_fn\(images\)` must have shape"):
        envs.evaluate(lambda images: np.ones(K))


def test_unknown_sampling_is_rejected():
    with pytest.raises(ConfigError, match="`sampling` must be one of"):
        make_envs(sampling="stratified")
