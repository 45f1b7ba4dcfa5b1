"""Timing, FLOPs counting and result helpers shared by the benchmark scripts.

Every speed claim of the suite is a ratio of median times measured side by side in one process:
:func:`time_interleaved` runs one call of each configuration per round, so a burst of load
from other processes on a shared machine hits every configuration alike.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

Timings = dict[str, list[float]]


def time_call(fn: Callable[[], object], synchronize: Callable[[], None] | None = None) -> float:
    """Seconds taken by one call of ``fn``, waiting for queued GPU work when ``synchronize`` is given."""
    start = time.perf_counter()
    fn()
    if synchronize is not None:
        synchronize()
    return time.perf_counter() - start


def time_interleaved(
    configs: Mapping[str, Callable[[], object]],
    rounds: int,
    *,
    warmup: int = 1,
    synchronize: Callable[[], None] | None = None,
) -> Timings:
    """Time each configuration once per round, all configurations in every round.

    The order rotates from round to round, so no configuration always runs first or right after
    a particular other one.

    Args:
        configs: Name to zero-argument callable.
        rounds: Timed rounds; each configuration gets this many samples.
        warmup: Untimed rounds before the timed ones (memory allocation, oneDNN primitives).
        synchronize: Called after each call before the clock stops, e.g. ``torch.cuda.synchronize``.

    Returns:
        Name to the list of seconds per call, in round order.
    """
    names = list(configs)
    for _ in range(warmup):
        for name in names:
            configs[name]()
    times: Timings = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(time_call(configs[name], synchronize))
    return times


def medians(times: Timings) -> dict[str, float]:
    """Median seconds of each configuration."""
    return {name: statistics.median(values) for name, values in times.items()}


def count_macs(module: nn.Module, *inputs: torch.Tensor) -> int:
    """Multiply-adds of the convolutions and linear layers one call ``module(*inputs)`` runs.

    The same convention as :class:`blockdrop_env.resnet.FlopsTable`: BatchNorm, activations,
    pooling and additions are not counted.
    """
    total = 0

    def on_conv(layer: nn.Conv2d, _: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        kernel_h, kernel_w = layer.kernel_size
        total += output.numel() * (layer.in_channels // layer.groups) * kernel_h * kernel_w

    def on_linear(layer: nn.Linear, _: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        total += output.numel() * layer.in_features

    handles = []
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            handles.append(layer.register_forward_hook(on_conv))
        elif isinstance(layer, nn.Linear):
            handles.append(layer.register_forward_hook(on_linear))
    try:
        with torch.inference_mode():
            module(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return total


def target(
    name: str, measured: float, threshold: float, comparison: str, description: str
) -> dict[str, Any]:
    """Build one target entry of the suite with its verdict.

    Args:
        name: Short identifier, e.g. ``"half_kept_batch256"``.
        measured: The measured figure.
        threshold: The value the figure must reach.
        comparison: ``">="`` (higher is better) or ``"<="`` (lower is better).
        description: What the figure is, for the summary table.

    Returns:
        A JSON-ready dict with ``met`` set.

    Raises:
        ValueError: if ``comparison`` is neither ``">="`` nor ``"<="``.
    """
    if comparison not in (">=", "<="):
        raise ValueError(f"`comparison` must be '>=' or '<=', got {comparison!r}")
    met = measured >= threshold if comparison == ">=" else measured <= threshold
    return {
        "name": name,
        "description": description,
        "measured": float(measured),
        "target": float(threshold),
        "comparison": comparison,
        "met": bool(met),
    }


def machine_info() -> dict[str, Any]:
    """Software versions, thread settings and load of the machine running the benchmark."""
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "load_average_at_start": list(os.getloadavg()),
        "niceness": os.nice(0),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }


def write_json(path: Path, result: Mapping[str, Any]) -> None:
    """Write ``result`` as indented JSON, creating the parent folder, and name the file on stdout."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


def finish(result: dict[str, Any], started: float) -> dict[str, Any]:
    """Add the load average at the end and the wall time since ``started`` to ``result["setup"]``."""
    result["setup"]["load_average_at_end"] = list(os.getloadavg())
    result["setup"]["wall_seconds"] = time.perf_counter() - started
    return result


def keep_exactly(
    batch_size: int, num_blocks: int, num_kept: int, generator: torch.Generator
) -> torch.Tensor:
    """Bool policy (B, K) in which each sample keeps ``num_kept`` blocks chosen at random."""
    scores = torch.rand(batch_size, num_blocks, generator=generator)
    ranks = scores.argsort(dim=1).argsort(dim=1)
    return ranks < num_kept
