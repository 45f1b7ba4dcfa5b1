"""Tests for blockdrop_env.data: ImageFolder and CIFAR loaders, dataset helpers."""

from __future__ import annotations

import pickle
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import ImageFolder

from blockdrop_env import data as data_module
from blockdrop_env.data import (
    ImageDataset,
    check_same_classes,
    load_cifar,
    load_dataset,
    load_image_folder,
)
from blockdrop_env.errors import ConfigError, DatasetError

CLASSES = ["cat", "dog", "frog"]
IMAGES_PER_CLASS = 4
REAL_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10-jpeg"
CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip


# -- helpers -------------------------------------------------------------------------------------


def pixels_for(class_index: int, image_index: int, size: tuple[int, int] = (8, 8)) -> np.ndarray:
    """Distinct, reproducible (H, W, 3) uint8 pixels for one test image."""
    rng = np.random.default_rng(100 * class_index + image_index)
    return rng.integers(0, 256, (*size, 3), dtype=np.uint8)


def write_image(path: Path, pixels: np.ndarray, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # WebP is lossy unless asked otherwise; the pixel checks need exact values.
    options = {"lossless": True} if path.suffix == ".webp" else {}
    Image.fromarray(pixels).convert(mode).save(path, **options)


def pil_pixels(path: str | Path) -> torch.Tensor:
    """Decode a file as torchvision's ImageFolder does, as a (3, H, W) tensor."""
    with Image.open(path) as image:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


def make_image_folder(directory: Path, suffix: str = ".png") -> Path:
    """Write CLASSES x IMAGES_PER_CLASS 8x8 RGB images to directory/<class>/<i><suffix>."""
    for class_index, name in enumerate(CLASSES):
        for image_index in range(IMAGES_PER_CLASS):
            path = directory / name / f"{image_index:02d}{suffix}"
            write_image(path, pixels_for(class_index, image_index))
    return directory


def cifar_pickle(content: object) -> bytes:
    """Pickle like the official CIFAR files: protocol 2 and numpy 1.x module names."""
    return pickle.dumps(content, protocol=2).replace(b"numpy._core.", b"numpy.core.")


def cifar_data(num_images: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (num_images, 3072), dtype=np.uint8)


def make_cifar10(root: Path, images_per_batch: int = 3) -> Path:
    """Write a tiny CIFAR-10 release in torchvision's layout under root/cifar-10-batches-py."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    meta = {"label_names": CIFAR10_CLASSES, "num_cases_per_batch": images_per_batch}
    (folder / "batches.meta").write_bytes(cifar_pickle(meta))
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for seed, name in enumerate(names):
        labels = [(seed + i) % 10 for i in range(images_per_batch)]
        batch = {"batch_label": name, "labels": labels, "data": cifar_data(images_per_batch, seed)}
        (folder / name).write_bytes(cifar_pickle(batch))
    return folder


def make_cifar100(root: Path, num_images: int = 4) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    fine_names = [f"fine{i:03d}" for i in range(100)]
    meta = {"fine_label_names": fine_names, "coarse_label_names": [f"c{i}" for i in range(20)]}
    (folder / "meta").write_bytes(cifar_pickle(meta))
    for seed, name in enumerate(["train", "test"]):
        split = {
            "data": cifar_data(num_images, seed),
            "fine_labels": [99 - i for i in range(num_images)],
            "coarse_labels": [i for i in range(num_images)],
        }
        (folder / name).write_bytes(cifar_pickle(split))
    return folder


def read_batch(path: Path) -> dict:
    return pickle.loads(path.read_bytes(), encoding="latin1")


# -- ImageFolder: loading ------------------------------------------------------------------------


def test_load_image_folder_shapes_and_dtypes(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "train")
    dataset = load_image_folder(tmp_path, "train")
    assert dataset.images.shape == (12, 3, 8, 8)
    assert dataset.images.dtype == torch.uint8
    assert dataset.labels.dtype == torch.int64
    assert dataset.image_size == (8, 8)
    assert dataset.name == f"imagefolder:{tmp_path / 'train'}"


def test_load_image_folder_labels_follow_sorted_class_names(tmp_path: Path) -> None:
    for name in ["zebra", "ant", "mole"]:
        write_image(tmp_path / name / "0.png", pixels_for(0, 0))
    dataset = load_image_folder(tmp_path)
    assert dataset.classes == ["ant", "mole", "zebra"]
    assert dataset.labels.tolist() == [0, 1, 2]


def test_load_image_folder_pixels_round_trip(tmp_path: Path) -> None:
    make_image_folder(tmp_path)
    dataset = load_image_folder(tmp_path)
    for class_index in range(len(CLASSES)):
        for image_index in range(IMAGES_PER_CLASS):
            i = class_index * IMAGES_PER_CLASS + image_index
            expected = torch.from_numpy(pixels_for(class_index, image_index)).permute(2, 0, 1)
            assert torch.equal(dataset.images[i], expected), f"image {i}"
            assert dataset.labels[i] == class_index


def test_load_image_folder_matches_torchvision_order(tmp_path: Path) -> None:
    make_image_folder(tmp_path)
    write_image(tmp_path / "dog" / "nested" / "00.png", pixels_for(7, 0))
    write_image(tmp_path / "dog" / "10.PNG", pixels_for(7, 1))
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    dataset = load_image_folder(tmp_path)
    reference = ImageFolder(str(tmp_path))
    assert dataset.classes == reference.classes
    assert dataset.labels.tolist() == reference.targets
    for i, (path, _) in enumerate(reference.samples):
        expected = pil_pixels(path)
        assert torch.equal(dataset.images[i], expected), path


def test_load_image_folder_decodes_jpeg_like_pil(tmp_path: Path) -> None:
    make_image_folder(tmp_path, suffix=".jpg")
    dataset = load_image_folder(tmp_path)
    first = tmp_path / CLASSES[0] / "00.jpg"
    expected = pil_pixels(first)
    assert dataset.images.shape == (12, 3, 8, 8)
    assert torch.equal(dataset.images[0], expected)


@pytest.mark.parametrize("suffix", [".bmp", ".tiff", ".webp", ".ppm"])
def test_load_image_folder_reads_other_formats(tmp_path: Path, suffix: str) -> None:
    write_image(tmp_path / "a" / f"0{suffix}", pixels_for(0, 0))
    dataset = load_image_folder(tmp_path)
    expected = torch.from_numpy(pixels_for(0, 0)).permute(2, 0, 1)
    assert torch.equal(dataset.images[0], expected)


def test_load_image_folder_threads_match_serial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_image_folder(tmp_path)
    monkeypatch.setattr(data_module, "_MAX_CHUNK_SIZE", 5)
    serial = load_image_folder(tmp_path, num_workers=0)
    threaded = load_image_folder(tmp_path, num_workers=3)
    assert torch.equal(serial.images, threaded.images)
    assert torch.equal(serial.labels, threaded.labels)


def test_load_image_folder_large_images_threaded(tmp_path: Path) -> None:
    for class_index, name in enumerate(CLASSES):
        write_image(tmp_path / name / "0.png", pixels_for(class_index, 0, size=(64, 80)))
    dataset = load_image_folder(tmp_path)
    assert dataset.images.shape == (3, 3, 64, 80)
    for class_index in range(len(CLASSES)):
        expected = torch.from_numpy(pixels_for(class_index, 0, size=(64, 80))).permute(2, 0, 1)
        assert torch.equal(dataset.images[class_index], expected)


def test_load_image_folder_accepts_matching_image_size(tmp_path: Path) -> None:
    make_image_folder(tmp_path)
    dataset = load_image_folder(tmp_path, image_size=(8, 8))
    assert dataset.image_size == (8, 8)


def test_load_image_folder_shows_progress_bar(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_image_folder(tmp_path)
    load_image_folder(tmp_path, progress=True)
    assert "decoding" in capsys.readouterr().err


def test_load_image_folder_warns_on_split_names(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "train")
    make_image_folder(tmp_path / "test")
    with pytest.warns(UserWarning, match="named like splits"):
        dataset = load_image_folder(tmp_path)
    assert dataset.classes == ["test", "train"]


# -- ImageFolder: errors -------------------------------------------------------------------------


def test_load_image_folder_rejects_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"dataset directory .*missing not found"):
        load_image_folder(tmp_path / "missing")


def test_load_image_folder_rejects_file_as_root(tmp_path: Path) -> None:
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DatasetError, match="found a file there"):
        load_image_folder(tmp_path / "file.txt")


def test_load_image_folder_rejects_missing_split(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "train")
    make_image_folder(tmp_path / "val")
    with pytest.raises(DatasetError, match=r"split directory .*test not found; .*: train, val"):
        load_image_folder(tmp_path, "test")


def test_load_image_folder_rejects_no_class_folders(tmp_path: Path) -> None:
    write_image(tmp_path / "0.png", pixels_for(0, 0))
    with pytest.raises(DatasetError, match="contains no class subdirectories"):
        load_image_folder(tmp_path)


def test_load_image_folder_rejects_empty_class_folder(tmp_path: Path) -> None:
    make_image_folder(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(DatasetError, match=r"class folder .*empty contains no image files"):
        load_image_folder(tmp_path)


def test_load_image_folder_rejects_unreadable_image(tmp_path: Path) -> None:
    make_image_folder(tmp_path)
    (tmp_path / "dog" / "broken.png").write_bytes(b"this is not a png")
    with pytest.raises(DatasetError, match=r"broken\.png is not a readable image"):
        load_image_folder(tmp_path)


def test_load_image_folder_rejects_truncated_jpeg(tmp_path: Path) -> None:
    make_image_folder(tmp_path, suffix=".jpg")
    path = tmp_path / "frog" / "01.jpg"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DatasetError, match=r"01\.jpg is not a readable image"):
        load_image_folder(tmp_path)


def test_load_image_folder_rejects_empty_file(tmp_path: Path) -> None:
    make_image_folder(tmp_path)
    (tmp_path / "cat" / "zero.png").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"zero\.png is not a readable image"):
        load_image_folder(tmp_path)


@pytest.mark.parametrize(
    ("mode", "suffix"), [("L", ".png"), ("L", ".jpg"), ("CMYK", ".jpg"), ("RGBA", ".png")]
)
def test_load_image_folder_rejects_non_rgb_image(tmp_path: Path, mode: str, suffix: str) -> None:
    make_image_folder(tmp_path)
    write_image(tmp_path / "cat" / f"odd{suffix}", pixels_for(0, 0), mode=mode)
    pattern = rf"odd\{suffix} has mode {mode}, expected RGB; convert it to RGB"
    with pytest.raises(DatasetError, match=pattern):
        load_image_folder(tmp_path)


def test_load_image_folder_rejects_mixed_sizes(tmp_path: Path) -> None:
    make_image_folder(tmp_path)
    write_image(tmp_path / "dog" / "big.png", pixels_for(0, 0, size=(9, 10)))
    pattern = r"big\.png has \(height, width\) \(9, 10\), expected \(8, 8\)"
    with pytest.raises(DatasetError, match=pattern):
        load_image_folder(tmp_path)


def test_load_image_folder_threads_name_first_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_image_folder(tmp_path)
    write_image(tmp_path / "dog" / "02.png", pixels_for(0, 0, size=(9, 9)))
    write_image(tmp_path / "frog" / "03.png", pixels_for(0, 0, size=(7, 7)))
    monkeypatch.setattr(data_module, "_MAX_CHUNK_SIZE", 2)
    with pytest.raises(DatasetError, match=r"dog/02\.png has \(height, width\) \(9, 9\)"):
        load_image_folder(tmp_path, num_workers=4)


def test_load_image_folder_rejects_image_size_mismatch(tmp_path: Path) -> None:
    make_image_folder(tmp_path)
    pattern = r"00\.png has \(height, width\) \(8, 8\), but `image_size` is \(32, 32\)"
    with pytest.raises(DatasetError, match=pattern):
        load_image_folder(tmp_path, image_size=(32, 32))


@pytest.mark.parametrize("image_size", [(8,), (0, 8), (8.0, 8), (True, 8), "8x8"])
def test_load_image_folder_rejects_invalid_image_size(tmp_path: Path, image_size: object) -> None:
    make_image_folder(tmp_path)
    with pytest.raises(ConfigError, match=re.escape("`image_size` must be (height, width)")):
        load_image_folder(tmp_path, image_size=image_size)  # type: ignore[arg-type]


def test_load_image_folder_rejects_negative_num_workers(tmp_path: Path) -> None:
    make_image_folder(tmp_path)
    with pytest.raises(ConfigError, match="`num_workers` must be >= 0, got -1"):
        load_image_folder(tmp_path, num_workers=-1)


# -- CIFAR ---------------------------------------------------------------------------------------


def test_load_cifar10_train_concatenates_five_batches(tmp_path: Path) -> None:
    folder = make_cifar10(tmp_path)
    dataset = load_cifar(tmp_path, "train")
    batches = [read_batch(folder / f"data_batch_{i}") for i in range(1, 6)]
    assert dataset.images.shape == (15, 3, 32, 32)
    assert dataset.images.dtype == torch.uint8
    assert dataset.labels.tolist() == [label for batch in batches for label in batch["labels"]]
    assert dataset.classes == CIFAR10_CLASSES


def test_load_cifar10_pixels_follow_channel_planes(tmp_path: Path) -> None:
    folder = make_cifar10(tmp_path)
    dataset = load_cifar(tmp_path, "test")
    data = read_batch(folder / "test_batch")["data"]
    # One row is 1024 red, then 1024 green, then 1024 blue values, each plane row-major.
    assert dataset.images[1, 0, 0, 5] == data[1, 5]
    assert dataset.images[1, 1, 2, 3] == data[1, 1024 + 2 * 32 + 3]
    assert dataset.images[2, 2, 31, 31] == data[2, 3071]
    assert torch.equal(dataset.images.reshape(3, -1), torch.from_numpy(data))


def test_load_cifar_accepts_batches_folder_itself(tmp_path: Path) -> None:
    folder = make_cifar10(tmp_path)
    dataset = load_cifar(folder, "test")
    assert len(dataset) == 3
    assert dataset.name == f"cifar10:{folder}:test"


def test_load_cifar100_uses_fine_labels(tmp_path: Path) -> None:
    make_cifar100(tmp_path)
    dataset = load_cifar(tmp_path, "train", num_classes=100)
    assert dataset.images.shape == (4, 3, 32, 32)
    assert dataset.labels.tolist() == [99, 98, 97, 96]
    assert dataset.classes[:2] == ["fine000", "fine001"]
    assert dataset.num_classes == 100


def test_load_cifar_rejects_missing_files_with_download_hint(tmp_path: Path) -> None:
    pattern = (
        r"CIFAR-10 files not found: .*CIFAR10\(.*, download=True\) or extract "
        r"https://www\.cs\.toronto\.edu/~kriz/cifar-10-python\.tar\.gz"
    )
    with pytest.raises(DatasetError, match=pattern):
        load_cifar(tmp_path, "train")


def test_load_cifar_rejects_missing_batch(tmp_path: Path) -> None:
    folder = make_cifar10(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match=r"data_batch_3 not found; download the set again"):
        load_cifar(tmp_path, "train")


def test_load_cifar_rejects_truncated_batch(tmp_path: Path) -> None:
    folder = make_cifar10(tmp_path)
    path = folder / "test_batch"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(DatasetError, match=r"test_batch is truncated or corrupt"):
        load_cifar(tmp_path, "test")


def test_load_cifar_rejects_pickle_with_other_globals(tmp_path: Path) -> None:
    folder = make_cifar10(tmp_path)
    (folder / "test_batch").write_bytes(pickle.dumps({"data": Path("x")}))
    with pytest.raises(DatasetError, match=r"global pathlib\..* is not allowed"):
        load_cifar(tmp_path, "test")


def test_load_cifar_rejects_wrong_data_shape(tmp_path: Path) -> None:
    folder = make_cifar10(tmp_path)
    batch = {"data": np.zeros((2, 100), dtype=np.uint8), "labels": [0, 1]}
    (folder / "test_batch").write_bytes(cifar_pickle(batch))
    with pytest.raises(DatasetError, match=r"must contain 'data' as uint8 \(N, 3072\)"):
        load_cifar(tmp_path, "test")


def test_load_cifar_rejects_label_count_mismatch(tmp_path: Path) -> None:
    folder = make_cifar10(tmp_path)
    batch = {"data": cifar_data(3, 0), "labels": [0, 1]}
    (folder / "test_batch").write_bytes(cifar_pickle(batch))
    with pytest.raises(DatasetError, match=r"labels of shape \(2,\)"):
        load_cifar(tmp_path, "test")


def test_load_cifar_rejects_out_of_range_labels(tmp_path: Path) -> None:
    folder = make_cifar10(tmp_path)
    batch = {"data": cifar_data(2, 0), "labels": [0, 10]}
    (folder / "test_batch").write_bytes(cifar_pickle(batch))
    with pytest.raises(DatasetError, match=r"labels from 0 to 10, expected 0\.\.9"):
        load_cifar(tmp_path, "test")


def test_load_cifar_rejects_non_integer_labels(tmp_path: Path) -> None:
    folder = make_cifar10(tmp_path)
    batch = {"data": cifar_data(2, 0), "labels": ["cat", "dog"]}
    (folder / "test_batch").write_bytes(cifar_pickle(batch))
    with pytest.raises(DatasetError, match=r"labels of shape \(0,\)"):
        load_cifar(tmp_path, "test")


def test_load_cifar_rejects_wrong_class_count(tmp_path: Path) -> None:
    folder = make_cifar10(tmp_path)
    (folder / "batches.meta").write_bytes(cifar_pickle({"label_names": ["a", "b"]}))
    with pytest.raises(DatasetError, match=r"must contain 10 class names .*a list of 2 items"):
        load_cifar(tmp_path, "test")


def test_load_cifar_rejects_unknown_num_classes(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="`num_classes` must be 10 or 100 for CIFAR, got 20"):
        load_cifar(tmp_path, "test", num_classes=20)


def test_load_cifar_rejects_unknown_split(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"`split` must be one of \('train', 'test'\), got 'val'"):
        load_cifar(tmp_path, "val")


# -- load_dataset --------------------------------------------------------------------------------


def test_load_dataset_reads_image_folder_split(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "test")
    dataset = load_dataset("imagefolder", tmp_path, "test")
    assert len(dataset) == 12
    assert dataset.classes == CLASSES


@pytest.mark.parametrize(("name", "num_classes"), [("cifar10", 10), ("cifar100", 100)])
def test_load_dataset_reads_cifar(tmp_path: Path, name: str, num_classes: int) -> None:
    make_cifar10(tmp_path)
    make_cifar100(tmp_path)
    dataset = load_dataset(name, tmp_path, "test")
    assert dataset.num_classes == num_classes
    assert dataset.images.shape[1:] == (3, 32, 32)


def test_load_dataset_rejects_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"`name` must be one of \('imagefolder',.*got 'mnist'"):
        load_dataset("mnist", tmp_path, "train")


def test_load_dataset_rejects_unknown_split(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"`split` must be one of .*got 'valid'"):
        load_dataset("imagefolder", tmp_path, "valid")


@pytest.mark.parametrize("name", ["imagefolder", "cifar10", "cifar100"])
def test_load_dataset_requires_data_dir_for_files(name: str) -> None:
    with pytest.raises(ConfigError, match=rf"`data_dir` is required for the '{name}' dataset"):
        load_dataset(name, None, "train")


@pytest.mark.parametrize("data_dir", [None, "/nonexistent/folder"])
def test_load_dataset_shapes_ignores_data_dir(
    monkeypatch: pytest.MonkeyPatch, data_dir: str | None
) -> None:
    from blockdrop_env import shapes

    calls: list[str] = []

    def fake_load_shapes(split: str) -> ImageDataset:
        calls.append(split)
        return small_dataset()

    monkeypatch.setattr(shapes, "load_shapes", fake_load_shapes)
    dataset = load_dataset("shapes", data_dir, "test")
    assert calls == ["test"]
    assert dataset.name == "small"


def test_load_dataset_lists_shapes() -> None:
    assert "shapes" in data_module.DATASET_NAMES


# -- ImageDataset helpers ------------------------------------------------------------------------


def small_dataset(classes: list[str] | None = None) -> ImageDataset:
    images = torch.arange(5, dtype=torch.uint8).view(5, 1, 1, 1).expand(5, 3, 2, 2).clone()
    return ImageDataset(images, torch.tensor([0, 1, 0, 1, 1]), classes or ["a", "b"], "small")


def test_subset_keeps_requested_order() -> None:
    subset = small_dataset().subset([4, 0, 4])
    assert subset.images[:, 0, 0, 0].tolist() == [4, 0, 4]
    assert subset.labels.tolist() == [1, 0, 1]
    assert subset.classes == ["a", "b"]
    assert subset.name == "small[3 of 5]"


def test_subset_accepts_tensor_and_empty_indices() -> None:
    dataset = small_dataset()
    assert len(dataset.subset(torch.tensor([1, 2]))) == 2
    assert len(dataset.subset([])) == 0


def test_subset_copies_images() -> None:
    dataset = small_dataset()
    subset = dataset.subset([0])
    subset.images.fill_(200)
    assert dataset.images[0, 0, 0, 0] == 0


def test_subset_rejects_out_of_range_index() -> None:
    pattern = r"`indices` must lie in \[0, 5\), got values from 0 to 5"
    with pytest.raises(ConfigError, match=pattern):
        small_dataset().subset([0, 5])


def test_subset_rejects_negative_index() -> None:
    with pytest.raises(ConfigError, match=r"`indices` must lie in \[0, 5\)"):
        small_dataset().subset([-1])


def test_subset_rejects_float_indices() -> None:
    with pytest.raises(ConfigError, match="`indices` must be a 1-D sequence of integers"):
        small_dataset().subset([0.0, 1.0])  # type: ignore[list-item]


def test_subset_rejects_boolean_mask() -> None:
    with pytest.raises(ConfigError, match="got dtype torch.bool"):
        small_dataset().subset(torch.tensor([True, False, True, False, True]))


def test_head_takes_first_samples() -> None:
    dataset = small_dataset()
    head = dataset.head(2)
    assert head.images[:, 0, 0, 0].tolist() == [0, 1]
    assert head.labels.tolist() == [0, 1]
    assert len(dataset.head(10)) == 5


def test_head_rejects_negative_count() -> None:
    with pytest.raises(ConfigError, match="`num_samples` must be >= 0, got -1"):
        small_dataset().head(-1)


def with_factors(dataset: ImageDataset) -> ImageDataset:
    dataset.factors = {"difficulty": torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4])}
    return dataset


def test_image_dataset_factors_default_to_none() -> None:
    assert small_dataset().factors is None
    assert small_dataset().subset([1]).factors is None
    assert small_dataset().head(2).factors is None


def test_subset_selects_factors() -> None:
    subset = with_factors(small_dataset()).subset([4, 0, 4])
    assert subset.factors is not None
    assert subset.factors["difficulty"].tolist() == pytest.approx([0.4, 0.0, 0.4])


def test_head_slices_factors() -> None:
    head = with_factors(small_dataset()).head(2)
    assert head.factors is not None
    assert head.factors["difficulty"].tolist() == pytest.approx([0.0, 0.1])


def test_image_dataset_rejects_factor_of_wrong_length() -> None:
    images = torch.zeros(5, 3, 2, 2, dtype=torch.uint8)
    factors = {"noise": torch.zeros(4)}
    with pytest.raises(DatasetError, match=r"`factors\['noise'\]` must be a tensor of shape \(5,\).*got \(4,\)"):
        ImageDataset(images, torch.zeros(5), ["a"], factors=factors)


def test_image_dataset_rejects_two_dimensional_factor() -> None:
    images = torch.zeros(5, 3, 2, 2, dtype=torch.uint8)
    factors = {"noise": torch.zeros(5, 1)}
    with pytest.raises(DatasetError, match=r"`factors\['noise'\]` must be a tensor .*got \(5, 1\)"):
        ImageDataset(images, torch.zeros(5), ["a"], factors=factors)


def test_image_dataset_rejects_non_tensor_factor() -> None:
    images = torch.zeros(5, 3, 2, 2, dtype=torch.uint8)
    factors = {"noise": [0.0] * 5}
    with pytest.raises(DatasetError, match=r"`factors\['noise'\]` must be a tensor .*got <class 'list'>"):
        ImageDataset(images, torch.zeros(5), ["a"], factors=factors)  # type: ignore[dict-item]


def test_check_same_classes_accepts_equal_lists() -> None:
    check_same_classes(small_dataset(), small_dataset())


def test_check_same_classes_rejects_different_names() -> None:
    with pytest.raises(DatasetError, match=r"only in small: \['b'\], only in small: \['c'\]"):
        check_same_classes(small_dataset(), small_dataset(["a", "c"]))


def test_check_same_classes_rejects_different_order() -> None:
    with pytest.raises(DatasetError, match="same names in a different order"):
        check_same_classes(small_dataset(), small_dataset(["b", "a"]))


# -- real data -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_test_split() -> tuple[ImageDataset, float]:
    """The real CIFAR-10 JPEG test split and the seconds it took to load."""
    if not (REAL_DATA / "test").is_dir():
        pytest.skip(f"real data not found at {REAL_DATA}")
    start = time.perf_counter()
    dataset = load_dataset("imagefolder", REAL_DATA, "test")
    return dataset, time.perf_counter() - start


@pytest.mark.real_data
def test_real_cifar10_jpeg_test_split(real_test_split: tuple[ImageDataset, float]) -> None:
    dataset, seconds = real_test_split
    print(f"decoded {len(dataset)} images in {seconds:.2f} s")
    assert dataset.images.shape == (10000, 3, 32, 32)
    assert dataset.classes == CIFAR10_CLASSES
    assert torch.bincount(dataset.labels).tolist() == [1000] * 10
    assert dataset.images.is_contiguous()


@pytest.mark.real_data
def test_real_cifar10_jpeg_pixels_match_pil(real_test_split: tuple[ImageDataset, float]) -> None:
    dataset, _ = real_test_split
    reference = ImageFolder(str(REAL_DATA / "test"))
    for i in range(0, len(reference.samples), 97):
        path, label = reference.samples[i]
        assert torch.equal(dataset.images[i], pil_pixels(path)), path
        assert dataset.labels[i] == label


def test_sample_is_fixed_and_spans_classes():
    labels = torch.arange(3).repeat_interleave(20)
    images = torch.zeros(60, 3, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(60, dtype=torch.uint8)
    dataset = ImageDataset(images, labels, ["a", "b", "c"], "sorted by class")
    first = dataset.sample(12, seed=0)
    second = dataset.sample(12, seed=0)
    assert len(first) == 12
    assert torch.equal(first.images, second.images)
    assert set(first.labels.tolist()) == {0, 1, 2}
    assert first.images[:, 0, 0, 0].tolist() == sorted(first.images[:, 0, 0, 0].tolist())
    assert not torch.equal(dataset.sample(12, seed=1).images, first.images)
    assert dataset.sample(None) is dataset
    assert dataset.sample(60) is dataset


def test_sample_rejects_negative_count():
    dataset = ImageDataset(torch.zeros(5, 3, 4, 4, dtype=torch.uint8), torch.zeros(5), ["a"], "tiny")
    with pytest.raises(ConfigError, match="`num_samples` must be >= 0, got -1"):
        dataset.sample(-1)
