"""Training speed of the REINFORCE agent next to the ResNet forwards it cannot avoid.

A curriculum REINFORCE step with all K blocks controlled runs the policy network forward and
backward, plus two block-sparse ResNet forwards through the env (the thresholded baseline via
``score_actions`` and the sampled policy via ``step``). The reference is the time of two plain
full ResNet forwards on the same batch, the least any self-critical REINFORCE step spends on
the ResNet. The joint fine-tuning step adds a masked ResNet forward and backward.

The parts are also timed on their own (policy network forward and backward, the env's sparse
ResNet forwards, the masked ResNet forward and backward), and ``breakdown`` gives each part's
share of a step's median time.

Configurations are timed in interleaved rounds in one process, so that load from other
processes on a shared machine affects them alike. CIFAR ResNet-32 with random weights, random
32x32 images, 10 classes.

    python benchmarks/bench_training.py --out benchmarks/results/training.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from agents.finetune import FinetuneConfig, JointFinetuner
from agents.policy import controlled_mask, threshold_policy
from agents.reinforce import CurriculumTrainer, RolloutStats, TrainConfig, policy_gradient_loss, sample_actions
from blockdrop_env.data import ImageDataset
from blockdrop_env.resnet import build_resnet
from common import finish, machine_info, medians, time_interleaved, write_json


def random_dataset(count: int, num_classes: int, seed: int) -> ImageDataset:
    """Random uint8 32x32 images with random labels."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, num_classes, (count,), generator=generator)
    return ImageDataset(images, labels, [str(i) for i in range(num_classes)], "random")


def build_trainers(arch: str, batch_size: int, device: str, work_dir: Path) -> tuple[CurriculumTrainer, JointFinetuner]:
    """Build a curriculum trainer controlling all blocks and a joint fine-tuner on a second ResNet."""
    torch.manual_seed(0)
    model = build_resnet(arch, 10).eval()
    data = random_dataset(4 * batch_size, 10, seed=0)
    train_config = TrainConfig(run_dir=str(work_dir / "train"), batch_size=batch_size, epochs_per_stage=0, device=device)
    trainer = CurriculumTrainer(train_config, model, data, data)

    torch.manual_seed(0)
    tuned = build_resnet(arch, 10).eval()
    finetune_config = FinetuneConfig(
        from_run="unused", run_dir=str(work_dir / "finetune"), batch_size=batch_size, penalty=10.0, device=device
    )
    finetuner = JointFinetuner(finetune_config, trainer.policy, tuned, data, data)
    for runner in (trainer, finetuner):
        runner.env.reset(seed=0)
        runner.policy.train()
    return trainer, finetuner


def part_configs(trainer: CurriculumTrainer, finetuner: JointFinetuner) -> dict[str, Callable[[], object]]:
    """The pieces of a training step, each timed on its own.

    ``policy_forward_backward`` is the policy network's forward, sampling, the REINFORCE loss and
    its backward pass, with a fixed advantage and no optimiser step; ``env_resnet_forwards`` is
    the env's two block-sparse forwards (``score_actions`` and ``step``) for a fixed sampled
    policy; ``finetune_resnet_masked`` is the fine-tuning step's masked forward, cross-entropy and
    backward pass through the ResNet in train mode.
    """
    env = trainer.env
    mask = controlled_mask(env.num_blocks, env.num_controlled, env.current_images.device)
    with torch.no_grad():
        probs = trainer.policy(env.current_images)
    actions = sample_actions(probs, trainer.config.alpha, mask)
    greedy = threshold_policy(probs, mask)
    advantages = torch.randn(actions.shape[0])
    tuned = finetuner.env.model

    def policy_part() -> None:
        step_probs = trainer.policy(env.current_images)
        step_actions = sample_actions(step_probs, trainer.config.alpha, mask)
        loss = policy_gradient_loss(step_probs, step_actions, advantages, mask, trainer.config.alpha, trainer.config.beta)
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.total.backward()

    def env_part() -> None:
        env.score_actions(greedy)
        env.step(actions)

    def masked_part() -> None:
        tuned.train()
        images = finetuner.env.current_images
        logits = tuned(tuned.preprocess(images), actions, mode="masked")
        finetuner.optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(logits, finetuner.env.current_labels).backward()
        tuned.eval()

    return {"policy_forward_backward": policy_part, "env_resnet_forwards": env_part, "finetune_resnet_masked": masked_part}


def measure(arch: str, batch_size: int, rounds: int, device: str) -> dict[str, Any]:
    """Median seconds per batch of the steps and their parts, and the derived images per second."""
    with tempfile.TemporaryDirectory() as work_dir:
        trainer, finetuner = build_trainers(arch, batch_size, device, Path(work_dir))
        model = trainer.env.model
        images = trainer.env.current_images

        def two_forwards() -> None:
            with torch.inference_mode():
                x = model.preprocess(images)
                model(x, mode="full")
                model(x, mode="full")

        reinforce_stats = RolloutStats()
        configs: dict[str, Callable[[], object]] = {
            "reinforce_step": lambda: trainer.train_step(reinforce_stats),
            "two_resnet_forwards": two_forwards,
            "finetune_step": lambda: finetuner.train_step(RolloutStats()),
            **part_configs(trainer, finetuner),
        }
        synchronize = torch.cuda.synchronize if device == "cuda" else None
        median = medians(time_interleaved(configs, rounds, synchronize=synchronize))

    return {
        "batch_size": batch_size,
        "rounds": rounds,
        "num_blocks": model.num_blocks,
        "median_seconds": median,
        "images_per_second": {name: batch_size / t for name, t in median.items()},
        "reinforce_step_vs_two_forwards": median["reinforce_step"] / median["two_resnet_forwards"],
        "breakdown": breakdown(median),
        # The env's forwards are block-sparse, so the REINFORCE step gets cheaper as the
        # sampled and thresholded policies drop blocks; this is the sampled policies' mean.
        "reinforce_sampled_blocks_mean": reinforce_stats.metrics()["train/blocks_mean"],
    }


def breakdown(median: dict[str, float]) -> dict[str, dict[str, float]]:
    """Share of each step's time spent in the parts timed separately (the rest: bookkeeping)."""
    policy, env = median["policy_forward_backward"], median["env_resnet_forwards"]
    reinforce, finetune = median["reinforce_step"], median["finetune_step"]
    return {
        "reinforce_step": {
            "policy_forward_backward": policy / reinforce,
            "resnet_sparse_forwards": env / reinforce,
            "other": 1.0 - (policy + env) / reinforce,
        },
        "finetune_step": {
            "policy_forward_backward": policy / finetune,
            "resnet_sparse_forwards": env / finetune,
            "resnet_masked_forward_backward": median["finetune_resnet_masked"] / finetune,
            "other": 1.0 - (policy + env + median["finetune_resnet_masked"]) / finetune,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="cifar_resnet32")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="tiny network and batch (smoke test)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/training.json"))
    args = parser.parse_args()
    if args.quick:
        args.arch, args.batch_size, args.rounds = "cifar_resnet8", 8, 2

    warnings.simplefilter("ignore", UserWarning)
    started = time.perf_counter()
    result = {
        "benchmark": "training",
        "setup": {**machine_info(), "quick": args.quick, "arch": args.arch, "device": args.device},
        **measure(args.arch, args.batch_size, args.rounds, args.device),
    }
    write_json(args.out, finish(result, started))
    rates = result["images_per_second"]
    print(", ".join(f"{name} {rate:.0f} images/s" for name, rate in rates.items()))
    for step, shares in result["breakdown"].items():
        print(f"{step}: " + ", ".join(f"{part} {share:.0%}" for part, share in shares.items()))


if __name__ == "__main__":
    main()
