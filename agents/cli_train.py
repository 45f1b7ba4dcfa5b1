"""``blockdrop train`` and ``blockdrop finetune``: the reference REINFORCE agent from the shell.

Both commands are plain click commands; ``agents.cli`` adds them to the ``blockdrop`` group.
Option defaults and help texts come from :class:`~agents.reinforce.TrainConfig` and
:class:`~agents.finetune.FinetuneConfig`, so the CLI, the saved config.json and the Python API
agree.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import MISSING, fields
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import click

from agents.distributed import distributed_session, reject_default_run_dir
from agents.finetune import FinetuneConfig
from agents.finetune import finetune as run_finetuning
from agents.reinforce import TrainConfig, config_help
from agents.reinforce import train as run_training
from agents.runs import LAST_CHECKPOINT
from blockdrop_env.errors import ConfigError

F = TypeVar("F", bound=Callable[..., Any])
DATASETS = ["shapes", "imagefolder", "cifar10", "cifar100"]


def _default(config_class: type, name: str) -> Any:
    field = next(f for f in fields(config_class) if f.name == name)
    return None if field.default is MISSING else field.default


def _option(config_class: type, name: str, *flags: str, **kwargs: Any) -> Callable[[F], F]:
    """click option whose default and help text come from the configuration dataclass."""
    flags = flags or ("--" + name.replace("_", "-"),)
    kwargs.setdefault("default", _default(config_class, name))
    kwargs.setdefault("show_default", True)
    kwargs.setdefault("help", config_help(config_class, name))
    return click.option(*flags, name, **kwargs)


def _common_options(config_class: type) -> Callable[[F], F]:
    """Options shared by both commands, in the order --help lists them."""
    options = [
        _option(
            config_class,
            "run_dir",
            type=click.Path(file_okay=False),
            default=None,
            help=config_help(config_class, "run_dir") + " Default: runs/<command>-<date>-<time>.",
        ),
        _option(config_class, "epochs", type=int),
        _option(config_class, "batch_size", type=int),
        _option(config_class, "alpha", type=float),
        _option(config_class, "beta", type=float),
        _option(config_class, "max_train_images", type=int),
        _option(config_class, "max_test_images", type=int),
        _option(config_class, "augment", "--augment/--no-augment"),
        _option(config_class, "device", type=click.Choice(["cpu", "cuda"])),
        _option(config_class, "seed", type=int),
        click.option("--resume", is_flag=True, help="Continue the run in --run-dir from its last.pt."),
        click.option("--quiet", is_flag=True, help="No progress bars and no per-epoch lines."),
    ]

    def decorate(function: F) -> F:
        for option in reversed(options):
            function = option(function)
        return function

    return decorate


@click.command(name="train")
@_option(TrainConfig, "resnet", type=click.Path(dir_okay=False), default=None)
@_option(TrainConfig, "dataset", type=click.Choice(DATASETS))
@_option(TrainConfig, "data_dir", type=click.Path(file_okay=False), default=None)
@_option(TrainConfig, "lr", type=float)
@_option(TrainConfig, "penalty", type=float)
@_option(TrainConfig, "epochs_per_stage", type=int)
@_option(TrainConfig, "blocks_per_stage", type=int)
@_option(TrainConfig, "policy_input_size", type=int)
@_common_options(TrainConfig)
def train(resume: bool, quiet: bool, **options: Any) -> None:
    """Train a policy network with curriculum REINFORCE on a frozen ResNet.

    Writes config.json, metrics.jsonl, TensorBoard events, last.pt (every epoch) and best.pt
    (highest test/reward) to --run-dir.
    """
    options = _fill_defaults(options, "train")
    config = TrainConfig(**options)
    _check_resume(config.run_dir, resume)
    # Under torchrun every process trains; rank 0 alone prints and writes the report.
    with distributed_session(config.device) as session:
        quiet = quiet or not session.is_main
        run_training(config, resume=resume, progress=not quiet, on_epoch=None if quiet else _epoch_printer(config.epochs))
    if session.is_main:
        _print_comparison(config)


@click.command(name="finetune")
@_option(FinetuneConfig, "from_run", "--from", type=click.Path(), required=True, default=None)
@_option(FinetuneConfig, "lr_resnet", type=float)
@_option(FinetuneConfig, "lr_policy", type=float)
@_option(FinetuneConfig, "penalty", type=float)
@_option(FinetuneConfig, "dataset", type=click.Choice(DATASETS))
@_option(FinetuneConfig, "data_dir", type=click.Path(file_okay=False))
@_option(FinetuneConfig, "sync_bn", "--sync-bn/--no-sync-bn")
@_common_options(FinetuneConfig)
def finetune(resume: bool, quiet: bool, **options: Any) -> None:
    """Fine-tune the policy network and the ResNet of a `blockdrop train` run jointly.

    The ResNet trains on the cross-entropy of its predictions under the sampled policies, the
    policy on the REINFORCE loss. Writes the same files as `blockdrop train` to --run-dir.
    """
    options = _fill_defaults(options, "finetune")
    config = FinetuneConfig(**options)
    _check_resume(config.run_dir, resume)
    with distributed_session(config.device) as session:
        quiet = quiet or not session.is_main
        run_finetuning(config, resume=resume, progress=not quiet, on_epoch=None if quiet else _epoch_printer(config.epochs))
    if session.is_main:
        _print_comparison(config)


def _fill_defaults(options: dict[str, Any], command: str) -> dict[str, Any]:
    """Replace options left unset on the command line by the configuration's defaults."""
    filled = {key: value for key, value in options.items() if value is not None}
    if not filled.get("run_dir"):
        reject_default_run_dir()
        filled["run_dir"] = str(Path("runs") / f"{command}-{datetime.now():%Y%m%d-%H%M%S}")
    return filled


def _print_comparison(config: TrainConfig | FinetuneConfig) -> None:
    """Compare the run's best policy with all blocks and first-K on the test split, and save it."""
    from agents.agent_checkpoint import agent_policy_fn, load_agent
    from agents.reinforce import load_splits
    from agents.report import compare_with_baselines

    from agents.runs import RunDirectory

    # The saved config has the values the run resolved, e.g. a fine-tuning run's source dataset.
    saved = RunDirectory(config.run_dir, tensorboard=False).read_config()
    policy, loaded, info = load_agent(config.run_dir, device=config.device)
    _, test_data = load_splits(saved["dataset"], saved["data_dir"], None, saved["max_test_images"])
    comparison = compare_with_baselines(
        loaded.model, test_data, agent_policy_fn(policy, info.num_controlled), batch_size=config.batch_size, device=config.device
    )
    table = comparison.format_table()
    run_dir = Path(config.run_dir)
    (run_dir / "report.md").write_text(f"Test split: {test_data.name}, {len(test_data)} images\n\n{table}\n")
    (run_dir / "report.json").write_text(json.dumps(comparison.to_dict(), indent=2) + "\n")
    click.echo(f"\nbest policy of {run_dir} on {len(test_data)} test images ({test_data.name}):\n")
    click.echo(table)


def _check_resume(run_dir: str, resume: bool) -> None:
    checkpoint = Path(run_dir) / LAST_CHECKPOINT
    if resume and not checkpoint.is_file():
        raise ConfigError(
            f"--resume was given but {checkpoint} does not exist; start the run without --resume"
        )


def _epoch_printer(epochs: int) -> Callable[[int, Mapping[str, float]], None]:
    def print_epoch(epoch: int, metrics: Mapping[str, float]) -> None:
        click.echo(
            f"epoch {epoch + 1}/{epochs}  controlled {metrics['curriculum/num_controlled']:.0f}  "
            f"train reward {metrics['train/reward']:.3f} acc {metrics['train/accuracy']:.3f}  "
            f"test reward {metrics['test/reward']:.3f} acc {metrics['test/accuracy']:.4f} "
            f"blocks {metrics['test/blocks_mean']:.2f} ± {metrics['test/blocks_std']:.2f}  "
            f"({metrics['time/epoch_seconds']:.1f} s)",
            err=True,
        )

    return print_epoch
