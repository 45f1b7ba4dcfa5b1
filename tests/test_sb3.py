"""Tests for blockdrop_env.sb3: the VecEnv adapter and the small-image CNN."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gymnasium import spaces
from stable_baselines3 import A2C, PPO

from blockdrop_env.data import ImageDataset
from blockdrop_env.errors import ConfigError
from blockdrop_env.resnet import CifarResNet
from blockdrop_env.sb3 import SB3VecEnvAdapter, SmallImageCNN
from blockdrop_env.vector_env import BlockDropVectorEnv

IMAGE_SIZE = (8, 8)
K = 3
N = 16


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    # Tiny networks gain nothing from threads, and two threads slow down badly on a busy 2-core CPU.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_last_block_model() -> CifarResNet:
    """ResNet-8 that predicts class 0 if and only if its last block runs.

    The last block's residual branch adds 10 to output channel 0, which its downsampling
    shortcut pads with zeros, and the head turns that channel into the class-0 logit minus 5.
    With every label 0 the best action is [0, 0, 1]: correct with one block of three.
    """
    torch.manual_seed(0)
    model = CifarResNet(depth=8, num_classes=3, input_size=IMAGE_SIZE)
    with torch.no_grad():
        last = model.layer3[0]
        last.bn2.weight.zero_()
        last.bn2.bias.zero_()
        last.bn2.bias[0] = 10.0
        model.linear.weight.zero_()
        model.linear.weight[0, 0] = 1.0
        model.linear.bias.copy_(torch.tensor([-5.0, 0.0, -1.0]))
    return model.eval()


def make_dataset(size: int = 64) -> ImageDataset:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (size, 3, *IMAGE_SIZE), dtype=torch.uint8, generator=generator)
    return ImageDataset(images, torch.zeros(size, dtype=torch.long), ["a", "b", "c"], "random")


def make_adapter(num_envs: int = N, **kwargs) -> SB3VecEnvAdapter:
    envs = BlockDropVectorEnv(make_last_block_model(), make_dataset(), num_envs, penalty=1.0, **kwargs)
    return SB3VecEnvAdapter(envs)


def mean_keep_probabilities(agent: PPO, obs: np.ndarray) -> np.ndarray:
    distribution = agent.policy.get_distribution(agent.policy.obs_to_tensor(obs)[0])
    return distribution.distribution.probs.mean(dim=0).detach().numpy()


# -- the constructed model ----------------------------------------------------------------------


def test_constructed_model_rewards_only_last_block():
    adapter = make_adapter()
    adapter.reset()
    rewards = {
        action: adapter.env.score_actions(np.tile(action, (N, 1))).rewards
        for action in ((0, 0, 1), (1, 1, 1), (1, 1, 0))
    }
    torch.testing.assert_close(rewards[(0, 0, 1)], torch.full((N,), 1 - 1 / 9))
    torch.testing.assert_close(rewards[(1, 1, 1)], torch.zeros(N))
    torch.testing.assert_close(rewards[(1, 1, 0)], torch.full((N,), -1.0))


# -- adapter ------------------------------------------------------------------------------------


def test_adapter_step_returns_sb3_layout():
    adapter = make_adapter()
    obs = adapter.reset()
    actions = np.tile(np.array([0, 0, 1], dtype=np.float32), (N, 1))
    next_obs, rewards, dones, infos = adapter.step(actions)
    assert next_obs.shape == (N, 3, *IMAGE_SIZE)
    assert rewards.dtype == np.float32
    assert dones.all()
    assert len(infos) == N
    for old, info in zip(obs, infos):
        np.testing.assert_array_equal(info["terminal_observation"], old)
        assert info["TimeLimit.truncated"] is False
        assert info["correct"] is True
        assert info["blocks_used"] == 1
    assert [info["index"] for info in adapter.reset_infos] == adapter.env.current_indices.tolist()


def test_adapter_seed_makes_reset_repeatable():
    first, second = make_adapter(), make_adapter()
    first.seed(11)
    second.seed(11)
    np.testing.assert_array_equal(first.reset(), second.reset())


def test_adapter_forwards_attributes_and_methods():
    adapter = make_adapter()
    assert adapter.get_attr("num_blocks") == [K] * N
    assert adapter.get_attr("num_controlled", indices=[0, 1]) == [K, K]
    adapter.env_method("set_curriculum", 1)
    assert adapter.env.num_controlled == 1
    adapter.set_attr("render_mode", None)
    assert adapter.env_is_wrapped(object) == [False] * N


def test_adapter_rejects_other_envs():
    with pytest.raises(ConfigError, match="`env` must be a BlockDropVectorEnv"):
        SB3VecEnvAdapter("not an env")  # type: ignore[arg-type]


# -- SmallImageCNN ------------------------------------------------------------------------------


def test_small_cnn_maps_images_to_features():
    space = spaces.Box(0, 255, (3, 32, 32), np.uint8)
    extractor = SmallImageCNN(space, features_dim=16)
    features = extractor(torch.rand(4, 3, 32, 32))
    assert features.shape == (4, 16)


def test_small_cnn_scales_uint8_input_like_sb3():
    space = spaces.Box(0, 255, (3, 8, 8), np.uint8)
    extractor = SmallImageCNN(space, features_dim=8)
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    torch.testing.assert_close(extractor(images), extractor(images.float() / 255.0))


def test_small_cnn_scale_pixels_divides_float_input():
    space = spaces.Box(0, 255, (3, 8, 8), np.uint8)
    torch.manual_seed(0)
    plain = SmallImageCNN(space, features_dim=8)
    scaling = SmallImageCNN(space, features_dim=8, scale_pixels=True)
    scaling.load_state_dict(plain.state_dict())
    images = torch.randint(0, 256, (2, 3, 8, 8)).float()
    torch.testing.assert_close(scaling(images), plain(images / 255.0))


def test_small_cnn_rejects_non_image_space():
    with pytest.raises(ConfigError, match="must be a uint8 image space"):
        SmallImageCNN(spaces.Box(0.0, 1.0, (3, 8, 8), np.float32))


def test_small_cnn_rejects_channel_last_space():
    with pytest.raises(ConfigError, match="must be channel-first"):
        SmallImageCNN(spaces.Box(0, 255, (8, 8, 3), np.uint8))


def test_small_cnn_rejects_tiny_images():
    with pytest.raises(ConfigError, match="at least 8x8, got 4x4"):
        SmallImageCNN(spaces.Box(0, 255, (3, 4, 4), np.uint8))


# -- learning -----------------------------------------------------------------------------------


def test_ppo_learns_to_keep_only_last_block():
    adapter = make_adapter()
    agent = PPO(
        "CnnPolicy",
        adapter,
        n_steps=4,
        batch_size=64,
        n_epochs=4,
        learning_rate=3e-3,
        seed=0,
        device="cpu",
        policy_kwargs=dict(
            features_extractor_class=SmallImageCNN, features_extractor_kwargs=dict(features_dim=32)
        ),
    )
    obs = adapter.reset()
    before = mean_keep_probabilities(agent, obs)
    agent.learn(768)
    after = mean_keep_probabilities(agent, obs)
    np.testing.assert_allclose(before, 0.5, atol=0.05)
    assert after[2] > 0.8, f"P(keep last block) after training: {after}"
    assert after[0] < 0.3, f"P(keep first block) after training: {after}"
    assert after[1] < 0.3, f"P(keep second block) after training: {after}"

    scores = adapter.env.score_actions(agent.predict(adapter.env.current_images.numpy(), deterministic=True)[0])
    random_policy_reward = 0.5 * 0.5 - 0.5 * 1.0  # P(last kept) * E[1 - u^2 | kept] - P(dropped) * penalty
    assert float(scores.rewards.mean()) > random_policy_reward + 0.5


def test_a2c_runs_on_adapter():
    adapter = make_adapter()
    agent = A2C(
        "CnnPolicy",
        adapter,
        n_steps=4,
        seed=0,
        device="cpu",
        policy_kwargs=dict(features_extractor_class=SmallImageCNN),
    )
    agent.learn(256)
    assert agent.num_timesteps == 256
