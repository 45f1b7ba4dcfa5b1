"""Smoke test of the benchmark suite: ``benchmarks/run_all.py --quick`` writes every result."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
RUN_ALL = REPO_ROOT / "benchmarks" / "run_all.py"

EXPECTED_KEYS = {
    "forward": ("setup", "archs", "targets", "experiments"),
    "resnet": ("setup", "batch256", "batch1", "targets"),
    "env": ("setup", "images_per_second", "ratios", "targets"),
    "training": ("setup", "images_per_second", "breakdown", "median_seconds"),
    "inference": ("setup", "latency_ms", "latency_speedup", "flops_speedup", "targets"),
    "memory": ("setup", "dataset", "training", "targets"),
}
TARGET_KEYS = ("name", "description", "measured", "target", "comparison", "met")


@pytest.fixture(scope="module")
def quick_suite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run the whole suite once at smoke-test sizes into a temporary folder."""
    out_dir = tmp_path_factory.mktemp("bench")
    done = subprocess.run(
        [sys.executable, str(RUN_ALL), "--quick", "--out-dir", str(out_dir), "--readme", str(out_dir / "README.md")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out_dir


@pytest.mark.parametrize("name", sorted(EXPECTED_KEYS))
def test_run_all_quick_writes_result_keys(quick_suite: Path, name: str) -> None:
    result = json.loads((quick_suite / f"{name}.json").read_text())
    missing = [key for key in EXPECTED_KEYS[name] if key not in result]
    assert not missing, f"{name}.json lacks {missing}"
    assert result["setup"]["quick"] is True


def test_run_all_quick_targets_have_verdicts(quick_suite: Path) -> None:
    for name in ("forward", "resnet", "env", "inference", "memory"):
        targets = json.loads((quick_suite / f"{name}.json").read_text())["targets"]
        assert targets, f"{name}.json has no targets"
        for entry in targets:
            assert all(key in entry for key in TARGET_KEYS), entry


def test_run_all_quick_forward_reports_fraction_of_ideal(quick_suite: Path) -> None:
    forward = json.loads((quick_suite / "forward.json").read_text())
    for arch in forward["archs"].values():
        for row in arch["batches"].values():
            assert set(row["keep"]) == {"1.0", "0.75", "0.5", "0.25"}
            assert row["keep"]["0.5"]["ideal_speedup"] > 1.0
            assert row["keep"]["0.5"]["fraction_of_ideal"] > 0.0


def test_run_all_quick_writes_summary(quick_suite: Path) -> None:
    summary = (quick_suite / "README.md").read_text()
    assert "## Targets" in summary
    assert "## What was tried" in summary
    assert "| memory:" in summary
