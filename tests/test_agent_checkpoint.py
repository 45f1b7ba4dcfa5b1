"""Tests for agents/agent_checkpoint.py: saving, loading and evaluating trained agents."""

from __future__ import annotations

import pytest
import torch

from agents.agent_checkpoint import agent_policy_fn, agent_state, load_agent, resolve_agent_path
from agents.policy import PolicyConfig, PolicyNetwork
from blockdrop_env.checkpoints import save_resnet
from blockdrop_env.errors import CheckpointError, ConfigError
from blockdrop_env.resnet import CifarResNet


@pytest.fixture()
def agent_file(tmp_path):
    torch.manual_seed(0)
    policy = PolicyNetwork(PolicyConfig(num_blocks=3, mean=(0.4, 0.4, 0.4), std=(0.2, 0.2, 0.2)))
    model = CifarResNet(depth=8, num_classes=4, input_size=(16, 16))
    state = agent_state(policy, model, num_controlled=2, epoch=5, metrics={"test/accuracy": 0.5})
    path = tmp_path / "agent.pt"
    torch.save(state, path)
    return path, policy.eval(), model.eval()


def test_checkpoint_loads_with_weights_only(agent_file):
    path, _, _ = agent_file
    state = torch.load(path, weights_only=True)
    assert state["format"] == "blockdrop_agent"
    assert state["resnet"]["arch"] == "cifar_resnet8"


def test_load_agent_restores_both_networks(agent_file):
    path, policy, model = agent_file
    loaded_policy, loaded, info = load_agent(path)
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    assert torch.equal(loaded_policy(images), policy(images))
    with torch.no_grad():
        assert torch.equal(loaded.model(loaded.model.preprocess(images)), model(model.preprocess(images)))
    assert info.num_controlled == 2
    assert info.epoch == 5
    assert info.metrics == {"test/accuracy": 0.5}
    assert info.policy_config.mean == (0.4, 0.4, 0.4)


def test_resolve_agent_path_prefers_agent_best_last(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"x")
    assert resolve_agent_path(tmp_path) == tmp_path / "last.pt"
    (tmp_path / "best.pt").write_bytes(b"x")
    assert resolve_agent_path(tmp_path) == tmp_path / "best.pt"
    (tmp_path / "agent.pt").write_bytes(b"x")
    assert resolve_agent_path(tmp_path) == tmp_path / "agent.pt"


def test_resolve_agent_path_rejects_empty_run_directory(tmp_path):
    with pytest.raises(CheckpointError, match="has no agent checkpoint \\(agent.pt, best_agent.pt, best.pt or last.pt\\)"):
        resolve_agent_path(tmp_path)


def test_load_agent_rejects_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_agent(tmp_path / "nothing.pt")


def test_load_agent_rejects_plain_resnet_checkpoint(tmp_path):
    path = tmp_path / "resnet.pt"
    save_resnet(CifarResNet(depth=8, num_classes=4), path)
    with pytest.raises(CheckpointError, match="is not an agent checkpoint \\(format 'blockdrop'"):
        load_agent(path)


def test_load_agent_rejects_garbage_file(tmp_path):
    path = tmp_path / "agent.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint"):
        load_agent(path)


def test_policy_fn_thresholds_and_forces_blocks():
    policy = PolicyNetwork(PolicyConfig(num_blocks=4))
    with torch.no_grad():
        policy.logits.weight.zero_()
        policy.logits.bias.copy_(torch.tensor([-5.0, -5.0, 5.0, -5.0]))
    actions = agent_policy_fn(policy, num_controlled=3)(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    assert actions.dtype == torch.bool
    assert actions.tolist() == [[True, False, True, False]] * 2


def test_policy_fn_rejects_too_many_controlled_blocks():
    with pytest.raises(ConfigError, match=r"`num_controlled` must be an integer in 1\.\.4 .*got 5"):
        agent_policy_fn(PolicyNetwork(PolicyConfig(num_blocks=4)), num_controlled=5)
