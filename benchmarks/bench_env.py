"""Measure the speed of the BlockDrop environments side by side and write JSON.

Compared, on a CIFAR ResNet-32 with random weights and random 32x32 images, with random actions
that keep each block with probability 0.5:

* images/s of the native vector env (one block-sparse forward for N images), a Python loop over
  the single env, and Gymnasium's ``SyncVectorEnv`` of single envs (same-step autoreset);
* the single env's ``step`` time against a bare forward of one image with the same policy;
* the Stable-Baselines3 adapter against the native vector env it wraps.

The throughput runs are timed in interleaved rounds and compared by their medians.

Usage::

    python benchmarks/bench_env.py --out benchmarks/results/env.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from blockdrop_env.data import ImageDataset
from blockdrop_env.env import BlockDropEnv
from blockdrop_env.resnet import BlockDropResNet, build_resnet
from blockdrop_env.sb3 import SB3VecEnvAdapter
from blockdrop_env.vector_env import BlockDropVectorEnv
from common import machine_info, medians, target, time_call, time_interleaved, write_json

TARGET_VECTOR_OVER_SINGLE = 20.0
TARGET_STEP_OVER_FORWARD = 1.15
TARGET_ADAPTER_OVERHEAD = 1.05


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/env.json"))
    parser.add_argument("--depth", type=int, default=32, help="CIFAR ResNet depth (6n+2)")
    parser.add_argument("--num-envs", type=int, default=256, help="images per vector-env step")
    parser.add_argument("--vector-steps", type=int, default=4, help="vector-env steps per timed call")
    parser.add_argument("--single-images", type=int, default=256, help="images per timed single-env loop")
    parser.add_argument("--sync-steps", type=int, default=1, help="SyncVectorEnv steps per timed call")
    parser.add_argument("--pairs", type=int, default=200, help="single-env steps timed against bare forwards")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the throughput runs; medians are kept")
    parser.add_argument("--quick", action="store_true", help="tiny network and batches (smoke test)")
    parser.add_argument("--num-images", type=int, default=2048, help="size of the random dataset")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads; default: torch's choice")
    return parser.parse_args()


def make_setup(depth: int, num_images: int, seed: int) -> tuple[BlockDropResNet, ImageDataset]:
    torch.manual_seed(seed)
    model = build_resnet(f"cifar_resnet{depth}", 10).eval()
    images = torch.randint(0, 256, (num_images, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (num_images,))
    return model, ImageDataset(images, labels, [str(i) for i in range(10)], "random")


def vector_call(envs: BlockDropVectorEnv, steps: int, rng: np.random.Generator) -> Callable[[], object]:
    """Call that runs ``steps`` vector-env steps with random actions."""
    shape = (envs.num_envs, envs.num_blocks)

    def call() -> None:
        for _ in range(steps):
            envs.step(rng.random(shape) < 0.5)

    return call


def adapter_call(adapter: SB3VecEnvAdapter, steps: int, rng: np.random.Generator) -> Callable[[], object]:
    """Call that runs ``steps`` SB3 adapter steps with random float actions, as SB3 passes them."""
    shape = (adapter.num_envs, adapter.env.num_blocks)

    def call() -> None:
        for _ in range(steps):
            adapter.step((rng.random(shape) < 0.5).astype(np.float32))

    return call


def single_loop_call(env: BlockDropEnv, count: int, rng: np.random.Generator) -> Callable[[], object]:
    """Call that runs ``count`` one-step episodes of the single env in a Python loop."""

    def call() -> None:
        for action in rng.random((count, env.num_blocks)) < 0.5:
            env.reset()
            env.step(action)

    return call


def sync_call(envs: gym.vector.SyncVectorEnv, steps: int, rng: np.random.Generator) -> Callable[[], object]:
    """Call that runs ``steps`` steps of Gymnasium's SyncVectorEnv of single envs."""
    shape = envs.action_space.shape

    def call() -> None:
        for _ in range(steps):
            envs.step((rng.random(shape) < 0.5).astype(np.int8))

    return call


def bare_forward_call(model: BlockDropResNet, dataset: ImageDataset, batch_size: int, count: int,
                      rng: np.random.Generator) -> Callable[[], object]:
    """Call that classifies ``count`` images by bare sparse forwards of ``batch_size`` images.

    The same work as the envs without any env: at batch N and at batch 1 it bounds what the
    vector env and the single-env loop can reach, so their ratio is the gain batching allows.
    """
    images = dataset.images[:count]

    def call() -> None:
        with torch.inference_mode():
            for start in range(0, count, batch_size):
                batch = images[start : start + batch_size]
                policy = torch.from_numpy(rng.random((batch.shape[0], model.num_blocks)) < 0.5)
                model(model.preprocess(batch), policy, mode="sparse").argmax(1)

    return call


def step_versus_forward(env: BlockDropEnv, pairs: int, rng: np.random.Generator) -> dict[str, float]:
    """Median single-env ``step`` time and bare forwards of the same image, interleaved."""
    model = env.model
    step_times, sparse_times, full_times = [], [], []
    for _ in range(pairs):
        action = rng.random(env.num_blocks) < 0.5
        env.reset()
        image = env.current_image[None]
        policy = torch.from_numpy(action[None])
        step_times.append(time_call(lambda: env.step(action)))
        with torch.inference_mode():
            sparse_times.append(time_call(lambda: model(model.preprocess(image), policy, mode="sparse").argmax(1)))
            full_times.append(time_call(lambda: model(model.preprocess(image), mode="full").argmax(1)))
    step = statistics.median(step_times)
    sparse = statistics.median(sparse_times)
    full = statistics.median(full_times)
    return {
        "step_ms": 1e3 * step,
        "bare_forward_same_policy_ms": 1e3 * sparse,
        "bare_forward_all_blocks_ms": 1e3 * full,
        "step_over_same_policy_forward": step / sparse,
        "step_over_all_blocks_forward": step / full,
    }


def build_envs(args: argparse.Namespace) -> tuple[BlockDropVectorEnv, SB3VecEnvAdapter, BlockDropEnv, gym.vector.SyncVectorEnv]:
    """The native vector env, the SB3 adapter around a second one, a single env and a SyncVectorEnv."""
    model, dataset = make_setup(args.depth, args.num_images, args.seed)
    n = args.num_envs
    vector = BlockDropVectorEnv(model, dataset, n, device=args.device)
    vector.reset(seed=args.seed)
    adapter = SB3VecEnvAdapter(BlockDropVectorEnv(model, dataset, n, device=args.device))
    adapter.seed(args.seed)
    adapter.reset()
    single = BlockDropEnv(model, dataset, device=args.device)
    single.reset(seed=args.seed)
    sync = gym.vector.SyncVectorEnv(
        [lambda: BlockDropEnv(model, dataset, device=args.device) for _ in range(n)],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )
    sync.reset(seed=args.seed)
    return vector, adapter, single, sync


def run(args: argparse.Namespace) -> dict[str, Any]:
    vector, adapter, single, sync = build_envs(args)
    rng = np.random.default_rng(args.seed)
    n = args.num_envs
    images_per_call = {
        "native_vector_env": n * args.vector_steps,
        "sb3_adapter": n * args.vector_steps,
        "single_env_loop": args.single_images,
        "sync_vector_env": n * args.sync_steps,
        "bare_forward_batch_n": n * args.vector_steps,
        "bare_forward_batch_1": args.single_images,
    }
    model, dataset = vector.model, vector.dataset
    configs = {
        "native_vector_env": vector_call(vector, args.vector_steps, rng),
        "sb3_adapter": adapter_call(adapter, args.vector_steps, rng),
        "single_env_loop": single_loop_call(single, args.single_images, rng),
        "sync_vector_env": sync_call(sync, args.sync_steps, rng),
        "bare_forward_batch_n": bare_forward_call(model, dataset, n, n * args.vector_steps, rng),
        "bare_forward_batch_1": bare_forward_call(model, dataset, 1, args.single_images, rng),
    }
    median = medians(time_interleaved(configs, args.rounds))
    rates = {name: images_per_call[name] / seconds for name, seconds in median.items()}
    vector_rate = rates["native_vector_env"]

    latency = step_versus_forward(single, args.pairs, rng)
    ratios = {
        "vector_over_single_loop": vector_rate / rates["single_env_loop"],
        "vector_over_sync_vector_env": vector_rate / rates["sync_vector_env"],
        "bare_batch_n_over_batch_1": rates["bare_forward_batch_n"] / rates["bare_forward_batch_1"],
        "vector_over_bare_batch_n": vector_rate / rates["bare_forward_batch_n"],
        "single_loop_over_bare_batch_1": rates["single_env_loop"] / rates["bare_forward_batch_1"],
        "sb3_adapter_time_over_native": vector_rate / rates["sb3_adapter"],
        **{k: v for k, v in latency.items() if "_over_" in k},
    }
    return {
        "images_per_second": rates,
        "ratios": ratios,
        "single_env_latency_ms": {k: v for k, v in latency.items() if k.endswith("_ms")},
        "targets": [
            target("vector_over_single_loop", ratios["vector_over_single_loop"], TARGET_VECTOR_OVER_SINGLE, ">=",
                   f"native vector env images/s over a single-env loop, N={n}"),
            target("sb3_adapter_time_over_native", ratios["sb3_adapter_time_over_native"], TARGET_ADAPTER_OVERHEAD,
                   "<=", f"SB3 adapter step time / native vector env step time, N={n}"),
            target("step_over_same_policy_forward", ratios["step_over_same_policy_forward"], TARGET_STEP_OVER_FORWARD,
                   "<=", "single-env step time / bare batch-1 forward with the same policy"),
        ],
    }


def describe_setup(args: argparse.Namespace) -> dict[str, Any]:
    return {
        **machine_info(),
        "quick": args.quick,
        "model": f"cifar_resnet{args.depth}, random weights, 10 classes",
        "data": f"{args.num_images} random uint8 images 3x32x32",
        "actions": "each block kept with probability 0.5",
        "num_envs": args.num_envs,
        "device": args.device,
        "gymnasium": gym.__version__,
        "arguments": {k: str(v) for k, v in vars(args).items()},
    }


def print_summary(results: dict[str, Any]) -> None:
    rates = results["images_per_second"]
    ratios = results["ratios"]
    latency = results["single_env_latency_ms"]
    print(f"threads: {results['setup']['torch_num_threads']}, load average at start: "
          f"{results['setup']['load_average_at_start']}")
    for name, rate in rates.items():
        print(f"{name:>20}: {rate:10.1f} images/s")
    print(f"vector / single loop: {ratios['vector_over_single_loop']:.1f}x "
          f"(target >= {TARGET_VECTOR_OVER_SINGLE}x)")
    print(f"vector / SyncVectorEnv: {ratios['vector_over_sync_vector_env']:.1f}x")
    print(f"bare forward batch N / batch 1: {ratios['bare_batch_n_over_batch_1']:.1f}x (the most batching can give); "
          f"vector env at {ratios['vector_over_bare_batch_n']:.0%} of the bare batch-N rate, single loop at "
          f"{ratios['single_loop_over_bare_batch_1']:.0%} of the bare batch-1 rate")
    print(f"SB3 adapter time / native: {ratios['sb3_adapter_time_over_native']:.3f}x")
    print(f"single step {latency['step_ms']:.2f} ms vs bare forward, same policy "
          f"{latency['bare_forward_same_policy_ms']:.2f} ms "
          f"({ratios['step_over_same_policy_forward']:.3f}x, target <= {TARGET_STEP_OVER_FORWARD}x); "
          f"all blocks {latency['bare_forward_all_blocks_ms']:.2f} ms")


def main() -> None:
    args = parse_args()
    if args.quick:
        args.depth, args.num_envs, args.vector_steps = 8, 8, 1
        args.single_images, args.pairs, args.rounds, args.num_images = 8, 3, 2, 64
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results = {"benchmark": "env", "setup": describe_setup(args), **run(args)}
    results["setup"]["load_average_at_end"] = list(os.getloadavg())
    results["setup"]["wall_seconds"] = time.perf_counter() - start
    write_json(args.out, results)
    print_summary(results)


if __name__ == "__main__":
    main()
