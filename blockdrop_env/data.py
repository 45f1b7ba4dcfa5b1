"""Image datasets decoded once into uint8 tensors held in memory.

Two sources:

* ImageFolder trees (``root/<split>/<class>/<image files>``), read in the order of
  ``torchvision.datasets.ImageFolder`` and decoded with PIL, as ImageFolder decodes them.
* torchvision's CIFAR-10/100 python-format files (``cifar-10-batches-py``, ``cifar-100-python``).
* the built-in procedural shape set of :mod:`blockdrop_env.shapes`, generated in memory.

Every loader returns an :class:`ImageDataset`: one (N, 3, H, W) uint8 tensor and one (N,) int64
label tensor, with no per-image Python objects kept.
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS
from tqdm import tqdm

from blockdrop_env.errors import ConfigError, DatasetError

DATASET_NAMES = ("imagefolder", "cifar10", "cifar100", "shapes")
SPLITS = ("train", "test")

IMAGE_EXTENSIONS: tuple[str, ...] = tuple(IMG_EXTENSIONS)
"""File extensions read from an ImageFolder tree (torchvision's list); other files are skipped."""

_MAX_CHUNK_SIZE = 512
_MAX_DEFAULT_WORKERS = 8
_MIN_PIXELS_FOR_THREADS = 64 * 64


@dataclass
class ImageDataset:
    """A labelled image set in memory.

    Attributes:
        images: uint8 tensor (N, 3, H, W), pixels as stored in the files.
        labels: int64 tensor (N,), class indices into ``classes``.
        classes: Class names in label order.
        name: Short description for logs, e.g. ``"imagefolder:/data/cifar10-jpeg/test"``.
        factors: Optional per-image values by name, each an (N,) tensor, e.g. the difficulty
            factors of the shape set; ``subset`` and ``head`` select them with the images.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    name: str = "dataset"
    factors: dict[str, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or self.images.shape[1] != 3:
            raise DatasetError(
                f"`images` must be a uint8 tensor (N, 3, H, W), got dtype {self.images.dtype} "
                f"and shape {tuple(self.images.shape)}"
            )
        if self.labels.dim() != 1 or self.labels.shape[0] != self.images.shape[0]:
            raise DatasetError(
                f"`labels` must have shape ({self.images.shape[0]},), got {tuple(self.labels.shape)}"
            )
        self.labels = self.labels.to(torch.int64)
        self._validate_factors()

    def _validate_factors(self) -> None:
        for key, values in (self.factors or {}).items():
            if not isinstance(values, torch.Tensor) or values.shape != (len(self),):
                shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values)
                raise DatasetError(
                    f"`factors[{key!r}]` must be a tensor of shape ({len(self)},), one value per "
                    f"image, got {shape}"
                )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of every image."""
        return int(self.images.shape[2]), int(self.images.shape[3])

    def subset(self, indices: torch.Tensor | Sequence[int]) -> ImageDataset:
        """Copy the samples at ``indices``, in that order, into a new dataset.

        Args:
            indices: 1-D integer indices in ``[0, len(self))``; repeats are allowed.

        Returns:
            A dataset with its own copy of the selected images and labels and the same classes.

        Raises:
            ConfigError: if ``indices`` is not 1-D, not integer or out of range.
        """
        index = _validate_indices(indices, len(self))
        return ImageDataset(
            images=self.images[index],
            labels=self.labels[index],
            classes=list(self.classes),
            name=f"{self.name}[{index.numel()} of {len(self)}]",
            factors=self._select_factors(index),
        )

    def sample(self, num_samples: int | None, seed: int = 0) -> ImageDataset:
        """Take a fixed random subset of ``num_samples`` samples, kept in dataset order.

        Use it instead of :meth:`head` for a representative subset: ImageFolder trees are sorted
        by class, so their first N images miss whole classes. ``None``, or a count of at least
        the dataset's size, returns the dataset itself.

        Raises:
            ConfigError: if ``num_samples`` is negative.
        """
        if num_samples is None or num_samples >= len(self):
            return self
        if num_samples < 0:
            raise ConfigError(f"`num_samples` must be >= 0, got {num_samples}")
        generator = torch.Generator().manual_seed(seed)
        indices = torch.randperm(len(self), generator=generator)[:num_samples].sort().values
        return self.subset(indices)

    def head(self, num_samples: int) -> ImageDataset:
        """Take the first ``num_samples`` samples (all of them if there are fewer).

        The result shares memory with this dataset, so it costs no copy.

        Raises:
            ConfigError: if ``num_samples`` is negative.
        """
        if num_samples < 0:
            raise ConfigError(f"`num_samples` must be >= 0, got {num_samples}")
        if num_samples >= len(self):
            return self
        return ImageDataset(
            images=self.images[:num_samples],
            labels=self.labels[:num_samples],
            classes=list(self.classes),
            name=f"{self.name}[:{num_samples}]",
            factors=self._select_factors(slice(num_samples)),
        )

    def _select_factors(self, index: torch.Tensor | slice) -> dict[str, torch.Tensor] | None:
        if self.factors is None:
            return None
        return {key: values[index] for key, values in self.factors.items()}


def _validate_indices(indices: torch.Tensor | Sequence[int], size: int) -> torch.Tensor:
    index = torch.as_tensor(indices)
    if index.numel() == 0:
        index = index.to(torch.int64)
    if index.dim() != 1 or index.dtype.is_floating_point or index.dtype == torch.bool:
        raise ConfigError(
            f"`indices` must be a 1-D sequence of integers, got dtype {index.dtype} and shape "
            f"{tuple(index.shape)}; pass positions such as [0, 5, 7]"
        )
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= size):
        raise ConfigError(
            f"`indices` must lie in [0, {size}), got values from {int(index.min())} to "
            f"{int(index.max())}"
        )
    return index.to(torch.int64)


def check_same_classes(a: ImageDataset, b: ImageDataset) -> None:
    """Check that two datasets, e.g. a train and a test split, use the same labels.

    Raises:
        DatasetError: if the class lists differ in names or order.
    """
    if a.classes == b.classes:
        return
    only_a = sorted(set(a.classes) - set(b.classes))
    only_b = sorted(set(b.classes) - set(a.classes))
    difference = f"only in {a.name}: {only_a}, only in {b.name}: {only_b}"
    if not only_a and not only_b:
        difference = f"same names in a different order: {a.classes} vs {b.classes}"
    raise DatasetError(
        f"{a.name} and {b.name} have different classes ({difference}); give both splits the "
        "same class folders"
    )


def load_dataset(
    name: str, data_dir: str | Path | None, split: str, *, progress: bool = False
) -> ImageDataset:
    """Load one split of a dataset by name.

    Args:
        name: One of :data:`DATASET_NAMES`: ``"imagefolder"`` reads ``data_dir/<split>/<class>/``
            with :func:`load_image_folder`; ``"cifar10"`` and ``"cifar100"`` read torchvision's
            CIFAR files with :func:`load_cifar`. ``"shapes"`` generates the built-in shape set
            with :func:`blockdrop_env.shapes.load_shapes` (50,000 train and 10,000 test images).
        data_dir: Root folder of the dataset; ignored for ``"shapes"``, which may pass ``None``.
        split: One of :data:`SPLITS`.
        progress: Show a progress bar while images are decoded (ImageFolder only).

    Returns:
        The decoded split.

    Raises:
        ConfigError: if ``name`` or ``split`` is not one of the allowed values, or
            ``data_dir`` is ``None`` for a dataset read from files.
        DatasetError: if the files are missing or invalid.
    """
    if name not in DATASET_NAMES:
        raise ConfigError(f"`name` must be one of {DATASET_NAMES}, got {name!r}")
    _validate_split(split)
    if name == "shapes":
        # Imported here because the shapes module builds on ImageDataset from this module.
        from blockdrop_env.shapes import load_shapes

        return load_shapes(split)
    if data_dir is None:
        raise ConfigError(
            f"`data_dir` is required for the {name!r} dataset, got None; pass the folder that "
            "contains its files"
        )
    if name == "imagefolder":
        return load_image_folder(data_dir, split, progress=progress)
    return load_cifar(data_dir, split, num_classes=10 if name == "cifar10" else 100)


def _validate_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"`split` must be one of {SPLITS}, got {split!r}")


# -- ImageFolder trees ---------------------------------------------------------------------------


def load_image_folder(
    root: str | Path,
    split: str | None = None,
    *,
    image_size: tuple[int, int] | None = None,
    num_workers: int | None = None,
    progress: bool = False,
) -> ImageDataset:
    """Decode every image of an ImageFolder tree into one uint8 tensor.

    The layout is ``root/<split>/<class>/<image files>``, or ``root/<class>/<image files>`` when
    ``split`` is None. Classes are the sorted subdirectory names and files are listed as
    ``torchvision.datasets.ImageFolder`` lists them (recursively, sorted, following links), so
    sample i here is sample i there. Files whose extension is not in :data:`IMAGE_EXTENSIONS`
    are skipped, as ImageFolder skips them. EXIF orientation is not applied, as in ImageFolder.

    Args:
        root: Dataset folder.
        split: Subdirectory of ``root`` to read, e.g. ``"train"``; None reads ``root`` itself.
        image_size: Required (height, width) of every image; None takes the first image's size.
        num_workers: Decoding threads; 0 or 1 decodes in the calling thread. None decodes images
            smaller than 64x64 pixels in the calling thread and larger ones with one thread per
            CPU core, at most 8.
        progress: Show a progress bar on stderr.

    Returns:
        The images, labels in class order, and the class names.

    Raises:
        ConfigError: if ``image_size`` or ``num_workers`` is invalid.
        DatasetError: if a directory is missing or empty, a file is not a readable RGB image, or
            the images differ in size.
    """
    _validate_image_size(image_size)
    _validate_num_workers(num_workers)
    directory = _resolve_split_dir(Path(root), split)
    classes = _find_classes(directory)
    if split is None and set(classes) <= set(SPLITS):
        warnings.warn(
            f"the class folders of {directory} are named like splits ({classes}); pass "
            "`split`='train' or 'test' to load one split",
            stacklevel=2,
        )
    files, counts = _list_image_files(directory, classes)
    images = _decode_images(files, image_size, num_workers, progress, f"decoding {directory}")
    labels = torch.repeat_interleave(torch.arange(len(classes)), torch.tensor(counts))
    return ImageDataset(images, labels, classes, name=f"imagefolder:{directory}")


def _validate_image_size(image_size: tuple[int, int] | None) -> None:
    if image_size is None:
        return
    valid = (
        isinstance(image_size, (tuple, list))
        and len(image_size) == 2
        and all(type(side) is int and side > 0 for side in image_size)
    )
    if not valid:
        raise ConfigError(
            f"`image_size` must be (height, width) with two positive integers, got {image_size!r}"
        )


def _validate_num_workers(num_workers: int | None) -> None:
    if num_workers is not None and num_workers < 0:
        raise ConfigError(f"`num_workers` must be >= 0, got {num_workers}; pass 0 for no threads")


def _resolve_split_dir(root: Path, split: str | None) -> Path:
    if not root.is_dir():
        found = "a file" if root.exists() else "nothing"
        raise DatasetError(
            f"dataset directory {root} not found (found {found} there); pass the folder that "
            "contains the split or class subdirectories as `root`"
        )
    if split is None:
        return root
    directory = root / split
    if not directory.is_dir():
        existing = ", ".join(_subdirectories(root)) or "none"
        raise DatasetError(
            f"split directory {directory} not found; splits in {root}: {existing}; pass one of "
            "them as `split` or create the folder"
        )
    return directory


def _subdirectories(directory: Path) -> list[str]:
    # The same rule as ImageFolder's class discovery: every subdirectory, hidden ones included.
    return sorted(entry.name for entry in os.scandir(directory) if entry.is_dir())


def _find_classes(directory: Path) -> list[str]:
    classes = _subdirectories(directory)
    if not classes:
        raise DatasetError(
            f"{directory} contains no class subdirectories; expected the layout "
            f"{directory}/<class>/<image files>"
        )
    return classes


def _list_image_files(directory: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    files: list[Path] = []
    counts: list[int] = []
    for name in classes:
        class_files = _list_class_files(directory / name)
        files.extend(class_files)
        counts.append(len(class_files))
    return files, counts


def _list_class_files(class_dir: Path) -> list[Path]:
    files = [
        Path(folder) / file_name
        for folder, _, file_names in sorted(os.walk(class_dir, followlinks=True))
        for file_name in sorted(file_names)
        if file_name.lower().endswith(IMAGE_EXTENSIONS)
    ]
    if not files:
        raise DatasetError(
            f"class folder {class_dir} contains no image files (extensions "
            f"{', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder"
        )
    return files


def _decode_images(
    files: list[Path],
    image_size: tuple[int, int] | None,
    num_workers: int | None,
    progress: bool,
    desc: str,
) -> torch.Tensor:
    first_size = _decode_file(files[0]).shape[:2]
    expected_size = tuple(image_size) if image_size else first_size
    workers = _default_num_workers(expected_size) if num_workers is None else num_workers
    chunk_size = _chunk_size(len(files), workers)
    images = torch.empty((len(files), 3, *expected_size), dtype=torch.uint8)
    pixels = images.numpy()  # a view: workers write straight into the tensor

    def decode_chunk(start: int) -> int:
        stop = min(start + chunk_size, len(files))
        for i in range(start, stop):
            image = _decode_file(files[i])
            _check_size(files[i], image.shape[:2], expected_size, image_size, files[0])
            pixels[i] = image.transpose(2, 0, 1)
        return stop - start

    starts = range(0, len(files), chunk_size)
    with tqdm(total=len(files), desc=desc, unit="img", disable=not progress) as bar:
        if workers <= 1:
            for start in starts:
                bar.update(decode_chunk(start))
            return images
        # map() returns results in order, so an error names the first bad file of the list.
        with ThreadPoolExecutor(workers) as executor:
            for count in executor.map(decode_chunk, starts):
                bar.update(count)
    return images


def _default_num_workers(image_size: tuple[int, ...]) -> int:
    # A 32x32 JPEG costs mostly Python work under the GIL, so threads did not help there
    # (measured on CIFAR-10 JPEGs, 2 CPU cores). PIL releases the GIL while decoding pixels.
    # NOTE: the 64x64 threshold is a guess between the sizes measured, 32x32 and 384x384.
    if image_size[0] * image_size[1] < _MIN_PIXELS_FOR_THREADS:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return min(cores or 1, _MAX_DEFAULT_WORKERS)


def _chunk_size(num_files: int, num_workers: int) -> int:
    # About four tasks per thread balance the load; the cap bounds the work lost to an error.
    return max(1, min(_MAX_CHUNK_SIZE, -(-num_files // (4 * max(num_workers, 1)))))


def _check_size(
    path: Path,
    size: tuple[int, ...],
    expected_size: tuple[int, ...],
    image_size: tuple[int, int] | None,
    first_file: Path,
) -> None:
    if size == expected_size:
        return
    if image_size is not None:
        raise DatasetError(
            f"image {path} has (height, width) {size}, but `image_size` is {expected_size}; "
            f"resize the images or pass image_size={size}"
        )
    raise DatasetError(
        f"image {path} has (height, width) {size}, expected {expected_size} like the first "
        f"image {first_file}; resize all images to one size"
    )


def _decode_file(path: Path) -> np.ndarray:
    """Decode one image file into an (H, W, 3) uint8 array, or raise DatasetError."""
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            pixels = np.asarray(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise DatasetError(
            f"{path} is not a readable image ({type(error).__name__}: {error}); replace or "
            "remove the file"
        ) from error
    if mode != "RGB":
        raise DatasetError(
            f"image {path} has mode {mode}, expected RGB; convert it to RGB, e.g. with "
            "PIL's Image.convert('RGB')"
        )
    return pixels


# -- CIFAR-10/100 python-format files ------------------------------------------------------------


@dataclass(frozen=True)
class _CifarLayout:
    """File names of one CIFAR release, as torchvision's download extracts them."""

    title: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    labels_key: str
    names_key: str
    url: str
    torchvision_class: str


_CIFAR_LAYOUTS = {
    10: _CifarLayout(
        title="CIFAR-10",
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        meta_file="batches.meta",
        labels_key="labels",
        names_key="label_names",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        torchvision_class="CIFAR10",
    ),
    100: _CifarLayout(
        title="CIFAR-100",
        folder="cifar-100-python",
        train_files=("train",),
        test_files=("test",),
        meta_file="meta",
        labels_key="fine_labels",
        names_key="fine_label_names",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        torchvision_class="CIFAR100",
    ),
}

# The globals a pickled numpy array needs, under numpy 1.x and 2.x module names, and the
# bytes decoder used by protocol-2 pickles written by Python 3.
_PICKLE_ALLOWED_GLOBALS = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }
)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals of numpy arrays, so a file cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR file")
        return super().find_class(module, name)


def load_cifar(root: str | Path, split: str, num_classes: int = 10) -> ImageDataset:
    """Load one split of CIFAR-10 or CIFAR-100 from torchvision's python-format files.

    CIFAR-10 reads ``cifar-10-batches-py/`` (``data_batch_1`` .. ``data_batch_5``,
    ``test_batch``, ``batches.meta``); CIFAR-100 reads ``cifar-100-python/`` (``train``,
    ``test``, ``meta``) with the 100 fine labels. Nothing is downloaded.

    The files are Python pickles of plain dicts of numpy arrays and lists, read with Python's
    :mod:`pickle` (``encoding="latin1"``, as torchvision reads them). The unpickler resolves only
    the numpy array globals and rejects anything else, so only these data files can be read.

    Args:
        root: The folder that contains ``cifar-10-batches-py`` (or ``cifar-100-python``), as
            passed to ``torchvision.datasets.CIFAR10(root)``, or that folder itself.
        split: ``"train"`` or ``"test"``.
        num_classes: 10 for CIFAR-10, 100 for CIFAR-100.

    Returns:
        Images (N, 3, 32, 32), labels and class names in label order.

    Raises:
        ConfigError: if ``split`` or ``num_classes`` is invalid.
        DatasetError: if a file is missing, truncated or has unexpected contents.
    """
    _validate_split(split)
    if num_classes not in _CIFAR_LAYOUTS:
        raise ConfigError(f"`num_classes` must be 10 or 100 for CIFAR, got {num_classes!r}")
    layout = _CIFAR_LAYOUTS[num_classes]
    folder = _find_cifar_folder(Path(root), layout)
    classes = _read_cifar_class_names(folder / layout.meta_file, layout, num_classes)
    file_names = layout.train_files if split == "train" else layout.test_files
    batches = [_read_cifar_batch(folder / name, layout, num_classes) for name in file_names]
    images = torch.from_numpy(np.concatenate([data for data, _ in batches]))
    labels = torch.from_numpy(np.concatenate([labels for _, labels in batches]))
    return ImageDataset(
        images.reshape(-1, 3, 32, 32), labels, classes, name=f"cifar{num_classes}:{folder}:{split}"
    )


def _find_cifar_folder(root: Path, layout: _CifarLayout) -> Path:
    for folder in (root / layout.folder, root):
        if (folder / layout.meta_file).is_file():
            return folder
    raise DatasetError(
        f"{layout.title} files not found: neither {root / layout.folder} nor {root} contains "
        f"{layout.meta_file}; download them with torchvision.datasets."
        f"{layout.torchvision_class}({str(root)!r}, download=True) or extract {layout.url} "
        f"into {root}"
    )


def _read_cifar_class_names(path: Path, layout: _CifarLayout, num_classes: int) -> list[str]:
    meta = _read_cifar_pickle(path, layout)
    names = meta.get(layout.names_key)
    if not isinstance(names, list) or len(names) != num_classes:
        raise DatasetError(
            f"{layout.title} file {path} must contain {num_classes} class names under "
            f"{layout.names_key!r}, found {_describe(names)}; download it again from {layout.url}"
        )
    return [str(name) for name in names]


def _read_cifar_batch(
    path: Path, layout: _CifarLayout, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    batch = _read_cifar_pickle(path, layout)
    data = batch.get("data")
    labels = _as_label_array(batch.get(layout.labels_key))
    valid_data = isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
    if not valid_data or data.shape[1] != 3 * 32 * 32 or labels.shape != (data.shape[0],):
        raise DatasetError(
            f"{layout.title} file {path} must contain 'data' as uint8 (N, 3072) and N labels "
            f"under {layout.labels_key!r}, found data {_describe(data)} and labels of shape "
            f"{labels.shape}; download it again from {layout.url}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(
            f"{layout.title} file {path} has labels from {labels.min()} to {labels.max()}, "
            f"expected 0..{num_classes - 1}; download it again from {layout.url}"
        )
    return data, labels


def _read_cifar_pickle(path: Path, layout: _CifarLayout) -> dict[str, Any]:
    if not path.is_file():
        raise DatasetError(
            f"{layout.title} file {path} not found; download the set again with "
            f"torchvision.datasets.{layout.torchvision_class}(root, download=True) or from "
            f"{layout.url}"
        )
    try:
        with path.open("rb") as file:
            content = _NumpyOnlyUnpickler(file, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError,
            TypeError, ValueError) as error:  # fmt: skip
        raise DatasetError(
            f"{layout.title} file {path} is truncated or corrupt ({type(error).__name__}: "
            f"{error}); download it again from {layout.url}"
        ) from error
    if not isinstance(content, dict):
        raise DatasetError(
            f"{layout.title} file {path} must contain a dict, found {type(content).__name__}; "
            f"download it again from {layout.url}"
        )
    return content


def _as_label_array(value: object) -> np.ndarray:
    # Anything that is not a flat list of integers becomes an empty array, which the caller
    # reports as a label count mismatch.
    try:
        labels = np.asarray(value, dtype=np.int64)
    except (TypeError, ValueError):
        return np.empty(0, dtype=np.int64)
    return labels if labels.ndim == 1 else np.empty(0, dtype=np.int64)


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"array of dtype {value.dtype} and shape {value.shape}"
    if isinstance(value, list):
        return f"a list of {len(value)} items"
    return type(value).__name__
