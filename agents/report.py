"""The end-of-training comparison: a learned policy next to the static baselines.

BlockDrop's claim has two parts, and this table checks both on the test split:

* at equal mean blocks, the learned per-image policy is more accurate than keeping the first K
  blocks for every image;
* harder images get more blocks, measured as the Spearman rank correlation between a recorded
  difficulty score and the blocks used (only for datasets that record one, such as ``shapes``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from agents.baselines import AllBlocks, FirstK
from agents.evaluation import EvaluationResult, PolicyFn, evaluate_policy
from blockdrop_env.data import ImageDataset
from blockdrop_env.resnet import BlockDropResNet


@dataclass
class PolicyComparison:
    """Accuracy and mean blocks of the learned policy and the baselines on one split.

    Attributes:
        learned: The learned policy.
        all_blocks: Every block for every image.
        first_k_floor: First-K with k = floor(learned mean blocks).
        first_k_ceil: First-K with k = ceil(learned mean blocks).
        first_k_accuracy: First-K accuracy interpolated linearly to the learned mean blocks.
        difficulty_correlation: Spearman correlation of the ``difficulty`` factor with blocks
            used, or None when the dataset records no difficulty.
    """

    learned: EvaluationResult
    all_blocks: EvaluationResult
    first_k_floor: EvaluationResult
    first_k_ceil: EvaluationResult
    first_k_accuracy: float
    difficulty_correlation: float | None

    def to_dict(self) -> dict[str, object]:
        """Plain dict for JSON output."""
        return asdict(self)

    def format_table(self) -> str:
        """Markdown table of accuracy and blocks, and the difficulty correlation."""
        k_low, k_high = self.first_k_floor.blocks_mean, self.first_k_ceil.blocks_mean
        rows = [
            ("learned policy", self.learned.accuracy, self.learned.blocks_mean),
            ("all blocks", self.all_blocks.accuracy, self.all_blocks.blocks_mean),
            (f"first-K, k={k_low:.0f}", self.first_k_floor.accuracy, k_low),
            (f"first-K, k={k_high:.0f}", self.first_k_ceil.accuracy, k_high),
            ("first-K at the same mean blocks", self.first_k_accuracy, self.learned.blocks_mean),
        ]
        lines = ["| policy | accuracy | mean blocks |", "|---|---|---|"]
        lines += [f"| {name} | {accuracy:.4f} | {blocks:.2f} |" for name, accuracy, blocks in rows]
        if self.difficulty_correlation is not None:
            lines.append("")
            lines.append(
                f"Spearman rank correlation between image difficulty and blocks used: "
                f"{self.difficulty_correlation:+.3f}"
            )
        return "\n".join(lines)


def compare_with_baselines(
    model: BlockDropResNet,
    dataset: ImageDataset,
    policy_fn: PolicyFn,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> PolicyComparison:
    """Evaluate ``policy_fn``, all blocks and first-K around its mean blocks on ``dataset``."""
    learned, record = evaluate_policy(model, dataset, policy_fn, batch_size=batch_size, device=device, record=True)
    num_blocks = model.num_blocks
    all_blocks = evaluate_policy(model, dataset, AllBlocks(num_blocks), batch_size=batch_size, device=device)
    k_low = min(num_blocks, math.floor(learned.blocks_mean))
    k_high = min(num_blocks, math.ceil(learned.blocks_mean))
    floor_result = evaluate_policy(model, dataset, FirstK(num_blocks, k_low), batch_size=batch_size, device=device)
    ceil_result = (
        floor_result
        if k_high == k_low
        else evaluate_policy(model, dataset, FirstK(num_blocks, k_high), batch_size=batch_size, device=device)
    )
    fraction = learned.blocks_mean - k_low
    interpolated = floor_result.accuracy + fraction * (ceil_result.accuracy - floor_result.accuracy)

    correlation = None
    if dataset.factors is not None and "difficulty" in dataset.factors:
        correlation = spearman(dataset.factors["difficulty"], record.policies.sum(dim=1))
    return PolicyComparison(learned, all_blocks, floor_result, ceil_result, interpolated, correlation)


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation, with tied values given their average rank.

    Returns NaN when either input is constant, where the correlation is undefined.
    """
    rank_x, rank_y = _average_ranks(x.double()), _average_ranks(y.double())
    rank_x, rank_y = rank_x - rank_x.mean(), rank_y - rank_y.mean()
    denominator = rank_x.norm() * rank_y.norm()
    if denominator == 0:
        return math.nan
    return float((rank_x * rank_y).sum() / denominator)


def _average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks from 1 to N, where tied values share the mean of the ranks they span."""
    unique, inverse, counts = torch.unique(values, return_inverse=True, return_counts=True)
    # Rank of each unique value = (first position + last position) / 2 in sorted order, plus 1.
    ends = counts.cumsum(0).double()
    starts = ends - counts.double() + 1
    return ((starts + ends) / 2)[inverse]
