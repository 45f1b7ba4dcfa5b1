"""Training speed of the REINFORCE agent next to the ResNet forwards it cannot avoid.

A curriculum REINFORCE step with all K blocks controlled runs the policy network forward and
backward, plus two block-sparse ResNet forwards through the env (the thresholded baseline via
``score_actions`` and the sampled policy via ``step``). The reference is the time of two plain
full ResNet forwards on the same batch, the least any self-critical REINFORCE step spends on
the ResNet. The joint fine-tuning step adds a masked ResNet forward and backward.

Configurations are timed in interleaved rounds in one process, so that load from other
processes on a shared machine affects them alike. CIFAR ResNet-32 with random weights, random
32x32 images, 10 classes.

    python benchmarks/bench_training.py --out benchmarks/results/training.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from agents.finetune import FinetuneConfig, JointFinetuner
from agents.reinforce import CurriculumTrainer, RolloutStats, TrainConfig
from blockdrop_env.data import ImageDataset
from blockdrop_env.resnet import build_resnet


def time_call(fn: Callable[[], object]) -> float:
    """Seconds taken by one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


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


def measure(arch: str, batch_size: int, rounds: int, device: str) -> dict[str, object]:
    """Median seconds per batch of each configuration, and the derived images per second."""
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
        }
        times: dict[str, list[float]] = {name: [] for name in configs}
        for fn in configs.values():
            fn()  # warm-up
        for _ in range(rounds):
            for name, fn in configs.items():
                times[name].append(time_call(fn))
                if device == "cuda":
                    torch.cuda.synchronize()

    median = {name: statistics.median(values) for name, values in times.items()}
    return {
        "batch_size": batch_size,
        "rounds": rounds,
        "num_blocks": model.num_blocks,
        "median_seconds": median,
        "images_per_second": {name: batch_size / t for name, t in median.items()},
        "reinforce_step_vs_two_forwards": median["reinforce_step"] / median["two_resnet_forwards"],
        # The env's forwards are block-sparse, so the REINFORCE step gets cheaper as the
        # sampled and thresholded policies drop blocks; this is the sampled policies' mean.
        "reinforce_sampled_blocks_mean": reinforce_stats.metrics()["train/blocks_mean"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="cifar_resnet32")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/training.json"))
    args = parser.parse_args()

    warnings.simplefilter("ignore", UserWarning)
    result = {
        "benchmark": "bench_training",
        "arch": args.arch,
        "device": args.device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        **measure(args.arch, args.batch_size, args.rounds, args.device),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
