"""Tests for blockdrop_env.env (the single environment) and blockdrop_env.rewards."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from gymnasium.error import ResetNeeded
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

from blockdrop_env.data import ImageDataset
from blockdrop_env.env import BlockDropEnv, random_crop_flip
from blockdrop_env.errors import ConfigError, DatasetError
from blockdrop_env.resnet import CifarResNet
from blockdrop_env.rewards import BlockUsageReward, FlopsReward

IMAGE_SIZE = (16, 16)
K = 3  # CifarResNet(depth=8) has one block per stage


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


def make_dataset(size: int = 24, seed: int = 1, num_classes: int = 3) -> ImageDataset:
    # A random colour per image plus noise, so the tiny network's predictions differ by image.
    generator = torch.Generator().manual_seed(seed)
    colours = torch.randint(0, 256, (size, 3, 1, 1), generator=generator)
    noise = torch.randint(-40, 41, (size, 3, *IMAGE_SIZE), generator=generator)
    images = (colours + noise).clamp(0, 255).to(torch.uint8)
    labels = torch.randint(0, num_classes, (size,), generator=generator)
    return ImageDataset(images, labels, [f"c{i}" for i in range(num_classes)], "random")


def make_env(**kwargs) -> BlockDropEnv:
    return BlockDropEnv(make_model(), make_dataset(), **kwargs)


def run_episodes(env: BlockDropEnv, seed: int, count: int) -> list[tuple]:
    rng = np.random.default_rng(123)
    obs, info = env.reset(seed=seed)
    history = []
    for _ in range(count):
        action = rng.integers(0, 2, K)
        _, reward, _, _, step_info = env.step(action)
        history.append((obs, info, reward, step_info))
        obs, info = env.reset()
    return history


# -- Gymnasium and Stable-Baselines3 checkers ----------------------------------------------------


def test_gymnasium_check_env_passes():
    gym_check_env(make_env(augment=True), skip_render_check=True)


def test_sb3_check_env_passes():
    with warnings.catch_warnings():
        # The checker advises a custom extractor below 36x36; SmallImageCNN is that extractor.
        warnings.filterwarnings("ignore", message="The minimal resolution")
        sb3_check_env(make_env(), warn=True)


# -- reset and step ---------------------------------------------------------------------------------


def test_reset_returns_stored_image_and_info():
    env = make_env()
    obs, info = env.reset(seed=0)
    assert obs.dtype == np.uint8
    assert obs.shape == (3, *IMAGE_SIZE)
    np.testing.assert_array_equal(obs, env.dataset.images[info["index"]].numpy())
    assert info["label"] == int(env.dataset.labels[info["index"]])


def test_step_info_reports_outcome():
    env = make_env()
    env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step(np.array([1, 0, 1]))
    assert terminated is True
    assert truncated is False
    assert info["blocks_used"] == 2
    np.testing.assert_array_equal(info["policy"], [1, 0, 1])
    assert info["correct"] == (info["prediction"] == info["label"])
    expected_flops = float(env.model.policy_flops(torch.tensor([[1, 0, 1]]))[0])
    assert info["flops"] == expected_flops
    expected_reward = 1 - (2 / 3) ** 2 if info["correct"] else -10.0
    assert reward == pytest.approx(expected_reward)


def test_step_accepts_float_bool_int_and_list_actions():
    env = make_env()
    results = []
    for action in (
        np.array([1, 0, 1], dtype=np.float32),
        np.array([True, False, True]),
        np.array([1, 0, 1], dtype=np.int64),
        [1, 0, 1],
        torch.tensor([1.0, 0.0, 1.0]),
    ):
        env.reset(seed=5)
        _, reward, _, _, info = env.step(action)
        results.append((reward, info["prediction"], info["policy"].tolist()))
    assert all(result == results[0] for result in results)


def test_same_seed_gives_same_episodes():
    first = run_episodes(make_env(augment=True), seed=7, count=12)
    second = run_episodes(make_env(augment=True), seed=7, count=12)
    for (obs_a, info_a, reward_a, step_a), (obs_b, info_b, reward_b, step_b) in zip(first, second):
        np.testing.assert_array_equal(obs_a, obs_b)
        assert info_a == info_b
        assert reward_a == reward_b
        assert step_a.keys() == step_b.keys()
        for key in step_a:
            np.testing.assert_array_equal(step_a[key], step_b[key])


def test_different_seeds_give_different_images():
    first = [entry[1]["index"] for entry in run_episodes(make_env(), seed=1, count=10)]
    second = [entry[1]["index"] for entry in run_episodes(make_env(), seed=2, count=10)]
    assert first != second


def test_shuffle_visits_every_image_once_per_pass():
    env = make_env()
    indices = [entry[1]["index"] for entry in run_episodes(env, seed=3, count=24)]
    assert sorted(indices) == list(range(24))


def test_sequential_sampling_is_ordered_and_wraps():
    env = BlockDropEnv(make_model(), make_dataset(size=5), sampling="sequential")
    indices = [entry[1]["index"] for entry in run_episodes(env, seed=0, count=7)]
    assert indices == [0, 1, 2, 3, 4, 0, 1]


def test_reset_index_option_shows_that_image():
    env = make_env()
    obs, info = env.reset(options={"index": 11})
    assert info["index"] == 11
    np.testing.assert_array_equal(obs, env.dataset.images[11].numpy())


def test_render_returns_current_image_channels_last():
    env = make_env(render_mode="rgb_array")
    obs, _ = env.reset(seed=0)
    np.testing.assert_array_equal(env.render(), obs.transpose(1, 2, 0))


def test_predictions_vary_across_images():
    env = make_env()
    predictions = set()
    for index in range(24):
        env.reset(options={"index": index})
        predictions.add(env.step([1, 1, 1])[4]["prediction"])
    assert len(predictions) > 1


# -- augmentation -------------------------------------------------------------------------------


def test_augmentation_is_a_padded_crop_or_its_mirror():
    images = torch.randint(1, 256, (6, 3, 8, 8), dtype=torch.uint8)
    augmented = random_crop_flip(images, np.random.default_rng(0))
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    for image, result in zip(padded, augmented):
        crops = [image[:, y : y + 8, x : x + 8] for y in range(9) for x in range(9)]
        candidates = crops + [crop.flip(2) for crop in crops]
        assert any(torch.equal(result, crop) for crop in candidates)


def test_augmentation_is_off_by_default():
    env = make_env()
    obs, info = env.reset(seed=0)
    np.testing.assert_array_equal(obs, env.dataset.images[info["index"]].numpy())


# -- curriculum ---------------------------------------------------------------------------------


def test_curriculum_forces_leading_blocks_on():
    env = make_env(num_controlled=1)
    env.reset(seed=0)
    info = env.step([0, 0, 0])[4]
    np.testing.assert_array_equal(info["policy"], [1, 1, 0])
    assert info["blocks_used"] == 2


def test_curriculum_set_through_reset_options():
    env = make_env()
    env.reset(seed=0, options={"num_controlled": 2})
    assert env.num_controlled == 2
    np.testing.assert_array_equal(env.step([0, 0, 1])[4]["policy"], [1, 0, 1])


def test_set_curriculum_changes_forced_blocks():
    env = make_env()
    env.set_curriculum(K)
    env.reset(seed=0)
    np.testing.assert_array_equal(env.step([0, 0, 0])[4]["policy"], [0, 0, 0])


# -- counterfactual scoring -----------------------------------------------------------------------


def test_score_actions_matches_step():
    env = make_env()
    env.reset(seed=4)
    actions = np.array([[1, 1, 1], [0, 0, 0], [1, 0, 1]])
    scores = env.score_actions(actions)
    for row, action in enumerate(actions):
        env.reset(seed=4)
        _, reward, _, _, info = env.step(action)
        assert float(scores.rewards[row]) == pytest.approx(reward)
        assert int(scores.predictions[row]) == info["prediction"]
        assert bool(scores.correct[row]) == info["correct"]
        assert int(scores.blocks_used[row]) == info["blocks_used"]
        assert float(scores.flops[row]) == info["flops"]


def test_score_actions_does_not_advance_env():
    scored, plain = make_env(augment=True), make_env(augment=True)
    scored.reset(seed=9)
    plain.reset(seed=9)
    scored.score_actions([1, 0, 1])
    scored.score_actions([[0, 0, 0], [1, 1, 1]])
    step_scored = scored.step([1, 1, 0])
    step_plain = plain.step([1, 1, 0])
    assert step_scored[1] == step_plain[1]
    next_scored, next_plain = scored.reset(), plain.reset()
    np.testing.assert_array_equal(next_scored[0], next_plain[0])
    assert next_scored[1] == next_plain[1]


def test_score_actions_of_single_action_has_one_row():
    env = make_env()
    env.reset(seed=0)
    assert env.score_actions([1, 1, 1]).rewards.shape == (1,)


def test_scores_can_enter_autograd_graphs():
    env = make_env()
    env.reset(seed=0)
    rewards = env.score_actions([[1, 1, 1], [0, 1, 0]]).rewards
    logits = torch.zeros(2, requires_grad=True)
    (logits * rewards).sum().backward()
    torch.testing.assert_close(logits.grad, rewards)


# -- rewards ------------------------------------------------------------------------------------


def test_block_usage_reward_follows_paper():
    reward = BlockUsageReward(penalty=5.0)
    correct = torch.tensor([True, True, False])
    policy = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    values = reward(correct, policy, torch.zeros(3), make_model())
    torch.testing.assert_close(values, torch.tensor([0.0, 1 - 0.25**2, -5.0]))


def test_flops_reward_uses_share_of_full_flops():
    model = make_model()
    policy = torch.tensor([[1, 1, 1], [0, 0, 0]], dtype=torch.bool)
    flops = model.policy_flops(policy)
    values = FlopsReward(penalty=2.0)(torch.tensor([True, True]), policy, flops, model)
    share = model.flops_table.fixed / model.flops_table.total
    torch.testing.assert_close(values, torch.tensor([0.0, 1 - share**2]))
    wrong = FlopsReward(penalty=2.0)(torch.tensor([False]), policy[:1], flops[:1], model)
    torch.testing.assert_close(wrong, torch.tensor([-2.0]))


def test_custom_reward_function_is_used():
    def blocks_reward(correct, policy, flops, model):
        return policy.sum(dim=1).float()

    env = make_env(reward=blocks_reward)
    env.reset(seed=0)
    assert env.step([1, 0, 1])[1] == 2.0


def test_zero_penalty_warns_that_dropping_everything_is_optimal():
    with pytest.warns(UserWarning, match="dropping every block is never worse"):
        BlockUsageReward(penalty=0.0)


# -- invalid input ------------------------------------------------------------------------------


def test_step_rejects_wrong_action_shape():
    env = make_env()
    env.reset(seed=0)
    with pytest.raises(ConfigError, match=r"`action` must have shape \(3,\), got \(3, 1\)"):
        env.step(np.ones((3, 1)))


def test_step_rejects_action_value_two():
    env = make_env()
    env.reset(seed=0)
    with pytest.raises(ConfigError, match="entries must be 0 or 1, got 2"):
        env.step([1, 2, 0])


def test_step_rejects_fractional_action():
    env = make_env()
    env.reset(seed=0)
    with pytest.raises(ConfigError, match="entries must be 0 or 1, got 0.5"):
        env.step(np.array([1.0, 0.5, 0.0]))


def test_step_rejects_nan_action():
    env = make_env()
    env.reset(seed=0)
    with pytest.raises(ConfigError, match="entries must be 0 or 1, got nan"):
        env.step(np.array([1.0, np.nan, 0.0]))


def test_step_rejects_string_action():
    env = make_env()
    env.reset(seed=0)
    with pytest.raises(ConfigError, match="must contain numbers 0/1"):
        env.step(["1", "0", "1"])


def test_step_before_reset_raises():
    env = make_env()
    with pytest.raises(ResetNeeded, match="before `reset`"):
        env.step([1, 1, 1])


def test_step_after_termination_raises():
    env = make_env()
    env.reset(seed=0)
    env.step([1, 1, 1])
    with pytest.raises(ResetNeeded, match="episode ended"):
        env.step([1, 1, 1])


def test_score_actions_before_reset_raises():
    with pytest.raises(ResetNeeded, match="call `env.reset\\(\\)` first"):
        make_env().score_actions([1, 1, 1])


def test_score_actions_rejects_wrong_width():
    env = make_env()
    env.reset(seed=0)
    with pytest.raises(ConfigError, match=r"`actions` must have shape \(2, 3\), got \(2, 4\)"):
        env.score_actions(np.ones((2, 4)))


def test_curriculum_rejects_zero():
    with pytest.raises(ConfigError, match=r"`num_controlled` must be an integer in 1\.\.3.*got 0"):
        make_env(num_controlled=0)


def test_curriculum_rejects_more_than_num_blocks():
    env = make_env()
    with pytest.raises(ConfigError, match=r"in 1\.\.3 .*got 4"):
        env.set_curriculum(K + 1)


def test_curriculum_rejects_non_integer():
    env = make_env()
    with pytest.raises(ConfigError, match="got 1.5"):
        env.reset(options={"num_controlled": 1.5})


def test_dataset_with_other_class_count_is_rejected():
    dataset = make_dataset(num_classes=4)
    with pytest.raises(DatasetError, match="has 4 classes but the model CifarResNet outputs 3"):
        BlockDropEnv(make_model(), dataset)


def test_dataset_with_other_image_size_is_rejected():
    images = torch.zeros(4, 3, 20, 20, dtype=torch.uint8)
    dataset = ImageDataset(images, torch.zeros(4, dtype=torch.long), ["a", "b", "c"], "big")
    with pytest.raises(DatasetError, match="20x20 images but the model was built for 16x16"):
        BlockDropEnv(make_model(), dataset)


def test_negative_penalty_is_rejected():
    with pytest.raises(ConfigError, match="`penalty` must be a finite number >= 0, got -1"):
        make_env(penalty=-1.0)


def test_nan_penalty_is_rejected():
    with pytest.raises(ConfigError, match="`penalty` must be a finite number >= 0, got nan"):
        make_env(penalty=float("nan"))


def test_penalty_and_reward_together_are_rejected():
    with pytest.raises(ConfigError, match="either `reward` or `penalty`"):
        make_env(penalty=1.0, reward=FlopsReward())


def test_unknown_sampling_is_rejected():
    with pytest.raises(ConfigError, match="`sampling` must be one of .* got 'random'"):
        make_env(sampling="random")


def test_dataset_name_without_data_dir_is_rejected():
    with pytest.raises(ConfigError, match="`data_dir` is required"):
        BlockDropEnv(make_model(), "cifar10")


def test_unknown_reset_option_is_rejected():
    env = make_env()
    with pytest.raises(ConfigError, match="unknown reset option"):
        env.reset(options={"penalty": 3})


def test_reset_index_out_of_range_is_rejected():
    env = make_env()
    with pytest.raises(ConfigError, match=r"`options\['index'\]` must be an integer in 0\.\.23"):
        env.reset(options={"index": 24})


def test_unknown_device_is_rejected():
    with pytest.raises(ConfigError, match="`device` must be 'cpu' or 'cuda"):
        make_env(device="tpu")


def test_checkpoint_of_wrong_type_is_rejected():
    with pytest.raises(ConfigError, match="`checkpoint` must be a BlockDropResNet or a checkpoint"):
        BlockDropEnv(42, make_dataset())  # type: ignore[arg-type]


def test_unknown_render_mode_is_rejected():
    with pytest.raises(ConfigError, match="`render_mode` must be None or 'rgb_array'"):
        make_env(render_mode="human")


def test_env_stores_weights_channels_last_on_cpu():
    env = make_env()
    weights = [p for p in env.model.parameters() if p.dim() == 4]
    assert weights
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
