"""Block-sparse vs masked vs full forward speed, as a fraction of the ideal speed-up.

For each network and batch size, every sample keeps a random subset of exactly
floor(f * K) blocks for keep fractions f = 1, 0.75, 0.5, 0.25, and the configurations (full
forward, sparse and masked forward at each fraction) are timed in interleaved rounds. The ideal
speed-up of a policy is the ratio of the full network's multiply-adds to the policy's
(``model.policy_flops``). The measured speed-up is the all-kept sparse time over the sparse
time at f, and ``fraction_of_ideal`` is measured over ideal. A second table times all-zero against
all-one policies at batch 64.

With ``--experiments`` it also measures what the field uses to speed up CPU inference:
``torch.inference_mode`` vs ``torch.no_grad``, channels-last memory format, 1 vs 2 threads,
``torch.compile``, and running the samples that share one policy through their kept blocks
together (grouping) instead of gathering and scattering per block.

Random weights, random inputs, CPU. Usage::

    python benchmarks/bench_forward.py --out benchmarks/results/forward.json --experiments
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from blockdrop_env.resnet import BlockDropResNet, build_resnet
from common import finish, keep_exactly, machine_info, medians, target, time_interleaved, write_json

KEEP_FRACTIONS = (1.0, 0.75, 0.5, 0.25)
ZERO_ONE_BATCH = 64
TARGET_HALF_BATCH256 = 2.0
TARGET_HALF_BATCH1 = 1.7
TARGET_QUARTER_BATCH256 = 3.5
TARGET_ZERO_OVER_ONE = 0.2


@dataclass(frozen=True)
class ArchPlan:
    """Measurement plan for one network.

    Attributes:
        arch: Name for :func:`build_resnet`.
        rounds_by_batch: Timed rounds per batch size.
        masked_fractions: Keep fractions at which masked mode is timed too (its cost does not
            depend on the policy, so one fraction suffices for the slowest network).
        zero_one_rounds: Rounds of the all-zero vs all-one comparison; 0 skips it.
        input_size: Input (height, width); None uses the network's default.
        note: Why the plan departs from the full grid, for the summary.
    """

    arch: str
    rounds_by_batch: dict[int, int]
    masked_fractions: tuple[float, ...] = KEEP_FRACTIONS
    zero_one_rounds: int = 5
    input_size: tuple[int, int] | None = None
    note: str = ""


FULL_PLANS = (
    ArchPlan("cifar_resnet32", {256: 7, 32: 15, 1: 60}, zero_one_rounds=10),
    ArchPlan("cifar_resnet110", {256: 3, 32: 7, 1: 30}, zero_one_rounds=5),
    ArchPlan(
        "resnet101",
        {32: 3, 1: 7},
        masked_fractions=(0.5,),
        zero_one_rounds=2,
        note=(
            "224x224, batch 1 and 32 only: one full forward at batch 256 takes over a minute on "
            "2 CPU cores, so the grid would take most of an hour. Masked mode only at keep 0.5."
        ),
    ),
)
QUICK_PLANS = (
    ArchPlan("cifar_resnet8", {4: 2, 1: 2}, zero_one_rounds=2),
    ArchPlan("resnet18", {1: 1}, masked_fractions=(0.5,), zero_one_rounds=0, input_size=(32, 32)),
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/forward.json"))
    parser.add_argument("--quick", action="store_true", help="tiny networks and batches (smoke test)")
    parser.add_argument("--experiments", action="store_true", help="also time the optimisation experiments")
    parser.add_argument("--compile", action="store_true", help="include torch.compile in the experiments")
    parser.add_argument("--threads", type=int, default=None, help="torch threads; default: torch's choice")
    parser.add_argument("--channels-last", action="store_true", help="store the weights channels-last, as on CPUs")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


# ---------------------------------------------------------------------------------------------
# The grid: sparse / masked / full at each keep fraction


def build_model(plan: ArchPlan, seed: int) -> BlockDropResNet:
    """Build the plan's network with random weights, in eval mode."""
    torch.manual_seed(seed)
    return build_resnet(plan.arch, 10, input_size=plan.input_size).eval()


def kept_count(fraction: float, num_blocks: int) -> int:
    """Blocks each sample keeps at ``fraction`` (floor, as K // 2 for one half)."""
    return math.floor(fraction * num_blocks + 1e-9)


def grid_configs(
    model: BlockDropResNet, x: torch.Tensor, policies: dict[float, torch.Tensor], masked: tuple[float, ...]
) -> dict[str, Callable[[], object]]:
    """Name to call: the full forward, and sparse (and masked) forwards at each keep fraction."""
    configs: dict[str, Callable[[], object]] = {"full": lambda: model(x, mode="full")}
    for fraction, policy in policies.items():
        configs[f"sparse_keep{fraction}"] = lambda p=policy: model(x, p, mode="sparse")
        if fraction in masked:
            configs[f"masked_keep{fraction}"] = lambda p=policy: model(x, p, mode="masked")
    return configs


def measure_batch(model: BlockDropResNet, plan: ArchPlan, batch_size: int, rounds: int, seed: int) -> dict[str, Any]:
    """Median times of the grid at one batch size, with speed-ups and fractions of the ideal."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 3, *model.input_size, generator=generator)
    k = model.num_blocks
    policies = {f: keep_exactly(batch_size, k, kept_count(f, k), generator) for f in KEEP_FRACTIONS}
    with torch.inference_mode():
        times = medians(time_interleaved(grid_configs(model, x, policies, plan.masked_fractions), rounds))
    all_kept = times["sparse_keep1.0"]
    total = model.flops_table.total
    by_fraction = {}
    for fraction, policy in policies.items():
        ideal = total / model.policy_flops(policy).mean().item()
        sparse = times[f"sparse_keep{fraction}"]
        entry = {
            "kept_blocks": kept_count(fraction, k),
            "ideal_speedup": ideal,
            "sparse_ms": 1e3 * sparse,
            "speedup": all_kept / sparse,
            "speedup_vs_full": times["full"] / sparse,
            "fraction_of_ideal": all_kept / sparse / ideal,
        }
        if f"masked_keep{fraction}" in times:
            entry["masked_ms"] = 1e3 * times[f"masked_keep{fraction}"]
            entry["sparse_over_masked_speedup"] = times[f"masked_keep{fraction}"] / sparse
        by_fraction[str(fraction)] = entry
    return {"batch_size": batch_size, "rounds": rounds, "full_ms": 1e3 * times["full"], "keep": by_fraction}


def measure_zero_one(model: BlockDropResNet, batch_size: int, rounds: int) -> dict[str, Any]:
    """All-zero vs all-one policy time at one batch size (sparse mode)."""
    x = torch.randn(batch_size, 3, *model.input_size)
    ones = torch.ones(batch_size, model.num_blocks, dtype=torch.bool)
    zeros = torch.zeros_like(ones)
    configs = {"all_one": lambda: model(x, ones, mode="sparse"), "all_zero": lambda: model(x, zeros, mode="sparse")}
    with torch.inference_mode():
        times = medians(time_interleaved(configs, rounds))
    table = model.flops_table
    return {
        "batch_size": batch_size,
        "rounds": rounds,
        "all_one_ms": 1e3 * times["all_one"],
        "all_zero_ms": 1e3 * times["all_zero"],
        "zero_over_one_time": times["all_zero"] / times["all_one"],
        "zero_over_one_flops": table.fixed / table.total,
    }


def measure_arch(plan: ArchPlan, zero_one_batch: int, seed: int, channels_last: bool = False) -> dict[str, Any]:
    """Every batch size of the plan, and the all-zero vs all-one comparison."""
    model = build_model(plan, seed)
    if channels_last:
        # Inputs stay contiguous, as preprocess returns them: convolutions follow the weights.
        model.to(memory_format=torch.channels_last)
    started = time.perf_counter()
    result: dict[str, Any] = {
        "num_blocks": model.num_blocks,
        "input_size": list(model.input_size),
        "flops_total": model.flops_table.total,
        "flops_fixed": model.flops_table.fixed,
        "note": plan.note,
        "batches": {},
    }
    for batch_size, rounds in plan.rounds_by_batch.items():
        print(f"{plan.arch} batch {batch_size}: {rounds} rounds", flush=True)
        result["batches"][str(batch_size)] = measure_batch(model, plan, batch_size, rounds, seed)
    if plan.zero_one_rounds:
        result["zero_one"] = measure_zero_one(model, zero_one_batch, plan.zero_one_rounds)
    result["wall_seconds"] = time.perf_counter() - started
    return result


# ---------------------------------------------------------------------------------------------
# Targets


def forward_targets(archs: dict[str, Any]) -> list[dict[str, Any]]:
    """Speed-up targets for every network whose batch was measured."""
    targets = []
    for arch, result in archs.items():
        batches = result["batches"]
        checks = (
            ("256", "0.5", TARGET_HALF_BATCH256, "half kept, batch 256: all-kept time / half-kept time"),
            ("1", "0.5", TARGET_HALF_BATCH1, "half kept, batch 1: all-kept time / half-kept time"),
            ("256", "0.25", TARGET_QUARTER_BATCH256, "quarter kept, batch 256: all-kept time / quarter-kept time"),
        )
        for batch, fraction, threshold, text in checks:
            if batch in batches:
                measured = batches[batch]["keep"][fraction]["speedup"]
                name = f"{arch}/keep{fraction}_batch{batch}"
                targets.append(target(name, measured, threshold, ">=", f"{arch}, {text}"))
        if "zero_one" in result:
            zero_one = result["zero_one"]
            text = f"{arch}, all-zero / all-one time at batch {zero_one['batch_size']}"
            targets.append(target(f"{arch}/zero_over_one", zero_one["zero_over_one_time"], TARGET_ZERO_OVER_ONE, "<=", text))
    return targets


# ---------------------------------------------------------------------------------------------
# Experiments


def forward_grouped(model: BlockDropResNet, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Sparse forward that runs each distinct policy's samples through their kept blocks together.

    The alternative to gathering and scattering per block: one gather per distinct policy row,
    then that group's blocks run without indexing, then one scatter of the logits.
    """
    x = model.stem(x)
    patterns, group_of = torch.unique(keep, dim=0, return_inverse=True)
    if patterns.shape[0] == 1:
        return model.head(run_pattern(model, x, patterns[0].tolist()))
    logits = x.new_empty(x.shape[0], model.num_classes)
    for group, pattern in enumerate(patterns):
        index = (group_of == group).nonzero().squeeze(1)
        logits.index_copy_(0, index, model.head(run_pattern(model, x.index_select(0, index), pattern.tolist())))
    return logits


def run_pattern(model: BlockDropResNet, x: torch.Tensor, pattern: list[bool]) -> torch.Tensor:
    """Run every block on the whole batch ``x``: kept blocks fully, dropped ones as their shortcut."""
    for i, kept in enumerate(pattern):
        skip = model.shortcut(i, x)
        x = F.relu(skip + model.residual(i, x)) if kept else skip
    return x


def few_policies(batch_size: int, num_blocks: int, num_distinct: int, generator: torch.Generator) -> torch.Tensor:
    """Half-kept policies drawn from ``num_distinct`` rows, as a converged agent tends to give."""
    rows = keep_exactly(num_distinct, num_blocks, num_blocks // 2, generator)
    return rows[torch.randint(0, num_distinct, (batch_size,), generator=generator)]


def compare(configs: dict[str, Callable[[], object]], rounds: int, reference: str) -> dict[str, Any]:
    """Median ms of each configuration and the reference's time over each one's (> 1: faster)."""
    times = medians(time_interleaved(configs, rounds))
    return {
        "rounds": rounds,
        "median_ms": {name: 1e3 * t for name, t in times.items()},
        "speedup_over_" + reference: {name: times[reference] / t for name, t in times.items() if name != reference},
    }


def experiment_inference_mode(model: BlockDropResNet, x: torch.Tensor, half: torch.Tensor, rounds: int) -> dict[str, Any]:
    """``torch.inference_mode`` vs ``torch.no_grad`` around a half-kept sparse forward."""

    def under(context: Callable[[], Any]) -> Callable[[], object]:
        def call() -> object:
            with context():
                return model(x, half, mode="sparse")

        return call

    configs = {"no_grad": under(torch.no_grad), "inference_mode": under(torch.inference_mode)}
    return compare(configs, rounds, "no_grad")


def experiment_channels_last(model: BlockDropResNet, x: torch.Tensor, half: torch.Tensor, rounds: int) -> dict[str, Any]:
    """Channels-last weights and input vs the default contiguous layout (full and half kept)."""
    last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x_last = x.contiguous(memory_format=torch.channels_last)
    configs = {
        "full_contiguous": lambda: model(x, mode="full"),
        "full_channels_last": lambda: last(x_last, mode="full"),
        "half_contiguous": lambda: model(x, half, mode="sparse"),
        "half_channels_last": lambda: last(x_last, half, mode="sparse"),
    }
    with torch.inference_mode():
        result = compare(configs, rounds, "full_contiguous")
    ms = result["median_ms"]
    result["channels_last_speedup"] = {
        "full": ms["full_contiguous"] / ms["full_channels_last"],
        "half_kept": ms["half_contiguous"] / ms["half_channels_last"],
    }
    return result


def forward_index_select(model: BlockDropResNet, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Run the sparse forward as first written: ``index_select`` for both gathers, a fresh ReLU output.

    ``BlockDropResNet`` now gathers once by indexing (which keeps a channels-last layout) and adds
    the shortcut in place; this copy measures what that change is worth.
    """
    counts = keep.sum(dim=0).tolist()
    x = model.stem(x)
    for i in range(model.num_blocks):
        if counts[i] == x.shape[0]:
            x = F.relu(model.shortcut(i, x) + model.residual(i, x))
            continue
        skip = model.shortcut(i, x)
        if counts[i] == 0:
            x = skip
            continue
        index = keep[:, i].nonzero().squeeze(1)
        kept = F.relu(skip.index_select(0, index) + model.residual(i, x.index_select(0, index)))
        x = skip.index_copy(0, index, kept)
    return model.head(x)


def experiment_gather(model: BlockDropResNet, x: torch.Tensor, half: torch.Tensor, rounds: int) -> dict[str, Any]:
    """Time the current half-kept sparse forward against the first one, in both memory layouts."""
    last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x_last = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        if not torch.allclose(forward_index_select(model, x, half), model(x, half, mode="sparse"), rtol=1e-4, atol=1e-4):
            raise RuntimeError("the index_select forward disagrees with the sparse forward; the experiment is wrong")
        configs = {
            "index_select_contiguous": lambda: forward_index_select(model, x, half),
            "current_contiguous": lambda: model(x, half, mode="sparse"),
            "index_select_channels_last": lambda: forward_index_select(last, x_last, half),
            "current_channels_last": lambda: last(x_last, half, mode="sparse"),
        }
        result = compare(configs, rounds, "index_select_contiguous")
    ms = result["median_ms"]
    result["current_speedup"] = {
        "contiguous": ms["index_select_contiguous"] / ms["current_contiguous"],
        "channels_last": ms["index_select_channels_last"] / ms["current_channels_last"],
    }
    return result


def experiment_threads(model: BlockDropResNet, x: torch.Tensor, half: torch.Tensor, rounds: int) -> dict[str, Any]:
    """1 vs 2 intra-op threads for a half-kept sparse forward."""
    default = torch.get_num_threads()

    def with_threads(count: int) -> Callable[[], object]:
        def call() -> object:
            torch.set_num_threads(count)
            try:
                return model(x, half, mode="sparse")
            finally:
                torch.set_num_threads(default)

        return call

    with torch.inference_mode():
        return compare({"threads_1": with_threads(1), "threads_2": with_threads(2)}, rounds, "threads_1")


def experiment_grouping(model: BlockDropResNet, batch_size: int, rounds: int, seed: int) -> dict[str, Any]:
    """Grouping by identical policy vs per-block gather/scatter, with random and few distinct policies."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 3, *model.input_size, generator=generator)
    k = model.num_blocks
    random_half = keep_exactly(batch_size, k, k // 2, generator)
    four = few_policies(batch_size, k, 4, generator)
    with torch.inference_mode():
        for policy in (random_half, four):
            expected = model(x, policy, mode="sparse")
            if not torch.allclose(forward_grouped(model, x, policy), expected, rtol=1e-4, atol=1e-4):
                raise RuntimeError("grouped forward disagrees with the sparse forward; the experiment is wrong")
        configs = {
            "sparse_random": lambda: model(x, random_half, mode="sparse"),
            "grouped_random": lambda: forward_grouped(model, x, random_half),
            "sparse_4_policies": lambda: model(x, four, mode="sparse"),
            "grouped_4_policies": lambda: forward_grouped(model, x, four),
        }
        result = compare(configs, rounds, "sparse_random")
    ms = result["median_ms"]
    result["batch_size"] = batch_size
    result["grouped_speedup"] = {
        "random_policies": ms["sparse_random"] / ms["grouped_random"],
        "4_distinct_policies": ms["sparse_4_policies"] / ms["grouped_4_policies"],
    }
    return result


def experiment_compile(model: BlockDropResNet, x: torch.Tensor, half: torch.Tensor, rounds: int) -> dict[str, Any]:
    """``torch.compile`` of the full and the half-kept sparse forward: compile time and speed."""
    compiled = torch.compile(copy.deepcopy(model))
    started = time.perf_counter()
    try:
        with torch.inference_mode():
            compiled(x, mode="full")
            compile_full = time.perf_counter() - started
            compiled(x, half, mode="sparse")
            compile_sparse = time.perf_counter() - started - compile_full
            configs = {
                "eager_full": lambda: model(x, mode="full"),
                "compiled_full": lambda: compiled(x, mode="full"),
                "eager_half": lambda: model(x, half, mode="sparse"),
                "compiled_half": lambda: compiled(x, half, mode="sparse"),
            }
            result = compare(configs, rounds, "eager_full")
    except Exception as error:  # inductor raises many types when a C++ compiler or feature is missing
        return {"status": "failed", "error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}",
                "seconds_before_failure": time.perf_counter() - started}
    ms = result["median_ms"]
    result["status"] = "ok"
    result["compile_seconds"] = {"full": compile_full, "sparse_half_fixed_policy": compile_sparse}
    result["compiled_speedup"] = {
        "full": ms["eager_full"] / ms["compiled_full"],
        "half_kept": ms["eager_half"] / ms["compiled_half"],
    }
    return result


def run_experiments(quick: bool, with_compile: bool, seed: int) -> dict[str, Any]:
    """All experiments on a CIFAR ResNet-32 (ResNet-8 in quick mode)."""
    plan = QUICK_PLANS[0] if quick else FULL_PLANS[0]
    model = build_model(plan, seed)
    big, small = (4, 1) if quick else (256, 1)
    rounds_big, rounds_small = (1, 1) if quick else (5, 40)
    generator = torch.Generator().manual_seed(seed)
    results: dict[str, Any] = {"arch": plan.arch}
    for batch_size, rounds in ((big, rounds_big), (small, rounds_small)):
        x = torch.randn(batch_size, 3, *model.input_size, generator=generator)
        half = keep_exactly(batch_size, model.num_blocks, model.num_blocks // 2, generator)
        print(f"experiments at batch {batch_size}", flush=True)
        results[f"batch{batch_size}"] = {
            "inference_mode": experiment_inference_mode(model, x, half, rounds),
            "channels_last": experiment_channels_last(model, x, half, rounds),
            "gather": experiment_gather(model, x, half, rounds),
            "threads": experiment_threads(model, x, half, rounds),
        }
    for batch_size in (4,) if quick else (8, 32):
        results[f"grouping_batch{batch_size}"] = experiment_grouping(model, batch_size, 1 if quick else 20, seed)
    if with_compile:
        x = torch.randn(32, 3, *model.input_size, generator=generator)
        half = keep_exactly(32, model.num_blocks, model.num_blocks // 2, generator)
        print("experiments: torch.compile at batch 32", flush=True)
        results["compile_batch32"] = experiment_compile(model, x, half, 2 if quick else 10)
    else:
        results["compile_batch32"] = {"status": "skipped", "error": "run with --compile"}
    return results


# ---------------------------------------------------------------------------------------------


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    plans = QUICK_PLANS if args.quick else FULL_PLANS
    zero_one_batch = 4 if args.quick else ZERO_ONE_BATCH
    result: dict[str, Any] = {
        "benchmark": "forward",
        "setup": {
            **machine_info(),
            "quick": args.quick,
            "keep_fractions": list(KEEP_FRACTIONS),
            "layout": "channels_last" if args.channels_last else "contiguous",
        },
        "archs": {plan.arch: measure_arch(plan, zero_one_batch, args.seed, args.channels_last) for plan in plans},
    }
    result["targets"] = forward_targets(result["archs"])
    if args.experiments:
        result["experiments"] = run_experiments(args.quick, args.compile, args.seed)
    write_json(args.out, finish(result, started))
    print_summary(result)


def print_summary(result: dict[str, Any]) -> None:
    for arch, entry in result["archs"].items():
        for batch, row in entry["batches"].items():
            cells = ", ".join(
                f"keep {f}: {v['speedup']:.2f}x of ideal {v['ideal_speedup']:.2f}x ({v['fraction_of_ideal']:.0%})"
                for f, v in row["keep"].items()
            )
            print(f"{arch} batch {batch}: {cells}")
    for entry in result["targets"]:
        verdict = "met" if entry["met"] else "MISSED"
        print(f"{entry['name']}: {entry['measured']:.3f} ({entry['comparison']} {entry['target']}) {verdict}")


if __name__ == "__main__":
    main()
