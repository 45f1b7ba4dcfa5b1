"""Peak memory of caching a dataset in memory and of a short REINFORCE training run.

Each measurement runs in its own Python process, so earlier allocations do not hide later
ones. The child imports everything first, reads its peak resident set size
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``; psutil has no peak on Linux and is not a
dependency), does the work, and reports how much the peak grew.

* ``dataset``: decode a CIFAR-10-sized train split (50,000 x 3x32x32 uint8, 153.6 MB of pixels)
  into an :class:`ImageDataset`: the real CIFAR-10 JPEGs from ``../shared/data/cifar10-jpeg``
  when present, else the built-in shapes set of the same size. Target: <= 200 MB.
* ``training``: build a curriculum trainer (CIFAR ResNet-32, random 32x32 images) and run a few
  REINFORCE steps at batch 256.

Usage::

    python benchmarks/bench_memory.py --out benchmarks/results/memory.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from common import SHARED_DATA, finish, machine_info, target, write_json

TARGET_DATASET_MB = 200.0
CIFAR10_JPEG = SHARED_DATA / "cifar10-jpeg"
MB = 1e6


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/memory.json"))
    parser.add_argument("--quick", action="store_true", help="small dataset and batch (smoke test)")
    parser.add_argument("--child", choices=["dataset", "training"], help=argparse.SUPPRESS)
    parser.add_argument("--train-steps", type=int, default=3, help="REINFORCE steps of the training run")
    parser.add_argument("--batch-size", type=int, default=256, help="images per REINFORCE step")
    return parser.parse_args()


# ---------------------------------------------------------------------------------------------
# Child processes: measure one thing and print one JSON line


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child_dataset(quick: bool) -> dict[str, Any]:
    """Decode the train split and report the growth of the peak RSS."""
    import torch  # noqa: F401  (imported before the baseline so its libraries are not counted)

    from blockdrop_env.data import load_image_folder
    from blockdrop_env.shapes import load_shapes

    before = peak_rss_bytes()
    started = time.perf_counter()
    if quick:
        data = load_shapes("train", num_images=500)
    elif (CIFAR10_JPEG / "train").is_dir():
        data = load_image_folder(CIFAR10_JPEG, "train")
    else:
        data = load_shapes("train")
    seconds = time.perf_counter() - started
    return {
        "source": "cifar10-jpeg/train" if data.name.startswith("imagefolder") else data.name,
        "num_images": len(data),
        "pixel_bytes": data.images.numel(),
        "peak_rss_growth_bytes": peak_rss_bytes() - before,
        "seconds": seconds,
    }


def child_training(quick: bool, steps: int, batch_size: int) -> dict[str, Any]:
    """Build a curriculum trainer, run a few REINFORCE steps, report the peak RSS growth."""
    import torch

    from agents.reinforce import CurriculumTrainer, RolloutStats, TrainConfig
    from blockdrop_env.data import ImageDataset
    from blockdrop_env.resnet import build_resnet

    warnings.simplefilter("ignore", UserWarning)
    before = peak_rss_bytes()
    arch = "cifar_resnet8" if quick else "cifar_resnet32"
    torch.manual_seed(0)
    model = build_resnet(arch, 10).eval()
    images = torch.randint(0, 256, (4 * batch_size, 3, 32, 32), dtype=torch.uint8)
    data = ImageDataset(images, torch.randint(0, 10, (4 * batch_size,)), [str(i) for i in range(10)], "random")
    with tempfile.TemporaryDirectory() as run_dir:
        config = TrainConfig(run_dir=run_dir, batch_size=batch_size, epochs_per_stage=0)
        trainer = CurriculumTrainer(config, model, data, data)
        trainer.env.reset(seed=0)
        after_setup = peak_rss_bytes()
        stats = RolloutStats()
        for _ in range(steps):
            trainer.train_step(stats)
        after_steps = peak_rss_bytes()
    return {
        "arch": arch,
        "batch_size": batch_size,
        "steps": steps,
        "dataset_bytes": images.numel(),
        "peak_rss_growth_bytes": after_steps - before,
        "peak_rss_growth_during_steps_bytes": after_steps - after_setup,
    }


# ---------------------------------------------------------------------------------------------
# Parent: one child per measurement


def run_child(task: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run this script as ``--child task`` in a fresh interpreter and parse its last stdout line."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", task,
               "--train-steps", str(args.train_steps), "--batch-size", str(args.batch_size)]
    if args.quick:
        command.append("--quick")
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory child {task!r} failed with exit code {done.returncode}:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parse_args()
    if args.quick:
        args.train_steps, args.batch_size = 1, 16
    if args.child == "dataset":
        print(json.dumps(child_dataset(args.quick)))
        return
    if args.child == "training":
        print(json.dumps(child_training(args.quick, args.train_steps, args.batch_size)))
        return

    started = time.perf_counter()
    dataset = run_child("dataset", args)
    training = run_child("training", args)
    dataset_mb = dataset["peak_rss_growth_bytes"] / MB
    result: dict[str, Any] = {
        "benchmark": "memory",
        "setup": {**machine_info(), "quick": args.quick, "method": "peak RSS growth (ru_maxrss), one process each"},
        "dataset": {**dataset, "peak_rss_growth_mb": dataset_mb, "pixel_mb": dataset["pixel_bytes"] / MB},
        "training": {**training, "peak_rss_growth_mb": training["peak_rss_growth_bytes"] / MB,
                     "peak_rss_growth_during_steps_mb": training["peak_rss_growth_during_steps_bytes"] / MB},
    }
    description = f"peak memory of caching {dataset['source']} ({dataset['num_images']} images), MB"
    result["targets"] = [target("dataset_cache_mb", dataset_mb, TARGET_DATASET_MB, "<=", description)]
    write_json(args.out, finish(result, started))
    print(f"dataset {dataset['source']}: +{dataset_mb:.1f} MB peak ({result['dataset']['pixel_mb']:.1f} MB of pixels); "
          f"training: +{result['training']['peak_rss_growth_mb']:.1f} MB peak")


if __name__ == "__main__":
    main()
