"""``blockdrop pretrain``: train a base ResNet from scratch or fine-tune one on new data.

With ``--resume``, options not given on the command line take the values saved in the run's
config.json, so ``blockdrop pretrain --run-dir RUN --resume`` continues a run as it was started.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import click
from click.core import ParameterSource
from tqdm.auto import tqdm

from agents.distributed import distributed_session
from agents.pretrain import PRECISIONS, PretrainConfig, PretrainResult, pretrain
from agents.runs import LAST_CHECKPOINT, RunDirectory
from blockdrop_env.data import DATASET_NAMES
from blockdrop_env.errors import ConfigError

# CLI parameter name -> PretrainConfig field, where they differ.
_FIELD_OF_PARAMETER = {"no_augment": "augment"}
# Parameters that are not PretrainConfig fields.
_RUN_PARAMETERS = ("run_dir", "resume", "quiet")


def _positive_int(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    # Imported here because agents.cli imports this module to register the command.
    from agents.cli import positive_int

    return positive_int(ctx, param, value)


def _help(name: str) -> str:
    return PretrainConfig.help_text(name)


def _default(name: str) -> Any:
    return PretrainConfig.default(name)


@click.command("pretrain")
@click.option("--arch", default=None, help=_help("arch"))
@click.option("--init", type=click.Path(dir_okay=False), default=None, help=_help("init"))
@click.option("--agent", type=click.Path(), default=None, help=_help("agent"))
@click.option("--dataset", type=click.Choice(DATASET_NAMES), default=_default("dataset"), help=_help("dataset"))
@click.option("--data-dir", type=click.Path(file_okay=False), default=None, help=_help("data_dir"))
@click.option("--run-dir", type=click.Path(file_okay=False), required=True, help="Run directory for config, metrics and checkpoints.")
@click.option("--epochs", type=int, default=_default("epochs"), help=_help("epochs"))
@click.option("--batch-size", type=int, default=_default("batch_size"), help=_help("batch_size"))
@click.option("--lr", type=float, default=None, help=_help("lr"))
@click.option("--weight-decay", type=float, default=_default("weight_decay"), help=_help("weight_decay"))
@click.option("--warmup-epochs", type=float, default=_default("warmup_epochs"), help=_help("warmup_epochs"))
@click.option("--stochastic-depth", type=float, default=_default("stochastic_depth"), help=_help("stochastic_depth"))
@click.option("--no-augment", is_flag=True, help="Train without random crop and flip.")
@click.option("--max-train-images", type=int, default=None, callback=_positive_int, help=_help("max_train_images"))
@click.option("--max-test-images", type=int, default=None, callback=_positive_int, help=_help("max_test_images"))
@click.option("--normalization", type=click.Choice(["imagenet", "cifar10", "none"]), default=None, help=_help("normalization"))
@click.option("--channels-last/--no-channels-last", default=_default("channels_last"), help=_help("channels_last"))
@click.option("--precision", type=click.Choice(PRECISIONS), default=_default("precision"), help=_help("precision"))
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=_default("device"), help=_help("device"))
@click.option("--num-threads", type=int, default=None, callback=_positive_int, help=_help("num_threads"))
@click.option("--seed", type=int, default=_default("seed"), help=_help("seed"))
@click.option("--sync-bn/--no-sync-bn", default=_default("sync_bn"), help=_help("sync_bn"))
@click.option("--resume", is_flag=True, help="Continue the run in --run-dir from its last checkpoint.")
@click.option("--quiet", is_flag=True, help="No progress bars or per-epoch lines; print only the summary.")
@click.pass_context
def pretrain_command(ctx: click.Context, **options: Any) -> None:
    """Train a ResNet, or fine-tune the one given by --init or --agent, and save it for `blockdrop evaluate`."""
    run = RunDirectory(options["run_dir"])
    if options["resume"] and not run.has_checkpoint(LAST_CHECKPOINT):
        raise ConfigError(
            f"`--resume` given but {run.path / LAST_CHECKPOINT} not found; start the run without --resume"
        )
    config = PretrainConfig(**_config_values(ctx, options, run))
    from agents.cli import resolve_device

    resolve_device(config.device)

    # Under torchrun every process trains; rank 0 alone prints.
    with distributed_session(config.device) as session:
        quiet = options["quiet"] or not session.is_main
        result = pretrain(
            config,
            run,
            resume=options["resume"],
            progress=not quiet,
            on_epoch_end=None if quiet else _echo_epoch,
        )
    if session.is_main:
        click.echo(format_summary(result))


def _config_values(ctx: click.Context, options: Mapping[str, Any], run: RunDirectory) -> dict[str, Any]:
    """PretrainConfig fields from the options; when resuming, unset ones come from config.json."""
    values = {
        _FIELD_OF_PARAMETER.get(name, name): value
        for name, value in options.items()
        if name not in _RUN_PARAMETERS
    }
    values["augment"] = not options["no_augment"]
    if not options["resume"]:
        return values

    saved = run.read_config()
    for name in options:
        if name in _RUN_PARAMETERS or ctx.get_parameter_source(name) is not ParameterSource.DEFAULT:
            continue
        key = _FIELD_OF_PARAMETER.get(name, name)
        if key in saved:
            values[key] = saved[key]
    # Saved fields with no option of their own, e.g. num_classes and label_smoothing.
    for key, value in saved.items():
        if key in PretrainConfig.__dataclass_fields__ and key not in values:
            values[key] = value
    return values


def _echo_epoch(epoch: int, metrics: Mapping[str, float]) -> None:
    line = (
        f"epoch {epoch}: train loss {metrics['train/loss']:.4f}, train accuracy "
        f"{metrics['train/accuracy']:.4f}, test accuracy {metrics['test/accuracy']:.4f}, "
        f"lr {metrics['lr']:.4g}, {metrics['train/images_per_second']:.0f} images/s"
    )
    if "test/blocks_mean" in metrics:
        line += f", test blocks {metrics['test/blocks_mean']:.2f}"
    # click.echo to stderr would tear the progress bar; tqdm.write prints above it.
    tqdm.write(line, file=click.get_text_stream("stderr"))


def format_summary(result: PretrainResult) -> str:
    """Human-readable end-of-run report: accuracies, head replacement and saved files."""
    lines = []
    if result.head_replaced:
        lines.append("head            replaced by a new linear layer for this dataset's classes")
    if result.initial_accuracy is not None:
        lines.append(f"test accuracy   {result.initial_accuracy:.4f} before training (epoch 0)")
    lines += [
        f"test accuracy   {result.final_accuracy:.4f} after epoch {result.epochs}",
        f"best accuracy   {result.best_accuracy:.4f} at epoch {result.best_epoch} ({result.best_model_path})",
    ]
    if not math.isnan(result.train_images_per_second):
        lines.append(f"training speed  {result.train_images_per_second:.0f} images/s")
    lines.append(f"model           {result.model_path}")
    if result.agent_path is not None:
        lines.append(f"agent           {result.agent_path} (the frozen policy with this ResNet)")
    return "\n".join(lines)
