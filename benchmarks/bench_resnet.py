"""Block-sparse forward speed of a CIFAR ResNet-32 on the CPU, measured side by side.

For each batch size, the configurations are timed in interleaved rounds (all kept, half kept at
random per sample, half kept in masked mode, none kept) so that load from other processes on a
shared machine affects them alike. Speed-ups are ratios of median times within one run.

    python benchmarks/bench_resnet.py --out benchmarks/results/resnet.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from blockdrop_env.resnet import BlockDropResNet, build_resnet

TARGETS = {"half_kept_batch256": 2.0, "half_kept_batch1": 1.7}


def time_call(fn: Callable[[], object]) -> float:
    """Seconds taken by one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def random_half_policy(batch_size: int, num_blocks: int, generator: torch.Generator) -> torch.Tensor:
    """Each sample keeps a random half of the blocks (exactly K // 2 of them)."""
    scores = torch.rand(batch_size, num_blocks, generator=generator)
    ranks = scores.argsort(dim=1).argsort(dim=1)
    return ranks < num_blocks // 2


def measure_batch(model: BlockDropResNet, batch_size: int, rounds: int, seed: int) -> dict[str, object]:
    """Median time per configuration at one batch size, with their ratios."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 3, *model.input_size, generator=generator)
    num_blocks = model.num_blocks
    ones = torch.ones(batch_size, num_blocks, dtype=torch.bool)
    zeros = torch.zeros(batch_size, num_blocks, dtype=torch.bool)
    half = random_half_policy(batch_size, num_blocks, generator)
    configs: dict[str, Callable[[], object]] = {
        "all_kept_sparse": lambda: model(x, ones, mode="sparse"),
        "half_kept_sparse": lambda: model(x, half, mode="sparse"),
        "half_kept_masked": lambda: model(x, half, mode="masked"),
        "none_kept_sparse": lambda: model(x, zeros, mode="sparse"),
    }
    times: dict[str, list[float]] = {name: [] for name in configs}
    with torch.inference_mode():
        for fn in configs.values():
            fn()  # warm-up
        for _ in range(rounds):
            for name, fn in configs.items():
                times[name].append(time_call(fn))
    median = {name: statistics.median(values) for name, values in times.items()}
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
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = build_resnet(args.arch, 10).eval()
    results = {
        "arch": args.arch,
        "num_blocks": model.num_blocks,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_count": torch.multiprocessing.cpu_count(),
        "batch256": measure_batch(model, 256, args.rounds_batch256, args.seed),
        "batch1": measure_batch(model, 1, args.rounds_batch1, args.seed),
    }
    results["targets"] = {
        "half_kept_batch256": {
            "target": TARGETS["half_kept_batch256"],
            "measured": results["batch256"]["speedup_half_vs_all"],
        },
        "half_kept_batch1": {
            "target": TARGETS["half_kept_batch1"],
            "measured": results["batch1"]["speedup_half_vs_all"],
        },
    }
    for entry in results["targets"].values():
        entry["met"] = entry["measured"] >= entry["target"]

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    for name, entry in results["targets"].items():
        status = "met" if entry["met"] else "MISSED"
        print(f"{name}: {entry['measured']:.2f}x (target {entry['target']:.1f}x) {status}")
    for key in ("batch256", "batch1"):
        row = results[key]
        print(
            f"{key}: sparse vs masked at half kept {row['speedup_sparse_vs_masked_at_half']:.2f}x, "
            f"none vs all {row['speedup_none_vs_all']:.2f}x, ideal half {row['ideal_speedup_half_vs_all']:.2f}x"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
