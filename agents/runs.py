"""Run directories: saved configuration, metrics log, TensorBoard events and checkpoints.

Layout of a run directory::

    config.json         the command's configuration, written once
    metrics.jsonl       one JSON object per logged step, e.g. {"epoch": 3, "train/accuracy": 0.91}
    events.out.tfevents.*   the same metrics for TensorBoard
    last.pt             latest checkpoint, replaced atomically
    best.pt             checkpoint with the best selection metric so far

Checkpoints contain only tensors and plain Python values, so they load with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agents.distributed import is_main_process
from blockdrop_env.checkpoints import atomic_torch_save, read_checkpoint
from blockdrop_env.errors import CheckpointError, ConfigError

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"
# Names of the temporary files of atomic_torch_save and atomic_write_text.
_STALE_TEMPORARY = re.compile(r"^\..+\.([0-9a-f]{32}\.tmp|tmp-\d+)$")


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename, so readers never see half."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def capture_rng_state() -> dict[str, Any]:
    """Random states of Python, NumPy and torch (CPU and CUDA) as weights-only-loadable values."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    random.setstate(_as_tuple(state["python"]))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    """Turn lists back into the nested tuples ``random.setstate`` expects."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuple(v) for v in value)
    return value


class RunDirectory:
    """One training run on disk, with its metrics logger.

    In a multi-process run only rank 0 writes: on the other ranks the methods that write the
    config, metrics or checkpoints return without touching the directory.

    Args:
        path: Directory of the run; created when missing.
        tensorboard: Also write TensorBoard event files.
    """

    def __init__(self, path: str | Path, *, tensorboard: bool = True) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"run directory {self.path} exists and is not a directory; choose another --run-dir")
        self.path.mkdir(parents=True, exist_ok=True)
        self._tensorboard = tensorboard
        self._writer: Any = None

    # -- configuration -------------------------------------------------------------------------

    def write_config(self, config: Any) -> None:
        """Save the run's configuration (a dataclass or a mapping) as JSON."""
        if not is_main_process():
            return
        data = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
        atomic_write_text(self.path / CONFIG_FILE, json.dumps(data, indent=2, sort_keys=True) + "\n")

    def read_config(self) -> dict[str, Any]:
        """Load the saved configuration."""
        path = self.path / CONFIG_FILE
        if not path.is_file():
            raise ConfigError(f"{path} not found; is {self.path} a run directory written by blockdrop?")
        return json.loads(path.read_text(encoding="utf-8"))

    # -- metrics -------------------------------------------------------------------------------

    def log(self, step: int, metrics: Mapping[str, float], *, step_name: str = "epoch") -> None:
        """Append one row of metrics to metrics.jsonl and TensorBoard."""
        if not is_main_process():
            return
        row = {step_name: step, **{key: float(value) for key, value in metrics.items()}}
        with open(self.path / METRICS_FILE, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        writer = self._tensorboard_writer()
        if writer is not None:
            for key, value in metrics.items():
                writer.add_scalar(key, float(value), step)
            writer.flush()

    def read_metrics(self) -> list[dict[str, Any]]:
        """All logged rows in order."""
        path = self.path / METRICS_FILE
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def truncate_metrics(self, step: int, *, step_name: str = "epoch") -> None:
        """Drop rows logged after ``step``, e.g. those of an epoch that was killed before its checkpoint."""
        if not is_main_process():
            return
        rows = [row for row in self.read_metrics() if row.get(step_name, -1) <= step]
        atomic_write_text(self.path / METRICS_FILE, "".join(json.dumps(row) + "\n" for row in rows))

    def _tensorboard_writer(self) -> Any:
        if not self._tensorboard:
            return None
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.path))
        return self._writer

    def close(self) -> None:
        """Flush and close the TensorBoard writer."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # -- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(self, state: Mapping[str, Any], name: str = LAST_CHECKPOINT) -> Path:
        """Write a checkpoint atomically and return its path (rank 0 only writes).

        Also deletes temporary files that a process killed while writing left in the directory.
        """
        path = self.path / name
        if not is_main_process():
            return path
        atomic_torch_save(dict(state), path)
        self._remove_stale_temporaries()
        return path

    def _remove_stale_temporaries(self) -> None:
        # A run directory has one writer and its writes are sequential, so no temporary file
        # is in use when a save has just finished.
        for temporary in self.path.iterdir():
            if _STALE_TEMPORARY.match(temporary.name) and temporary.is_file():
                temporary.unlink(missing_ok=True)

    def has_checkpoint(self, name: str = LAST_CHECKPOINT) -> bool:
        """Whether the checkpoint file exists."""
        return (self.path / name).is_file()

    def load_checkpoint(self, name: str = LAST_CHECKPOINT, required_keys: Sequence[str] = ()) -> dict[str, Any]:
        """Load a checkpoint with ``weights_only=True``.

        Args:
            name: File name inside the run directory.
            required_keys: Keys the checkpoint dict must contain.

        Raises:
            CheckpointError: if the file is missing, unreadable, contains pickled Python
                objects, or is not a dict with ``required_keys``.
        """
        path = self.path / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {path} not found; start the run without --resume")
        state = read_checkpoint(path)
        missing = [key for key in required_keys if not isinstance(state, dict) or key not in state]
        if missing:
            found = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
            raise CheckpointError(
                f"checkpoint {path} is not a checkpoint of this run: expected keys "
                f"{list(required_keys)}, found {found}; restore the run's own {name} from a copy, "
                "or start a new --run-dir"
            )
        return state
