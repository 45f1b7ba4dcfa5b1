"""Tests for blockdrop_env.shapes: the procedural shape set and its difficulty factors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from blockdrop_env.data import load_dataset
from blockdrop_env.errors import ConfigError
from blockdrop_env.shapes import (
    BLOCK_SIZE,
    CONTRAST_RANGE,
    FACTOR_NAMES,
    MAX_CLUTTER,
    MAX_NOISE,
    SCALE_RANGE,
    SHAPE_CLASSES,
    SPLIT_SIZES,
    difficulty_from_factors,
    load_shapes,
    _occluder_alpha,
    _shape_alpha,
    make_shapes,
    save_contact_sheet,
)

NUM_IMAGES = 3000


@pytest.fixture(scope="module")
def shapes() -> object:
    """3,000 images of seed 0, shared by the read-only tests of this module."""
    return make_shapes(NUM_IMAGES, seed=0)


def clean_circles(dataset: object, allow_occlusion: bool = False) -> torch.Tensor:
    """Indices of circle images with no clutter and no noise (and no occlusion unless allowed)."""
    factors = dataset.factors
    clean = (factors["clutter"] == 0) & (factors["noise"] == 0)
    if not allow_occlusion:
        clean &= factors["occlusion"] == 0
    return (clean & (dataset.labels == SHAPE_CLASSES.index("circle"))).nonzero()[:, 0]


# -- images and labels ---------------------------------------------------------------------------


def test_make_shapes_shapes_and_dtypes(shapes: object) -> None:
    assert shapes.images.shape == (NUM_IMAGES, 3, 32, 32)
    assert shapes.images.dtype == torch.uint8
    assert shapes.labels.shape == (NUM_IMAGES,)
    assert shapes.labels.dtype == torch.int64
    assert shapes.name == "shapes:seed0"


def test_make_shapes_labels_cover_every_class(shapes: object) -> None:
    assert len(SHAPE_CLASSES) >= 10
    assert shapes.classes == list(SHAPE_CLASSES)
    assert int(shapes.labels.min()) == 0
    assert int(shapes.labels.max()) == len(SHAPE_CLASSES) - 1


def test_make_shapes_classes_are_balanced(shapes: object) -> None:
    counts = torch.bincount(shapes.labels, minlength=len(SHAPE_CLASSES))
    expected = NUM_IMAGES / len(SHAPE_CLASSES)
    assert int(counts.min()) >= 0.95 * expected
    assert int(counts.max()) <= 1.05 * expected


def test_make_shapes_uses_the_full_pixel_range(shapes: object) -> None:
    assert int(shapes.images.min()) == 0
    assert int(shapes.images.max()) == 255


def test_make_shapes_other_image_size() -> None:
    dataset = make_shapes(20, seed=3, image_size=48)
    assert dataset.images.shape == (20, 3, 48, 48)
    assert dataset.image_size == (48, 48)


# -- determinism ---------------------------------------------------------------------------------


def test_make_shapes_same_seed_is_identical() -> None:
    torch.manual_seed(1)
    first = make_shapes(300, seed=7)
    torch.manual_seed(2)
    torch.rand(10)
    second = make_shapes(300, seed=7)
    assert torch.equal(first.images, second.images)
    assert torch.equal(first.labels, second.labels)
    for name in FACTOR_NAMES:
        assert torch.equal(first.factors[name], second.factors[name]), name


def test_make_shapes_different_seed_differs() -> None:
    first = make_shapes(300, seed=7)
    second = make_shapes(300, seed=8)
    assert not torch.equal(first.images, second.images)
    assert not torch.equal(first.factors["difficulty"], second.factors["difficulty"])


def test_make_shapes_prefix_matches_shorter_set() -> None:
    longer = make_shapes(BLOCK_SIZE + 200, seed=5)
    shorter = make_shapes(BLOCK_SIZE + 50, seed=5)
    assert torch.equal(longer.images[: len(shorter)], shorter.images)
    assert torch.equal(longer.labels[: len(shorter)], shorter.labels)


def test_make_shapes_does_not_change_global_rng() -> None:
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    make_shapes(50, seed=0)
    assert torch.equal(torch.rand(3), expected)


# -- splits --------------------------------------------------------------------------------------


def test_load_shapes_splits_use_different_seeds() -> None:
    train = load_shapes("train", num_images=200)
    test = load_shapes("test", num_images=200)
    assert not torch.equal(train.images, test.images)
    assert train.name == "shapes:train"
    assert test.name == "shapes:test"
    assert train.classes == test.classes == list(SHAPE_CLASSES)


def test_load_shapes_is_repeatable() -> None:
    assert torch.equal(load_shapes("test", 100).images, load_shapes("test", 100).images)


def test_load_dataset_generates_shapes_without_data_dir() -> None:
    dataset = load_dataset("shapes", None, "test")
    assert len(dataset) == SPLIT_SIZES["test"]
    assert dataset.name == "shapes:test"
    assert dataset.factors is not None
    assert set(dataset.factors) == set(FACTOR_NAMES)


# -- factors -------------------------------------------------------------------------------------


def test_factors_have_one_float_per_image(shapes: object) -> None:
    assert set(shapes.factors) == set(FACTOR_NAMES)
    for name in FACTOR_NAMES:
        assert shapes.factors[name].shape == (NUM_IMAGES,), name
        assert shapes.factors[name].dtype == torch.float32, name


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [
        ("clutter", 0, MAX_CLUTTER),
        ("occlusion", 0, 1),
        ("noise", 0, MAX_NOISE),
        ("scale", SCALE_RANGE[0], SCALE_RANGE[1]),
        ("contrast", CONTRAST_RANGE[0], CONTRAST_RANGE[1]),
        ("difficulty", 0, 1),
    ],
)
def test_factors_lie_in_documented_ranges(shapes: object, name: str, low: float, high: float) -> None:
    values = shapes.factors[name]
    assert float(values.min()) >= low - 1e-6
    assert float(values.max()) <= high + 1e-6
    # A wide range: both ends are reached, not a narrow band.
    assert float(values.max() - values.min()) >= 0.8 * (high - low)


def test_clutter_counts_are_integers(shapes: object) -> None:
    clutter = shapes.factors["clutter"]
    assert torch.equal(clutter, clutter.round())


def test_difficulty_is_documented_combination(shapes: object) -> None:
    factors = shapes.factors
    expected = difficulty_from_factors(
        factors["clutter"], factors["occlusion"], factors["noise"], factors["scale"],
        factors["contrast"],
    )  # fmt: skip
    torch.testing.assert_close(factors["difficulty"], expected)


@pytest.mark.parametrize(
    ("name", "sign"),
    [("clutter", 1), ("occlusion", 1), ("noise", 1), ("scale", -1), ("contrast", -1)],
)
def test_difficulty_correlates_with_factor(shapes: object, name: str, sign: int) -> None:
    pair = torch.stack([shapes.factors[name], shapes.factors["difficulty"]])
    correlation = float(torch.corrcoef(pair)[0, 1])
    assert sign * correlation > 0.5


@pytest.mark.parametrize(
    ("name", "easy", "hard"),
    [("clutter", 0, 3), ("occlusion", 0, 0.2), ("noise", 0, 0.1), ("scale", 0.3, 0.2),
     ("contrast", 0.6, 0.3)],
)  # fmt: skip
def test_difficulty_from_factors_is_monotone(name: str, easy: float, hard: float) -> None:
    base = {"clutter": 1.0, "occlusion": 0.1, "noise": 0.05, "scale": 0.25, "contrast": 0.4}
    easier = difficulty_from_factors(**{k: torch.tensor(v) for k, v in {**base, name: easy}.items()})
    harder = difficulty_from_factors(**{k: torch.tensor(v) for k, v in {**base, name: hard}.items()})
    assert float(harder) > float(easier)


def test_difficulty_skews_easy_with_a_hard_tail(shapes: object) -> None:
    difficulty = shapes.factors["difficulty"]
    assert float(difficulty.median()) < 0.3
    assert float((difficulty > 0.5).float().mean()) > 0.1


def test_easy_images_are_clean(shapes: object) -> None:
    factors = shapes.factors
    clean = (factors["clutter"] == 0) & (factors["noise"] == 0) & (factors["occlusion"] == 0)
    assert float(clean.float().mean()) > 0.3


# -- factors match the pixels --------------------------------------------------------------------


def test_contrast_matches_pixels(shapes: object) -> None:
    for i in clean_circles(shapes)[:50].tolist():
        image = shapes.images[i].int()
        difference = (image - image[:, :1, :1]).abs().amax(dim=(1, 2))
        expected = shapes.factors["contrast"][i] * 255
        assert (difference - expected).abs().max() <= 1.5, f"image {i}"


def test_scale_matches_circle_area(shapes: object) -> None:
    for i in clean_circles(shapes)[:50].tolist():
        image = shapes.images[i].float()
        step = (image - image[:, :1, :1]).abs().mean(dim=0)
        # Anti-aliased coverage of each pixel, 1 inside the circle and 0 outside.
        coverage = step / (float(shapes.factors["contrast"][i]) * 255)
        radius = 0.85 * float(shapes.factors["scale"][i]) * 32
        assert float(coverage.sum()) == pytest.approx(math.pi * radius**2, rel=0.03), f"image {i}"


@pytest.mark.parametrize(("occlusion", "expected"), [(0.0, 0.0), (0.5, 0.5), (0.25, 0.2)])
def test_occluder_hides_documented_fraction(occlusion: float, expected: float) -> None:
    centre = torch.tensor([[16.0, 16.0]])
    radius = torch.tensor([10.0])
    # The main circle has radius 0.85 * radius, so a cut at depth 2 * radius * occlusion from
    # the edge of the bounding square hides a circular segment of it.
    circle = _shape_alpha(torch.tensor([0]), centre, radius, torch.tensor([0.0]), 32)
    generator = torch.Generator().manual_seed(0)
    patch = _occluder_alpha(torch.tensor([occlusion]), centre, radius, 32, generator)
    hidden = float((circle * patch).sum() / circle.sum())
    assert hidden == pytest.approx(expected, abs=0.05)


def test_noise_free_images_have_few_colours(shapes: object) -> None:
    quiet = ((shapes.factors["noise"] == 0) & (shapes.factors["clutter"] == 0)).nonzero()[:, 0]
    for i in quiet[:20].tolist():
        pixels = shapes.images[i].reshape(3, -1).T
        assert len(torch.unique(pixels, dim=0)) < 200, f"image {i}"


def test_noisy_images_have_many_colours(shapes: object) -> None:
    noisy = (shapes.factors["noise"] > 0.1).nonzero()[:, 0]
    for i in noisy[:20].tolist():
        pixels = shapes.images[i].reshape(3, -1).T
        assert len(torch.unique(pixels, dim=0)) > 500, f"image {i}"


# -- dataset helpers keep the factors ------------------------------------------------------------


def test_subset_selects_factors(shapes: object) -> None:
    subset = shapes.subset([5, 2, 5])
    for name in FACTOR_NAMES:
        assert torch.equal(subset.factors[name], shapes.factors[name][[5, 2, 5]]), name


def test_head_slices_factors(shapes: object) -> None:
    head = shapes.head(10)
    for name in FACTOR_NAMES:
        assert torch.equal(head.factors[name], shapes.factors[name][:10]), name


# -- contact sheet -------------------------------------------------------------------------------


def test_save_contact_sheet_writes_grid(shapes: object, tmp_path: Path) -> None:
    path = save_contact_sheet(shapes, tmp_path / "sheet" / "shapes.png", rows=3, cols=4, zoom=2)
    with Image.open(path) as image:
        # 32-pixel cells with 2 pixels of padding, doubled by the zoom.
        assert image.size == (2 * (4 * 34 + 2), 2 * (3 * 34 + 2))
        assert image.mode == "RGB"


def test_save_contact_sheet_rejects_small_dataset(shapes: object, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"`dataset` has 4 images, fewer than rows \* cols = 6"):
        save_contact_sheet(shapes.head(4), tmp_path / "sheet.png", rows=2, cols=3)


def test_save_contact_sheet_rejects_zero_rows(shapes: object, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"`rows` must be >= 1, got 0"):
        save_contact_sheet(shapes, tmp_path / "sheet.png", rows=0)


# -- invalid arguments ---------------------------------------------------------------------------


@pytest.mark.parametrize("num_images", [0, -5])
def test_make_shapes_rejects_non_positive_num_images(num_images: int) -> None:
    with pytest.raises(ConfigError, match=rf"`num_images` must be a positive integer, got {num_images}"):
        make_shapes(num_images, seed=0)


def test_make_shapes_rejects_float_num_images() -> None:
    with pytest.raises(ConfigError, match=r"`num_images` must be a positive integer, got 2\.5"):
        make_shapes(2.5, seed=0)  # type: ignore[arg-type]


def test_make_shapes_rejects_small_image_size() -> None:
    with pytest.raises(ConfigError, match=r"`image_size` must be an integer >= 16 .*got 8"):
        make_shapes(10, seed=0, image_size=8)


def test_make_shapes_rejects_negative_seed() -> None:
    with pytest.raises(ConfigError, match=r"`seed` must be an integer in \[0, 2147483647\], got -1"):
        make_shapes(10, seed=-1)


def test_load_shapes_rejects_unknown_split() -> None:
    with pytest.raises(ConfigError, match=r"`split` must be one of \('train', 'test'\) .*got 'valid'"):
        load_shapes("valid")


def test_load_shapes_rejects_zero_num_images() -> None:
    with pytest.raises(ConfigError, match=r"`num_images` must be a positive integer, got 0"):
        load_shapes("train", num_images=0)
