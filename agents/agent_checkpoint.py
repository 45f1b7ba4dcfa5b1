"""Agent checkpoints: the policy network and the ResNet it drives, in one weights-only file.

Layout (every value is a tensor, dict, list, str, int, float, bool or None, so the file loads
with ``torch.load(weights_only=True)``)::

    {
        "format": "blockdrop_agent",
        "format_version": 1,
        "policy_config": {...},      # PolicyConfig.to_dict()
        "policy": state_dict,
        "resnet": {...},             # the dict save_resnet writes: arch, num_classes, shortcut,
                                     # normalization, input_size, state_dict, extra
        "num_controlled": k,         # trailing blocks the policy controls; the others run
        "epoch": e,                  # last completed epoch, counted from 0
        "metrics": {...},            # that epoch's metrics
        "training": {...},           # optimiser, RNG and trainer state; only in last.pt
    }
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from agents.policy import PolicyConfig, PolicyNetwork, controlled_mask, threshold_policy
from agents.runs import BEST_CHECKPOINT, LAST_CHECKPOINT
from blockdrop_env import checkpoints
from blockdrop_env.checkpoints import LoadedResNet, read_checkpoint, resnet_from_state
from blockdrop_env.errors import CheckpointError
from blockdrop_env.resnet import BlockDropResNet, prefer_channels_last

AGENT_FORMAT = "blockdrop_agent"
AGENT_FORMAT_VERSION = 1
_REQUIRED_KEYS = ("policy_config", "policy", "resnet", "num_controlled")
# The final agent of `blockdrop pretrain --agent`. That run's best.pt and last.pt contain only the ResNet.
EXPORTED_AGENT = "agent.pt"
BEST_EXPORTED_AGENT = "best_agent.pt"


@dataclass
class AgentInfo:
    """Source and training progress of a loaded agent.

    Attributes:
        path: The checkpoint file read.
        num_controlled: Trailing blocks the policy decides on; the others always run.
        epoch: Last completed epoch (from 0), or -1 when unknown.
        metrics: That epoch's metrics, e.g. ``{"test/accuracy": 0.91}``.
        policy_config: Architecture of the policy network.
    """

    path: Path
    num_controlled: int
    epoch: int
    policy_config: PolicyConfig
    metrics: dict[str, float] = field(default_factory=dict)


def agent_state(
    policy: PolicyNetwork,
    model: BlockDropResNet,
    *,
    num_controlled: int,
    epoch: int,
    metrics: Mapping[str, float],
    training: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Build the checkpoint dict described in the module docstring.

    Args:
        policy: The policy network.
        model: The ResNet the policy drives.
        num_controlled: Trailing blocks the policy controls.
        epoch: Last completed epoch.
        metrics: That epoch's metrics.
        training: Optimiser, RNG and trainer state, for resuming; omitted when None.
    """
    state: dict[str, Any] = {
        "format": AGENT_FORMAT,
        "format_version": AGENT_FORMAT_VERSION,
        "policy_config": policy.config.to_dict(),
        "policy": {key: value.detach().cpu() for key, value in policy.state_dict().items()},
        "resnet": checkpoints.resnet_to_state(model),
        "num_controlled": int(num_controlled),
        "epoch": int(epoch),
        "metrics": {key: float(value) for key, value in metrics.items()},
    }
    if training is not None:
        state["training"] = dict(training)
    return state


def resolve_agent_path(path_or_run_dir: str | Path) -> Path:
    """Return the checkpoint file: ``path`` itself, or a run directory's agent file.

    In a run directory that is agent.pt, else best_agent.pt (both written by ``blockdrop pretrain
    --agent``, the second after each improved epoch), else best.pt, else last.pt (written by
    ``blockdrop train`` and ``blockdrop finetune``).

    Raises:
        CheckpointError: if the path does not exist or the run directory has no checkpoint.
    """
    path = Path(path_or_run_dir)
    if path.is_file():
        return path
    if path.is_dir():
        for name in (EXPORTED_AGENT, BEST_EXPORTED_AGENT, BEST_CHECKPOINT, LAST_CHECKPOINT):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(
            f"run directory {path} has no agent checkpoint ({EXPORTED_AGENT}, {BEST_EXPORTED_AGENT}, "
            f"{BEST_CHECKPOINT} or {LAST_CHECKPOINT}); train an agent there first with `blockdrop train`, "
            "or pass a checkpoint file"
        )
    raise CheckpointError(f"agent checkpoint {path} not found; pass a run directory or a .pt file")


def read_agent_checkpoint(path: Path, resnet_option: str = "--resnet") -> dict[str, Any]:
    """Load an agent checkpoint file with ``weights_only=True`` and check its format.

    ``resnet_option`` is the caller's option for a plain ResNet checkpoint, named in the error.

    Raises:
        CheckpointError: if the file cannot be read or is not a ``blockdrop_agent`` checkpoint.
    """
    state = read_checkpoint(path)
    if not isinstance(state, dict) or state.get("format") != AGENT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"{path} is not an agent checkpoint (format {found!r}, expected {AGENT_FORMAT!r}); "
            f"for a plain ResNet checkpoint use {resnet_option} instead"
        )
    if state.get("format_version") != AGENT_FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has agent format version {state.get('format_version')!r}; this blockdrop "
            f"reads version {AGENT_FORMAT_VERSION}"
        )
    missing = [key for key in _REQUIRED_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"agent checkpoint {path} lacks {missing}; the file is incomplete")
    return state


def policy_from_state(state: Mapping[str, Any], source: str = "checkpoint") -> PolicyNetwork:
    """Rebuild the policy network stored in an agent checkpoint dict, in eval mode.

    Raises:
        CheckpointError: if the configuration or the weights do not fit.
    """
    try:
        policy = PolicyNetwork(PolicyConfig.from_dict(state["policy_config"]))
        policy.load_state_dict(state["policy"])
    except (ValueError, RuntimeError, TypeError) as error:
        reason = " ".join(str(error).split())[:300]
        raise CheckpointError(f"{source} has an invalid policy network: {reason}") from None
    return policy.eval()


def load_agent(
    path_or_run_dir: str | Path, device: str | torch.device = "cpu"
) -> tuple[PolicyNetwork, LoadedResNet, AgentInfo]:
    """Load a trained agent: its policy network, its ResNet and where it came from.

    Args:
        path_or_run_dir: A checkpoint file, or a run directory (see :func:`resolve_agent_path`).
        device: Where to put both networks.

    Returns:
        The policy network and the ResNet (both in eval mode on ``device``), and an
        :class:`AgentInfo`.

    Raises:
        CheckpointError: if no checkpoint is found or it is invalid.
    """
    path = resolve_agent_path(path_or_run_dir)
    state = read_agent_checkpoint(path)
    policy = policy_from_state(state, f"agent checkpoint {path}").to(device)
    loaded = resnet_from_state(state["resnet"], path=path)
    loaded.model.to(device).eval()
    if loaded.model.num_blocks != policy.num_blocks:
        raise CheckpointError(
            f"agent checkpoint {path} pairs a policy for {policy.num_blocks} blocks with a "
            f"ResNet of {loaded.model.num_blocks} blocks; the file is inconsistent"
        )
    info = AgentInfo(
        path=path,
        num_controlled=int(state["num_controlled"]),
        epoch=int(state.get("epoch", -1)),
        policy_config=policy.config,
        metrics=dict(state.get("metrics", {})),
    )
    return policy, loaded, info


def agent_policy_fn(
    policy: PolicyNetwork, num_controlled: int | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Turn a policy network into a deterministic policy for evaluation.

    Args:
        policy: The policy network; switched to eval mode on every call, and to channels-last
            weights on a CPU.
        num_controlled: Trailing blocks it controls (the others always run); None means all K.

    Returns:
        A function from uint8 images (B, 3, H, W) to a bool policy (B, K) that keeps block i
        when its probability is >= 0.5, on the policy network's device.

    Raises:
        ConfigError: if ``num_controlled`` is not in 1..K.
    """
    k = policy.num_blocks if num_controlled is None else num_controlled
    mask = controlled_mask(policy.num_blocks, k)
    prefer_channels_last(policy, next(policy.parameters()).device)

    def policy_fn(images: torch.Tensor) -> torch.Tensor:
        policy.eval()
        with torch.no_grad():
            probs = policy(images)
        return threshold_policy(probs, mask.to(probs.device))

    return policy_fn
