"""Evaluate a ResNet under a block-drop policy on a whole dataset split."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from blockdrop_env.data import ImageDataset
from blockdrop_env.errors import ConfigError
from blockdrop_env.resnet import BlockDropResNet, prefer_channels_last

PolicyFn = Callable[[torch.Tensor], torch.Tensor]
"""Maps uint8 images (B, 3, H, W) on the evaluation device to a 0/1 policy (B, K)."""


@dataclass
class EvaluationResult:
    """Metrics of one policy on one dataset split.

    Attributes:
        accuracy: Top-1 accuracy in [0, 1].
        blocks_mean: Mean number of residual blocks executed per image.
        blocks_std: Standard deviation of the blocks executed per image.
        flops_mean: Mean multiply-adds per image (stem, head, shortcuts and kept blocks).
        flops_std: Standard deviation of the multiply-adds per image.
        flops_full: Multiply-adds of the full network, for ratios.
        unique_policies: Number of distinct policies used over the split.
        num_images: Number of images evaluated.
        num_blocks: K, the network's number of residual blocks.
        block_usage: Fraction of images that executed each block.
    """

    accuracy: float
    blocks_mean: float
    blocks_std: float
    flops_mean: float
    flops_std: float
    flops_full: float
    unique_policies: int
    num_images: int
    num_blocks: int
    block_usage: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON output."""
        return asdict(self)


@dataclass
class EvaluationRecord:
    """Per-image outputs of an evaluation, for plots and analysis."""

    predictions: torch.Tensor
    correct: torch.Tensor
    policies: torch.Tensor


def evaluate_policy(
    model: BlockDropResNet,
    dataset: ImageDataset,
    policy_fn: PolicyFn,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: bool = False,
    record: bool = False,
) -> EvaluationResult | tuple[EvaluationResult, EvaluationRecord]:
    """Run ``model`` over every image of ``dataset`` with the blocks ``policy_fn`` keeps.

    The forward pass is block-sparse, so the time spent follows the blocks kept.

    Args:
        model: The network; switched to eval mode.
        dataset: Images and labels; its class count must equal the model's.
        policy_fn: Gives the policy for each batch of uint8 images.
        batch_size: Images per forward pass.
        device: Where the forward passes run.
        progress: Show a progress bar with the running accuracy on stderr.
        record: Also return the per-image predictions and policies.

    Returns:
        The metrics, and the per-image record when ``record`` is true.

    Raises:
        ConfigError: if the batch size is not positive or the class counts differ.
    """
    if batch_size < 1:
        raise ConfigError(f"`batch_size` must be a positive integer, got {batch_size}")
    if dataset.num_classes != model.num_classes:
        raise ConfigError(
            f"the dataset has {dataset.num_classes} classes but the model predicts "
            f"{model.num_classes}; pass a checkpoint trained on this dataset"
        )
    model = prefer_channels_last(model.to(device).eval(), device)
    predictions, policies = [], []
    bar = tqdm(total=len(dataset), unit="img", disable=not progress, leave=False)
    correct_so_far = seen = 0
    with torch.inference_mode():
        for start in range(0, len(dataset), batch_size):
            images = dataset.images[start : start + batch_size].to(device)
            policy = model.validate_policy(policy_fn(images).to(device), images.shape[0])
            logits = model(model.preprocess(images), policy, mode="sparse")
            predictions.append(logits.argmax(dim=1).cpu())
            policies.append(policy.cpu())
            correct_so_far += int((predictions[-1] == dataset.labels[start : start + batch_size]).sum())
            seen += images.shape[0]
            bar.update(images.shape[0])
            bar.set_postfix(accuracy=f"{correct_so_far / seen:.4f}", refresh=False)
    bar.close()

    all_predictions = torch.cat(predictions)
    all_policies = torch.cat(policies)
    correct = all_predictions == dataset.labels
    result = summarize(model, correct, all_policies)
    if record:
        return result, EvaluationRecord(all_predictions, correct, all_policies)
    return result


def summarize(model: BlockDropResNet, correct: torch.Tensor, policies: torch.Tensor) -> EvaluationResult:
    """Compute the metrics of a run from per-image correctness (N,) and policies (N, K)."""
    blocks = policies.sum(dim=1).double()
    flops = model.policy_flops(policies)
    return EvaluationResult(
        accuracy=float(correct.double().mean()),
        blocks_mean=float(blocks.mean()),
        blocks_std=float(blocks.std(unbiased=False)),
        flops_mean=float(flops.mean()),
        flops_std=float(flops.std(unbiased=False)),
        flops_full=float(model.flops_table.total),
        unique_policies=int(torch.unique(policies.to(torch.uint8), dim=0).shape[0]),
        num_images=int(correct.numel()),
        num_blocks=model.num_blocks,
        block_usage=[float(u) for u in policies.double().mean(dim=0)],
    )
