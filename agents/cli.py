"""The ``blockdrop`` command line.

Errors caused by user input (bad option values, missing or malformed files) print one line on
stderr and exit with status 2, without a traceback.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

import click
import torch

from blockdrop_env.errors import BlockDropError, ConfigError
from blockdrop_env.resnet import CIFAR10_NORMALIZATION, IMAGENET_NORMALIZATION

NORMALIZATIONS = {"auto": "auto", "imagenet": IMAGENET_NORMALIZATION, "cifar10": CIFAR10_NORMALIZATION, "none": None}


def resolve_device(name: str) -> torch.device:
    """Turn ``--device`` into a torch device, failing early when CUDA is missing."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("`--device` is cuda but no CUDA device is available; use --device cpu")
    return torch.device(name)


def show_progress() -> bool:
    """Progress bars go to stderr, and only when it is a terminal, so logs and pipes stay clean."""
    return sys.stderr.isatty()


def positive_int(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    """click callback rejecting zero and negative counts."""
    if value is not None and value < 1:
        raise click.BadParameter(f"must be a positive integer, got {value}")
    return value


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="blockdrop")
def cli() -> None:
    """BlockDrop: learn which residual blocks of a pre-trained ResNet to run for each image."""


@cli.command()
@click.option("--resnet", "resnet_path", type=click.Path(dir_okay=False), help="ResNet checkpoint evaluated under a fixed --policy.")
@click.option("--checkpoint", "agent_path", type=click.Path(), help="Trained agent (run directory or agent checkpoint file): its policy network chooses the blocks.")
@click.option("--dataset", type=click.Choice(["shapes", "imagefolder", "cifar10", "cifar100"]), default="shapes", help="Dataset: shapes (built in, no files) or a format read from --data-dir.")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None, help="Dataset root (ImageFolder tree with train/ and test/, or the CIFAR python files); not used by shapes.")
@click.option("--split", type=click.Choice(["train", "test"]), default="test", help="Dataset split to evaluate.")
@click.option("--policy", "policy_spec", default="all", help="Fixed policy: all, first:K or random:P.")
@click.option("--normalization", type=click.Choice(list(NORMALIZATIONS)), default="auto", help="Input normalisation; auto takes the checkpoint format's default.")
@click.option("--num-images", type=int, default=None, callback=positive_int, help="Evaluate only the first N images of the split, in file order (an ImageFolder split is sorted by class, so they may cover few classes).")
@click.option("--batch-size", type=int, default=256, callback=positive_int, help="Images per forward pass.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", help="Where the network runs.")
@click.option("--seed", type=int, default=0, help="Seed of random:P policies.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def evaluate(
    resnet_path: str | None,
    agent_path: str | None,
    dataset: str,
    data_dir: str | None,
    split: str,
    policy_spec: str,
    normalization: str,
    num_images: int | None,
    batch_size: int,
    device: str,
    seed: int,
    as_json: bool,
) -> None:
    """Measure accuracy, blocks and FLOPs of a policy and its ResNet on a dataset split.

    With --checkpoint, a trained agent's policy network chooses the blocks of its own ResNet.
    With --resnet, a bare ResNet runs under the fixed --policy. Both print the same keys.
    """
    from agents.agent_checkpoint import agent_policy_fn, load_agent
    from agents.baselines import parse_policy_spec
    from agents.evaluation import evaluate_policy
    from blockdrop_env.checkpoints import check_dataset_classes, load_resnet
    from blockdrop_env.data import load_dataset

    if (resnet_path is None) == (agent_path is None):
        raise ConfigError(
            "pass exactly one of `--checkpoint` (a trained agent) and `--resnet` (a bare ResNet "
            f"under --policy), got {'both' if resnet_path else 'neither'}"
        )
    torch_device = resolve_device(device)
    torch.manual_seed(seed)
    if agent_path is not None:
        policy_net, loaded, info = load_agent(agent_path, device=torch_device)
        policy_fn = agent_policy_fn(policy_net, info.num_controlled)
        policy_name = f"agent:{info.path}"
        checkpoint = str(agent_path)
    else:
        loaded = load_resnet(resnet_path, normalization=NORMALIZATIONS[normalization])
        policy_fn = parse_policy_spec(policy_spec, loaded.model.num_blocks, seed)
        policy_name = policy_fn.name
        checkpoint = str(resnet_path)
    data = load_dataset(dataset, data_dir, split, progress=show_progress())
    check_dataset_classes(loaded, data.num_classes, data.name)
    if num_images is not None:
        data = data.subset(torch.arange(min(num_images, len(data))))
    result = evaluate_policy(
        loaded.model, data, policy_fn, batch_size=batch_size, device=torch_device, progress=show_progress()
    )

    report: dict[str, Any] = {
        **result.to_dict(),
        "policy": policy_name,
        "checkpoint": checkpoint,
        "checkpoint_format": loaded.format,
        "arch": loaded.arch,
        "dataset": dataset,
        "split": split,
    }
    if as_json:
        click.echo(json.dumps(report))
    else:
        click.echo(loaded.describe())
        click.echo(format_report(report))


def format_report(report: dict[str, Any]) -> str:
    """Human-readable summary of an evaluation."""
    full = report["flops_full"]
    return "\n".join(
        [
            f"policy          {report['policy']}",
            f"images          {report['num_images']}",
            f"accuracy        {report['accuracy']:.4f}",
            f"blocks          {report['blocks_mean']:.2f} ± {report['blocks_std']:.2f} of {report['num_blocks']}",
            f"FLOPs (MACs)    {report['flops_mean'] / 1e6:.2f} M ± {report['flops_std'] / 1e6:.2f} M "
            f"({report['flops_mean'] / full:.1%} of {full / 1e6:.2f} M)",
            f"unique policies {report['unique_policies']}",
        ]
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: run the CLI and turn user errors into one line and exit status 2."""
    try:
        status = cli.main(args=argv, prog_name="blockdrop", standalone_mode=False)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as error:
        _exit_with_error(error.format_message())
    except BlockDropError as error:
        _exit_with_error(str(error))
    if isinstance(status, int) and status != 0:
        sys.exit(status)


def _exit_with_error(message: str) -> None:
    click.echo("Error: " + " ".join(message.split()), err=True)
    sys.exit(2)


def _register_commands() -> None:
    from agents.cli_compare import compare
    from agents.cli_pretrain import pretrain_command
    from agents.cli_train import finetune, train

    cli.add_command(train)
    cli.add_command(finetune)
    cli.add_command(pretrain_command)
    cli.add_command(compare)


_register_commands()

if __name__ == "__main__":
    main()
