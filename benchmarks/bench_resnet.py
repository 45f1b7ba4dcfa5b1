"""Block-sparse forward speed of a CIFAR ResNet-32 on the CPU, measured side by side.

For each batch size, the configurations are timed in interleaved rounds (all kept, half kept at
random per sample, half kept in masked mode, none kept) so that load from other processes on a
shared machine affects them alike. Speed-ups are ratios of median times within one run.

    python benchmarks/bench_resnet.py --out benchmarks/results/resnet.json
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from blockdrop_env.resnet import BlockDropResNet, build_resnet
from common import finish, keep_exactly, machine_info, medians, target, time_interleaved, write_json

TARGETS = {"half_kept_batch256": 2.0, "half_kept_batch1": 1.7}


def measure_batch(model: BlockDropResNet, batch_size: int, rounds: int, seed: int) -> dict[str, object]:
    """Median time per configuration at one batch size, with their ratios."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 3, *model.input_size, generator=generator)
    num_blocks = model.num_blocks
    ones = torch.ones(batch_size, num_blocks, dtype=torch.bool)
    zeros = torch.zeros(batch_size, num_blocks, dtype=torch.bool)
    half = keep_exactly(batch_size, num_blocks, num_blocks // 2, generator)
    configs: dict[str, Callable[[], object]] = {
        "all_kept_sparse": lambda: model(x, ones, mode="sparse"),
        "half_kept_sparse": lambda: model(x, half, mode="sparse"),
        "half_kept_masked": lambda: model(x, half, mode="masked"),
        "none_kept_sparse": lambda: model(x, zeros, mode="sparse"),
    }
    with torch.inference_mode():
        median = medians(time_interleaved(configs, rounds))
    kept_flops = model.policy_flops(half).mean().item() / model.flops_table.total
    return {
        "batch_size": batch_size,
        "rounds": rounds,
        "median_seconds": median,
        "images_per_second": {name: batch_size / t for name, t in median.items()},
        "speedup_half_vs_all": median["all_kept_sparse"] / median["half_kept_sparse"],
        "speedup_sparse_vs_masked_at_half": median["half_kept_masked"] / median["half_kept_sparse"],
        "speedup_none_vs_all": median["all_kept_sparse"] / median["none_kept_sparse"],
        "ideal_speedup_half_vs_all": 1.0 / kept_flops,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="cifar_resnet32")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/resnet.json"))
    parser.add_argument("--rounds-batch256", type=int, default=15)
    parser.add_argument("--rounds-batch1", type=int, default=300)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; default: torch's own")
    parser.add_argument("--quick", action="store_true", help="tiny network and batch (smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    large_batch = 8 if args.quick else 256
    if args.quick:
        args.arch, args.rounds_batch256, args.rounds_batch1 = "cifar_resnet8", 2, 2

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    model = build_resnet(args.arch, 10).eval()
    results: dict[str, Any] = {
        "benchmark": "resnet",
        "setup": {**machine_info(), "quick": args.quick, "arch": args.arch, "num_blocks": model.num_blocks},
        "batch256": measure_batch(model, large_batch, args.rounds_batch256, args.seed),
        "batch1": measure_batch(model, 1, args.rounds_batch1, args.seed),
    }
    results["targets"] = [
        target("half_kept_batch256", results["batch256"]["speedup_half_vs_all"], TARGETS["half_kept_batch256"], ">=",
               f"{args.arch}, half kept, batch {large_batch}: all-kept time / half-kept time"),
        target("half_kept_batch1", results["batch1"]["speedup_half_vs_all"], TARGETS["half_kept_batch1"], ">=",
               f"{args.arch}, half kept, batch 1: all-kept time / half-kept time"),
    ]
    write_json(args.out, finish(results, started))
    for entry in results["targets"]:
        status = "met" if entry["met"] else "MISSED"
        print(f"{entry['name']}: {entry['measured']:.2f}x (target {entry['target']:.1f}x) {status}")
    for key in ("batch256", "batch1"):
        row = results[key]
        print(
            f"{key}: sparse vs masked at half kept {row['speedup_sparse_vs_masked_at_half']:.2f}x, "
            f"none vs all {row['speedup_none_vs_all']:.2f}x, ideal half {row['ideal_speedup_half_vs_all']:.2f}x"
        )


if __name__ == "__main__":
    main()
