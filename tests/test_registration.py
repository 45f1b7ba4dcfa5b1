"""Tests for blockdrop_env.registration."""

from __future__ import annotations

import sys
import types
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import blockdrop_env.data
from blockdrop_env.data import ImageDataset
from blockdrop_env.env import BlockDropEnv
from blockdrop_env.registration import ENV_ID, register_envs
from blockdrop_env.resnet import CifarResNet
from blockdrop_env.vector_env import BlockDropVectorEnv

IMAGE_SIZE = (16, 16)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    # Tiny networks gain nothing from threads, and two threads slow down badly on a busy 2-core CPU.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_model() -> CifarResNet:
    torch.manual_seed(0)
    return CifarResNet(depth=8, num_classes=3, input_size=IMAGE_SIZE).eval()


def make_dataset(size: int = 12) -> ImageDataset:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (size, 3, *IMAGE_SIZE), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 3, (size,), generator=generator)
    return ImageDataset(images, labels, ["a", "b", "c"], "random")


def test_register_twice_is_silent():
    register_envs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        register_envs()
    assert ENV_ID in gym.registry


def test_make_builds_single_env_that_passes_checker():
    register_envs()
    env = gym.make(ENV_ID, checkpoint=make_model(), dataset=make_dataset(), penalty=5.0)
    assert isinstance(env.unwrapped, BlockDropEnv)
    check_env(env.unwrapped, skip_render_check=True)
    env.reset(seed=0)
    _, reward, terminated, truncated, _ = env.step(np.ones(3))
    assert terminated and not truncated
    assert reward in (0.0, -5.0)


def test_make_vec_uses_native_vector_env():
    register_envs()
    envs = gym.make_vec(
        ENV_ID,
        num_envs=4,
        vectorization_mode="vector_entry_point",
        checkpoint=make_model(),
        dataset=make_dataset(),
        num_controlled=2,
    )
    assert isinstance(envs, BlockDropVectorEnv)
    assert envs.num_envs == 4
    assert envs.num_controlled == 2
    obs, _ = envs.reset(seed=0)
    assert obs.shape == (4, 3, *IMAGE_SIZE)


def test_make_vec_sync_mode_matches_native_env_layout():
    register_envs()
    kwargs = dict(checkpoint=make_model(), dataset=make_dataset(), sampling="sequential")
    sync = gym.make_vec(
        ENV_ID, num_envs=3, vectorization_mode="sync",
        vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP}, **kwargs,
    )
    native = gym.make_vec(ENV_ID, num_envs=3, vectorization_mode="vector_entry_point", **kwargs)
    sync_obs, _ = sync.reset(seed=0)
    native.reset(seed=0)
    actions = np.ones((3, 3))
    sync_step = sync.step(actions)
    native_step = native.step(actions)
    np.testing.assert_allclose(sync_step[1], native_step[1])
    assert set(sync_step[4]["final_info"]) == set(native_step[4]["final_info"])
    np.testing.assert_array_equal(
        sync_step[4]["final_info"]["prediction"], native_step[4]["final_info"]["prediction"]
    )


def test_make_loads_checkpoint_and_dataset_by_name(monkeypatch, tmp_path):
    model, dataset = make_model(), make_dataset()
    loaded = types.SimpleNamespace(model=model)
    checkpoints = types.ModuleType("blockdrop_env.checkpoints")
    checkpoints.load_resnet = lambda path, **kwargs: loaded  # type: ignore[attr-defined]
    calls = []

    def load_dataset(name, data_dir, split, **kwargs):
        calls.append((name, data_dir, split))
        return dataset

    monkeypatch.setitem(sys.modules, "blockdrop_env.checkpoints", checkpoints)
    monkeypatch.setattr(blockdrop_env.data, "load_dataset", load_dataset, raising=False)
    register_envs()
    env = gym.make(
        ENV_ID, checkpoint=str(tmp_path / "r8.pt"), dataset="cifar10", data_dir=tmp_path, split="test"
    )
    assert env.unwrapped.model is model
    assert calls == [("cifar10", tmp_path, "test")]


def test_shapes_env_works_offline_without_arguments():
    from blockdrop_env.registration import SHAPES_CHECKPOINT, SHAPES_ENV_ID
    from blockdrop_env.shapes import FACTOR_NAMES

    register_envs()
    assert SHAPES_CHECKPOINT.is_file()
    env = gym.make(SHAPES_ENV_ID)
    assert env.action_space.n == 15
    obs, info = env.reset(seed=0)
    assert obs.shape == (3, 32, 32)
    assert obs.dtype == np.uint8
    for name in FACTOR_NAMES:
        assert name in info
    _, _, terminated, _, info = env.step(np.ones(15, dtype=np.int8))
    assert terminated
    assert "difficulty" in info
    assert 0.0 <= info["difficulty"] <= 1.0


def test_shapes_vector_env_reports_factors_for_each_image():
    from blockdrop_env.registration import SHAPES_ENV_ID

    register_envs()
    env = gym.make_vec(SHAPES_ENV_ID, num_envs=4, vectorization_mode="vector_entry_point", split="test")
    _, infos = env.reset(seed=0)
    assert infos["difficulty"].shape == (4,)
    _, _, _, _, infos = env.step(np.ones((4, 15), dtype=np.int8))
    assert infos["final_info"]["difficulty"].shape == (4,)
    assert infos["final_info"]["_difficulty"].all()
