"""``blockdrop compare``: policy learners on equal budgets against static baselines.

A plain click command; ``agents.cli`` adds it to the ``blockdrop`` group.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from agents.compare import (
    BUILT_IN_AGENTS,
    CompareSettings,
    LearningProblem,
    resolve_learner,
    run_comparison,
    write_results,
)
from blockdrop_env.data import DATASET_NAMES
from blockdrop_env.errors import ConfigError
from blockdrop_env.rewards import DEFAULT_PENALTY

DEFAULT_DATASET = "shapes" if "shapes" in DATASET_NAMES else "imagefolder"


def _positive(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    if value is not None and value < 1:
        raise click.BadParameter(f"must be a positive integer, got {value}")
    return value


def _agent_names(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    names = tuple(name.strip().lower() for name in value.split(",") if name.strip())
    if not names:
        raise click.BadParameter(f"must list at least one agent, e.g. {','.join(BUILT_IN_AGENTS)}")
    for name in names:
        resolve_learner(name)
    return names


@click.command(name="compare")
@click.option("--agents", default=",".join(BUILT_IN_AGENTS), callback=_agent_names, help="Comma-separated agents: reinforce, bandit, or a Stable-Baselines3 algorithm with MultiBinary actions (ppo, a2c).")
@click.option("--resnet", "resnet_path", type=click.Path(dir_okay=False), default=None, help="ResNet checkpoint whose blocks the agents learn to drop; default: the shipped ResNet-32 for shapes.")
@click.option("--dataset", type=click.Choice(DATASET_NAMES), default=DEFAULT_DATASET, help="Dataset format; shapes is generated in memory and needs no --data-dir.")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None, help="Dataset root with the train and test splits (not used by shapes).")
@click.option("--seeds", type=int, default=3, callback=_positive, help="Seeds per agent (0, 1, ...).")
@click.option("--budget", type=int, default=50_000, callback=_positive, help="Training budget per agent and seed, in env steps (images classified).")
@click.option("--penalty", type=float, default=DEFAULT_PENALTY, help="Reward of a wrong prediction is -penalty.")
@click.option("--batch-size", type=int, default=64, callback=_positive, help="Images per env step (num_envs) for every learner.")
@click.option("--max-train-images", type=int, default=None, callback=_positive, help="Train on a fixed random subset of N training images.")
@click.option("--max-test-images", type=int, default=None, callback=_positive, help="Evaluate on a fixed random subset of N test images.")
@click.option("--fixed-search-images", type=int, default=1000, callback=_positive, help="Training images the best-fixed-policy search evaluates each candidate on.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", help="Where the networks run.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True, help="Directory for results.md, results.csv, results.json, pareto.png and the REINFORCE runs.")
@click.option("--quiet", is_flag=True, help="No progress lines or bars.")
def compare(
    agents: tuple[str, ...],
    resnet_path: str | None,
    dataset: str,
    data_dir: str | None,
    seeds: int,
    budget: int,
    penalty: float,
    batch_size: int,
    max_train_images: int | None,
    max_test_images: int | None,
    fixed_search_images: int,
    device: str,
    out_dir: str,
    quiet: bool,
) -> None:
    """Train each agent with each seed on the same budget, evaluate on the test split, and
    write a results table with 95% bootstrap intervals and a Pareto plot to --out.

    Baselines: all blocks, the best fixed policy (greedy search on training images), and
    first-K and random drop at each learner's mean block count.
    """
    from agents.cli import resolve_device, show_progress
    from agents.reinforce import load_splits
    from blockdrop_env.checkpoints import load_resnet

    if dataset != "shapes" and data_dir is None:
        raise ConfigError(
            f"--data-dir is required for --dataset {dataset}; pass the folder with its train and test splits"
        )
    settings = CompareSettings(agents, seeds, budget, fixed_search_images)
    out = Path(out_dir)
    _check_out_dir(out, agents)
    torch_device = resolve_device(device)
    started = time.perf_counter()

    if resnet_path is None:
        from blockdrop_env.registration import SHAPES_CHECKPOINT

        resnet_path = str(SHAPES_CHECKPOINT)
    loaded = load_resnet(resnet_path)
    train_data, test_data = load_splits(dataset, data_dir or "", max_train_images, max_test_images)
    progress = not quiet and show_progress()
    problem = LearningProblem(loaded.model, train_data, penalty, batch_size, torch_device, out / "runs", progress)
    echo = None if quiet else (lambda line: click.echo(line, err=True))
    comparison = run_comparison(problem, test_data, settings, echo=echo)
    comparison.context = {
        "resnet": resnet_path,
        "arch": loaded.arch,
        "dataset": dataset,
        "data_dir": data_dir,
        "num_train_images": len(train_data),
        "num_test_images": len(test_data),
        "penalty": penalty,
        "batch_size": batch_size,
        "agents": list(agents),
        "seeds": seeds,
        "budget": budget,
        "fixed_search_images": fixed_search_images,
        "device": device,
        "wall_seconds": time.perf_counter() - started,
    }
    paths = write_results(comparison, out)
    if not quiet:
        click.echo((out / "results.md").read_text(encoding="utf-8"))
        click.echo(f"wrote {', '.join(str(path) for path in paths)} ({comparison.context['wall_seconds']:.1f} s)", err=True)


def _check_out_dir(out: Path, agents: tuple[str, ...]) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory; choose another --out")
    if "reinforce" in agents and (out / "runs").exists() and any((out / "runs").iterdir()):
        raise ConfigError(f"--out {out} already contains REINFORCE runs in {out / 'runs'}; choose another --out")
