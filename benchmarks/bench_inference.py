"""Batch-1 latency of the policy network plus the kept blocks against the full ResNet.

Each round takes the next image and times, side by side, (a) the agent: the policy network's
forward, the thresholded policy and the block-sparse ResNet forward, and (b) the full ResNet
forward of the same image. The latency speed-up (median full / median agent) is compared
with the FLOPs speed-up, the full network's multiply-adds over the policy network's plus the
kept blocks' (mean over the images timed). Target: latency speed-up >= 0.8x the FLOPs speed-up.

Two sources of policies:

* ``--keep-rate R`` (default 0.6): a policy network with random weights runs (its cost counts),
  and each image keeps round(R * K) blocks chosen at random; random images.
* ``--checkpoint RUN_OR_FILE``: a trained agent (``blockdrop train`` run directory or .pt file)
  decides on real test images of the dataset named in the run's config.json.

Usage::

    python benchmarks/bench_inference.py --out benchmarks/results/inference.json
    python benchmarks/bench_inference.py --checkpoint runs/cifar10-agent
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from agents.agent_checkpoint import agent_policy_fn, load_agent, resolve_agent_path
from agents.policy import PolicyConfig, PolicyNetwork
from blockdrop_env.data import load_dataset
from blockdrop_env.resnet import BlockDropResNet, build_resnet, prefer_channels_last
from common import count_macs, finish, keep_exactly, machine_info, medians, target, time_interleaved, write_json

TARGET_LATENCY_OVER_FLOPS = 0.8
WARMUP_ROUNDS = 3

PolicyFn = Callable[[torch.Tensor], torch.Tensor]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/inference.json"))
    parser.add_argument("--arch", default="cifar_resnet110", help="ResNet of the --keep-rate mode")
    parser.add_argument("--keep-rate", type=float, default=0.6, help="fraction of blocks each image keeps")
    parser.add_argument("--checkpoint", default=None, help="trained agent: run directory or .pt file")
    parser.add_argument("--dataset", default=None, help="dataset of the test images; default: the run's")
    parser.add_argument("--data-dir", default=None, help="dataset root; default: the run's")
    parser.add_argument("--num-images", type=int, default=200, help="distinct images cycled through")
    parser.add_argument("--rounds", type=int, default=200, help="timed rounds, one image each")
    parser.add_argument("--threads", type=int, default=None, help="torch threads; default: torch's choice")
    parser.add_argument("--quick", action="store_true", help="tiny network and few rounds (smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 0.0 <= args.keep_rate <= 1.0:
        parser.error(f"--keep-rate must be in [0, 1], got {args.keep_rate}")
    if args.num_images < 1 or args.rounds < 1:
        parser.error("--num-images and --rounds must be positive")
    return args


# ---------------------------------------------------------------------------------------------
# The two sources of policies


def random_setup(args: argparse.Namespace) -> tuple[BlockDropResNet, PolicyNetwork, torch.Tensor, PolicyFn, dict[str, Any]]:
    """Random-weight ResNet and policy network, random images, fixed-rate random policies."""
    torch.manual_seed(args.seed)
    model = build_resnet(args.arch, 10).eval()
    policy_net = PolicyNetwork(PolicyConfig.for_images(model.num_blocks, model.input_size)).eval()
    generator = torch.Generator().manual_seed(args.seed)
    images = torch.randint(0, 256, (args.num_images, 3, *model.input_size), dtype=torch.uint8, generator=generator)
    num_kept = round(args.keep_rate * model.num_blocks)
    decisions = iter(keep_exactly(args.rounds + WARMUP_ROUNDS, model.num_blocks, num_kept, generator))

    def policy_fn(image: torch.Tensor) -> torch.Tensor:
        # The network runs so that its latency counts; its output is replaced by the fixed rate.
        policy_net(image)
        return next(decisions)[None]

    source = {"mode": "keep_rate", "keep_rate": args.keep_rate, "kept_blocks": num_kept, "arch": args.arch,
              "images": "random uint8"}
    return model, policy_net, images, policy_fn, source


def checkpoint_setup(args: argparse.Namespace) -> tuple[BlockDropResNet, PolicyNetwork, torch.Tensor, PolicyFn, dict[str, Any]]:
    """A trained agent's networks and real test images of its run's dataset."""
    path = resolve_agent_path(args.checkpoint)
    policy_net, loaded, info = load_agent(path)
    config_path = path.parent / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    dataset_name = args.dataset or config.get("dataset")
    if dataset_name is None:
        raise SystemExit(f"{config_path} not found; pass --dataset (and --data-dir) for the test images")
    data = load_dataset(dataset_name, args.data_dir or config.get("data_dir") or None, "test")
    generator = torch.Generator().manual_seed(args.seed)
    index = torch.randperm(len(data), generator=generator)[: args.num_images]
    source = {"mode": "checkpoint", "checkpoint": str(path), "num_controlled": info.num_controlled,
              "dataset": data.name, "images": f"{index.numel()} random test images"}
    return loaded.model, policy_net, data.images[index], agent_policy_fn(policy_net, info.num_controlled), source


# ---------------------------------------------------------------------------------------------


def measure(model: BlockDropResNet, policy_fn: PolicyFn, images: torch.Tensor, rounds: int) -> tuple[dict[str, float], torch.Tensor]:
    """Median seconds of the agent and of the full network, and the policies the agent used."""
    position = {"agent": 0, "full": 0}
    used: list[torch.Tensor] = []

    def next_image(name: str) -> torch.Tensor:
        image = images[position[name] % images.shape[0]][None]
        position[name] += 1
        return image

    def agent() -> object:
        image = next_image("agent")
        policy = policy_fn(image)
        used.append(policy.cpu())
        return model(model.preprocess(image), policy, mode="sparse").argmax(1)

    def full() -> object:
        return model(model.preprocess(next_image("full")), mode="full").argmax(1)

    with torch.inference_mode():
        times = medians(time_interleaved({"agent": agent, "full": full}, rounds, warmup=WARMUP_ROUNDS))
    return times, torch.cat(used[WARMUP_ROUNDS:])


def main() -> None:
    args = parse_args()
    if args.quick:
        args.arch, args.num_images, args.rounds = "cifar_resnet8", 4, 3
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    setup = checkpoint_setup if args.checkpoint else random_setup
    model, policy_net, images, policy_fn, source = setup(args)
    # The layout the env and evaluate_policy run the ResNet in; agent_policy_fn sets the policy network's.
    model = prefer_channels_last(model, "cpu")

    times, policies = measure(model, policy_fn, images, args.rounds)
    policy_macs = count_macs(policy_net.eval(), images[:1])
    kept_macs = model.policy_flops(policies).mean().item()
    total = model.flops_table.total
    flops_speedup = total / (policy_macs + kept_macs)
    latency_speedup = times["full"] / times["agent"]
    result: dict[str, Any] = {
        "benchmark": "inference",
        "setup": {**machine_info(), "quick": args.quick, "rounds": args.rounds, **source},
        "latency_ms": {"agent": 1e3 * times["agent"], "full": 1e3 * times["full"]},
        "flops": {"full": total, "policy_network": policy_macs, "kept_resnet_mean": kept_macs},
        "blocks_kept_mean": policies.float().sum(dim=1).mean().item(),
        "num_blocks": model.num_blocks,
        "latency_speedup": latency_speedup,
        "flops_speedup": flops_speedup,
        "flops_speedup_resnet_only": total / kept_macs,
        "latency_over_flops_speedup": latency_speedup / flops_speedup,
    }
    result["targets"] = [
        target("latency_over_flops_speedup", result["latency_over_flops_speedup"], TARGET_LATENCY_OVER_FLOPS, ">=",
               f"batch-1 latency speed-up / FLOPs speed-up (policy network included), {model.num_blocks}-block ResNet")
    ]
    write_json(args.out, finish(result, started))
    print(f"agent {result['latency_ms']['agent']:.2f} ms vs full {result['latency_ms']['full']:.2f} ms: "
          f"latency {latency_speedup:.2f}x, FLOPs {flops_speedup:.2f}x, ratio {result['latency_over_flops_speedup']:.2f}")


if __name__ == "__main__":
    main()
