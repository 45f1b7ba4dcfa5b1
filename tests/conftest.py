"""Shared fixtures: tiny image folders and checkpoints, and the path of the real data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
CIFAR10_JPEG = SHARED / "data" / "cifar10-jpeg"
MODELS = SHARED / "models"


def require_real_data(*paths: Path) -> None:
    """Skip the calling test when the real CIFAR-10 images or ResNets are not next to the repository."""
    for path in paths:
        if not path.exists():
            pytest.skip(f"real data not found at {path}")


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run ``blockdrop ARGS`` in-process; return the exit status, stdout and stderr."""
    from agents.cli import main

    try:
        main(args)
        status = 0
    except SystemExit as done:
        status = done.code if isinstance(done.code, int) else 1
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def write_image_folder(root: Path, num_classes: int = 3, per_class: int = 4, size: int = 32, seed: int = 0) -> Path:
    """Write a tiny ImageFolder tree with train/ and test/ splits of random PNG images."""
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    for split in ("train", "test"):
        for label in range(num_classes):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = torch.randint(0, 256, (size, size, 3), dtype=torch.uint8, generator=generator)
                Image.fromarray(pixels.numpy()).save(folder / f"{i:04d}.png")
    return root


@pytest.fixture()
def image_folder(tmp_path: Path) -> Path:
    """Tiny ImageFolder tree: 3 classes, 4 random 32x32 PNG images per class and split."""
    return write_image_folder(tmp_path / "images")
