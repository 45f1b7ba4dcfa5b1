"""Measure the speed of the BlockDrop environments side by side and write JSON.

Compared, on a CIFAR ResNet-32 with random weights and random 32x32 images, with random actions
that keep each block with probability 0.5:

* images/s of the native vector env (one block-sparse forward for N images), a Python loop over
  the single env, and Gymnasium's ``SyncVectorEnv`` of single envs (same-step autoreset);
* the single env's ``step`` time against a bare forward of one image with the same policy;
* the Stable-Baselines3 adapter against the native vector env it wraps.

Usage::

    python benchmarks/bench_env.py --out benchmarks/results/env.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
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

TARGET_VECTOR_OVER_SINGLE = 20.0
TARGET_STEP_OVER_FORWARD = 1.15


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/env.json"))
    parser.add_argument("--depth", type=int, default=32, help="CIFAR ResNet depth (6n+2)")
    parser.add_argument("--num-envs", type=int, default=256, help="images per vector-env step")
    parser.add_argument("--vector-steps", type=int, default=4, help="timed steps per repeat")
    parser.add_argument("--single-images", type=int, default=256, help="images for the single-env loop")
    parser.add_argument("--sync-steps", type=int, default=2, help="timed SyncVectorEnv steps")
    parser.add_argument("--pairs", type=int, default=200, help="single-env steps timed against bare forwards")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of each throughput run; the best is kept")
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


def time_vector(envs: BlockDropVectorEnv, steps: int, rng: np.random.Generator) -> float:
    shape = (envs.num_envs, envs.num_blocks)
    actions = [rng.random(shape) < 0.5 for _ in range(steps)]
    start = time.perf_counter()
    for action in actions:
        envs.step(action)
    return time.perf_counter() - start


def time_adapter(adapter: SB3VecEnvAdapter, steps: int, rng: np.random.Generator) -> float:
    shape = (adapter.num_envs, adapter.env.num_blocks)
    actions = [(rng.random(shape) < 0.5).astype(np.float32) for _ in range(steps)]
    start = time.perf_counter()
    for action in actions:
        adapter.step(action)
    return time.perf_counter() - start


def time_single_loop(env: BlockDropEnv, count: int, rng: np.random.Generator) -> float:
    actions = rng.random((count, env.num_blocks)) < 0.5
    start = time.perf_counter()
    for action in actions:
        env.reset()
        env.step(action)
    return time.perf_counter() - start


def time_sync(envs: gym.vector.SyncVectorEnv, steps: int, rng: np.random.Generator) -> float:
    shape = envs.action_space.shape
    actions = [(rng.random(shape) < 0.5).astype(np.int8) for _ in range(steps)]
    start = time.perf_counter()
    for action in actions:
        envs.step(action)
    return time.perf_counter() - start


def step_versus_forward(env: BlockDropEnv, pairs: int, rng: np.random.Generator) -> dict[str, float]:
    """Median single-env ``step`` time and bare forwards of the same image, interleaved."""
    model = env.model
    step_times, sparse_times, full_times = [], [], []
    for _ in range(pairs):
        action = rng.random(env.num_blocks) < 0.5
        env.reset()
        image = env.current_image[None]
        policy = torch.from_numpy(action[None])
        start = time.perf_counter()
        env.step(action)
        step_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        with torch.inference_mode():
            model(model.preprocess(image), policy, mode="sparse").argmax(1)
        sparse_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        with torch.inference_mode():
            model(model.preprocess(image), mode="full").argmax(1)
        full_times.append(time.perf_counter() - start)
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


def run(args: argparse.Namespace) -> dict[str, Any]:
    model, dataset = make_setup(args.depth, args.num_images, args.seed)
    rng = np.random.default_rng(args.seed)
    n = args.num_envs

    vector = BlockDropVectorEnv(model, dataset, n, device=args.device)
    vector.reset(seed=args.seed)
    adapter = SB3VecEnvAdapter(BlockDropVectorEnv(model, dataset, n, device=args.device))
    adapter.seed(args.seed)
    adapter.reset()
    single = BlockDropEnv(model, dataset, device=args.device)
    single.reset(seed=args.seed)
    time_vector(vector, 1, rng)
    time_adapter(adapter, 1, rng)
    time_single_loop(single, 8, rng)

    # Interleaved repeats, so a burst of load from other processes hits every variant alike.
    vector_rates, adapter_rates, single_rates = [], [], []
    for _ in range(args.repeats):
        vector_rates.append(n * args.vector_steps / time_vector(vector, args.vector_steps, rng))
        adapter_rates.append(n * args.vector_steps / time_adapter(adapter, args.vector_steps, rng))
        single_rates.append(args.single_images / time_single_loop(single, args.single_images, rng))
    vector_rate, adapter_rate, single_rate = max(vector_rates), max(adapter_rates), max(single_rates)

    sync = gym.vector.SyncVectorEnv(
        [lambda: BlockDropEnv(model, dataset, device=args.device) for _ in range(n)],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )
    sync.reset(seed=args.seed)
    sync_rate = n * args.sync_steps / time_sync(sync, args.sync_steps, rng)

    latency = step_versus_forward(single, args.pairs, rng)
    return {
        "images_per_second": {
            "native_vector_env": vector_rate,
            "single_env_loop": single_rate,
            "sync_vector_env": sync_rate,
            "sb3_adapter": adapter_rate,
        },
        "ratios": {
            "vector_over_single_loop": vector_rate / single_rate,
            "vector_over_sync_vector_env": vector_rate / sync_rate,
            "sb3_adapter_time_over_native": vector_rate / adapter_rate,
            **{k: v for k, v in latency.items() if "_over_" in k},
        },
        "single_env_latency_ms": {k: v for k, v in latency.items() if k.endswith("_ms")},
        "targets": {
            "vector_over_single_loop": f">= {TARGET_VECTOR_OVER_SINGLE}",
            "step_over_same_policy_forward": f"<= {TARGET_STEP_OVER_FORWARD}",
        },
        "targets_met": {
            "vector_over_single_loop": vector_rate / single_rate >= TARGET_VECTOR_OVER_SINGLE,
            "step_over_same_policy_forward": latency["step_over_same_policy_forward"]
            <= TARGET_STEP_OVER_FORWARD,
        },
    }


def describe_setup(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": f"cifar_resnet{args.depth}, random weights, 10 classes",
        "data": f"{args.num_images} random uint8 images 3x32x32",
        "actions": "each block kept with probability 0.5",
        "num_envs": args.num_envs,
        "device": args.device,
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": list(os.getloadavg()),
        "torch": torch.__version__,
        "gymnasium": gym.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
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
    print(f"SB3 adapter time / native: {ratios['sb3_adapter_time_over_native']:.3f}x")
    print(f"single step {latency['step_ms']:.2f} ms vs bare forward, same policy "
          f"{latency['bare_forward_same_policy_ms']:.2f} ms "
          f"({ratios['step_over_same_policy_forward']:.3f}x, target <= {TARGET_STEP_OVER_FORWARD}x); "
          f"all blocks {latency['bare_forward_all_blocks_ms']:.2f} ms")


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    setup = describe_setup(args)
    start = time.perf_counter()
    results = {"setup": setup, **run(args)}
    results["setup"]["load_average_at_end"] = list(os.getloadavg())
    results["setup"]["wall_seconds"] = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print_summary(results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
