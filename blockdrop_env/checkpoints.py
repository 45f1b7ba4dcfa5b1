"""Load ResNet checkpoints in the formats people have, and save our own format atomically.

Every file is read with ``torch.load(..., map_location="cpu", weights_only=True)``. A file that
carries pickled Python objects is rejected, never loaded unsafely.

The format is detected from the state-dict keys, after stripping the ``module.`` prefix that
``nn.DataParallel`` adds:

* ``"blockdrop"``: written by :func:`save_resnet`; a dict with ``"format": "blockdrop"``, the
  architecture, input normalisation and input size, the state dict and user metadata.
* ``"pytorch_resnet_cifar10"``: CIFAR ResNets from akamaster/pytorch_resnet_cifar10, a dict with
  ``state_dict`` (``conv1``, ``layerN.M``, ``linear``) and usually ``best_prec1``. Option A
  shortcut, ImageNet normalisation.
* ``"blockdrop_release_base"``: the base CIFAR ResNets of the original BlockDrop release
  (``conv1``, ``layerN.M``, ``fc``), average-pool shortcut.
* ``"blockdrop_release_finetuned"``: the jointly fine-tuned checkpoints of that release, a dict
  with ``resnet`` (``blocks.S.B``, ``ds.S``, ``fc``) and ``agent`` (the policy network).
* ``"torchvision"``: a torchvision resnet18/34/50/101/152 state dict (``conv1`` 7x7, ``layer4``,
  ``fc``), ImageNet normalisation.
"""

from __future__ import annotations

import os
import pickle
import re
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torchvision.models import get_model_weights

from blockdrop_env.errors import CheckpointError, ConfigError
from blockdrop_env.resnet import (
    CIFAR10_NORMALIZATION,
    IMAGENET_ARCHS,
    IMAGENET_NORMALIZATION,
    BlockDropResNet,
    CifarResNet,
    ImageNetResNet,
    Normalization,
    build_resnet,
)

CHECKPOINT_FORMATS: tuple[str, ...] = (
    "blockdrop",
    "pytorch_resnet_cifar10",
    "blockdrop_release_base",
    "blockdrop_release_finetuned",
    "torchvision",
)
FORMAT_VERSION = 1
NORMALIZATION_NAMES: dict[str, Normalization | None] = {
    "imagenet": IMAGENET_NORMALIZATION,
    "cifar10": CIFAR10_NORMALIZATION,
    "none": None,
}

# Keys under which training scripts commonly nest the model's state dict.
_STATE_DICT_WRAPPERS = ("state_dict", "model_state_dict", "model", "net")
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOL_OPCODE = 0x80
_CIFAR_INPUT_SIZE = (32, 32)
_IMAGENET_INPUT_SIZE = (224, 224)
# (blocks per stage, bottleneck blocks) -> torchvision architecture.
_TORCHVISION_LAYOUTS: dict[tuple[tuple[int, ...], bool], str] = {
    ((2, 2, 2, 2), False): "resnet18",
    ((3, 4, 6, 3), False): "resnet34",
    ((3, 4, 6, 3), True): "resnet50",
    ((3, 4, 23, 3), True): "resnet101",
    ((3, 8, 36, 3), True): "resnet152",
}
_BLOCK_KEY = re.compile(r"^layer(\d+)\.(\d+)\.")


@dataclass
class LoadedResNet:
    """A network loaded from a checkpoint, with where it came from.

    Attributes:
        model: The network, in eval mode, on the CPU.
        format: The detected format, one of :data:`CHECKPOINT_FORMATS`.
        path: The file it was read from, or None for an in-memory checkpoint.
        arch: The :func:`~blockdrop_env.resnet.build_resnet` name, e.g. ``"cifar_resnet32"``.
        extra: Everything else the checkpoint stored, e.g. ``{"best_prec1": 92.78}``, the release's
            ``{"agent_state_dict": ...}`` or the metadata given to :func:`save_resnet`.
    """

    model: BlockDropResNet
    format: str
    path: Path | None
    arch: str
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        """Summarize the model in one line.

        The line names the architecture, block and class counts, source, format and normalisation.
        """
        source = str(self.path) if self.path is not None else "an in-memory checkpoint"
        return (
            f"{self.arch} ({self.model.num_blocks} blocks, {self.model.num_classes} classes) "
            f"from {source}, format {self.format}, "
            f"normalization {normalization_name(self.model.normalization)}"
        )


@dataclass
class _ParsedCheckpoint:
    """Architecture, weights and defaults that a format parser extracts from a checkpoint."""

    arch: str
    num_classes: int
    state_dict: dict[str, torch.Tensor]
    normalization: Normalization | None
    input_size: tuple[int, int]
    extra: dict[str, Any]
    shortcut: str | None = None


# ---------------------------------------------------------------------------------------------
# Public API


def load_resnet(
    path: str | Path,
    *,
    arch: str | None = None,
    num_classes: int | None = None,
    normalization: Normalization | None | str = "auto",
    input_size: tuple[int, int] | None = None,
) -> LoadedResNet:
    """Load a ResNet checkpoint file of any supported format.

    Args:
        path: The checkpoint file.
        arch: Expected architecture (``"cifar_resnet32"``, ``"resnet101"``, ...); None accepts
            what the file contains.
        num_classes: Expected number of classes; None accepts what the file contains.
        normalization: Input normalisation the model carries. ``"auto"`` uses the format's
            default. That is ImageNet statistics for ``pytorch_resnet_cifar10`` and
            ``torchvision``, and the stored value for ``blockdrop``. The BlockDrop release formats
            get CIFAR-10 statistics for the 32-layer CIFAR-10 network and None (pixels scaled to
            [0, 1] only) for every other CIFAR network, because the release normalised the input
            of that one network only. ImageNet variants of the release get ImageNet statistics.
            ``"imagenet"``, ``"cifar10"``, ``"none"``, a :class:`Normalization` or None override
            the default.
        input_size: (height, width) at which FLOPs are counted; None uses the format's (32x32
            for CIFAR, 224x224 for ImageNet, the stored size for ``blockdrop``).

    Returns:
        The model in eval mode on the CPU, with its format, architecture and extra contents.

    Raises:
        CheckpointError: if the file is missing, empty, truncated, not a PyTorch checkpoint,
            contains pickled Python objects, has an unknown format or an inconsistent layout, or
            disagrees with ``arch`` or ``num_classes``.
        ConfigError: if ``normalization`` is an unknown name.
    """
    path = Path(path)
    checkpoint = _read_checkpoint(path)
    return resnet_from_state(
        checkpoint,
        arch=arch,
        num_classes=num_classes,
        normalization=normalization,
        input_size=input_size,
        path=path,
    )


def resnet_from_state(
    checkpoint: Mapping[str, Any],
    *,
    arch: str | None = None,
    num_classes: int | None = None,
    normalization: Normalization | None | str = "auto",
    input_size: tuple[int, int] | None = None,
    path: str | Path | None = None,
) -> LoadedResNet:
    """Build a ResNet from an already loaded checkpoint object.

    Args:
        checkpoint: The object ``torch.load`` returned.
        arch: As in :func:`load_resnet`.
        num_classes: As in :func:`load_resnet`.
        normalization: As in :func:`load_resnet`.
        input_size: As in :func:`load_resnet`.
        path: The file the checkpoint came from, if any; only used to name the source in
            :meth:`LoadedResNet.describe` and in error messages.

    Returns:
        The model in eval mode on the CPU, with its format, architecture and extra contents.

    Raises:
        CheckpointError: if the format is unknown, the layout is inconsistent, the weights do not
            fit the architecture, or the checkpoint disagrees with ``arch`` or ``num_classes``.
        ConfigError: if ``normalization`` is an unknown name.
    """
    path = Path(path) if path is not None else None
    source = f"checkpoint {path}" if path is not None else "checkpoint"
    chosen = _resolve_normalization_argument(normalization)
    checkpoint_format = _detect_format(checkpoint, source)
    parsed = _PARSERS[checkpoint_format](checkpoint, source)
    _check_expected(parsed, arch, num_classes, source)

    if isinstance(chosen, str):  # "auto": the format's default
        chosen = parsed.normalization
    model = _build(parsed, chosen, input_size, source)
    _load_weights(model, parsed, source)
    model.eval()
    return LoadedResNet(model, checkpoint_format, path, parsed.arch, parsed.extra)


def detect_format(checkpoint: Mapping[str, Any]) -> str:
    """Name the format of a loaded checkpoint from its keys.

    Args:
        checkpoint: The object ``torch.load`` returned.

    Returns:
        One of :data:`CHECKPOINT_FORMATS`.

    Raises:
        CheckpointError: if no format matches; the message lists the formats and the keys found.
    """
    return _detect_format(checkpoint, "checkpoint")


def save_resnet(
    model: BlockDropResNet, path: str | Path, *, extra: Mapping[str, Any] | None = None
) -> None:
    """Save a network in the ``"blockdrop"`` format, atomically.

    The file stores the architecture, shortcut kind, normalisation and input size next to the
    weights, so :func:`load_resnet` rebuilds the same model. It contains only tensors, dicts,
    lists, strings, numbers and None, so it loads with ``weights_only=True``.

    Args:
        model: The network to save; it may live on any device.
        path: Destination file; missing parent directories are created.
        extra: Metadata stored alongside (e.g. accuracy, epoch); values must be tensors, dicts
            with string keys, lists, tuples, str, int, float, bool or None.

    Raises:
        ConfigError: if ``model`` is not a :class:`BlockDropResNet` or ``extra`` contains a value
            that ``torch.load(weights_only=True)`` cannot read back.
    """
    if not isinstance(model, BlockDropResNet):
        raise ConfigError(
            f"`model` must be a BlockDropResNet (CifarResNet or ImageNetResNet), "
            f"got {type(model).__name__}; build it with blockdrop_env.resnet.build_resnet"
        )
    extra = dict(extra or {})
    _check_safe_value(extra, "extra")
    atomic_torch_save(resnet_to_state(model, extra), path)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` that never leaves a partly written file at ``path``.

    Writes to a temporary file in the same directory, flushes and fsyncs it, then renames it over
    ``path`` with ``os.replace``. A crash leaves either the old file or the new one; a failed
    write removes the temporary file.

    Args:
        obj: Anything ``torch.save`` accepts.
        path: Destination file; missing parent directories are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
        # Mode 0o666 lets the umask decide the permissions, as for a plain open().
        with os.fdopen(os.open(temporary, flags, 0o666), "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def torchvision_pretrained(
    arch: str, weights: str = "DEFAULT", *, download: bool = False
) -> LoadedResNet:
    """Load torchvision's pre-trained ImageNet weights for a ResNet.

    The file is looked up in torch.hub's cache, ``torch.hub.get_dir()/checkpoints/<file name from
    the weights URL>``, where torchvision itself stores it.

    Args:
        arch: ``resnet18``, ``resnet34``, ``resnet50``, ``resnet101`` or ``resnet152``.
        weights: A member of torchvision's weights enum for ``arch``, e.g. ``"IMAGENET1K_V1"``,
            or ``"DEFAULT"``.
        download: Fetch the file into the cache when it is missing; otherwise raise.

    Returns:
        The model, with ``extra["weights"]`` (the enum member) and ``extra["categories"]`` (the
        class names).

    Raises:
        ConfigError: if ``arch`` or ``weights`` is unknown.
        CheckpointError: if the file is not cached and ``download`` is False, the download fails,
            or the file cannot be loaded.
    """
    weights_entry = _torchvision_weights(arch, weights)
    file = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights_entry.url).path).name
    if not file.is_file():
        _download_weights(weights_entry, file, download)

    transform = weights_entry.transforms()
    crop = int(transform.crop_size[0])
    loaded = load_resnet(
        file,
        arch=arch,
        num_classes=len(weights_entry.meta["categories"]),
        normalization=Normalization(tuple(transform.mean), tuple(transform.std)),
        input_size=(crop, crop),
    )
    loaded.extra.update(
        {"weights": str(weights_entry), "categories": list(weights_entry.meta["categories"])}
    )
    return loaded


def check_dataset_classes(loaded: LoadedResNet, num_classes: int, dataset_name: str) -> None:
    """Check that a loaded network predicts as many classes as a dataset has.

    Args:
        loaded: The network and the file it came from.
        num_classes: The dataset's number of classes.
        dataset_name: The dataset, as named in the message (e.g. ``ImageDataset.name``).

    Raises:
        CheckpointError: naming the file, both class counts and the fix.
    """
    found = loaded.model.num_classes
    if found == num_classes:
        return
    source = str(loaded.path) if loaded.path is not None else "the in-memory checkpoint"
    raise CheckpointError(
        f"checkpoint {source} predicts {found} classes, but dataset {dataset_name} has "
        f"{num_classes} classes; pass a checkpoint trained on these classes (`blockdrop pretrain "
        "--init RESNET` adapts a ResNet checkpoint to them)"
    )


def normalization_name(normalization: Normalization | None) -> str:
    """Name a normalisation for display: ``imagenet``, ``cifar10``, ``none`` or its values."""
    if normalization is None:
        return "none"
    for name, known in NORMALIZATION_NAMES.items():
        if normalization == known:
            return name
    return f"mean={normalization.mean} std={normalization.std}"


# ---------------------------------------------------------------------------------------------
# Reading files


def read_checkpoint(path: str | Path) -> Any:
    """Load any checkpoint file with ``torch.load(weights_only=True)`` onto the CPU.

    Args:
        path: The file, e.g. a run directory's last.pt.

    Returns:
        The object the file stores, made of tensors and plain Python values.

    Raises:
        CheckpointError: if the file is missing, empty, truncated, not written by ``torch.save``
            or contains pickled Python objects; the message names the file and what to do.
    """
    return _read_checkpoint(Path(path))


def _read_checkpoint(path: Path) -> Any:
    """``torch.load`` a file safely, turning every way it can fail into one CheckpointError."""
    _check_file_header(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        rejected_global = _rejected_global(error)
        if rejected_global is None:
            raise _corrupted(path, error) from None
        raise CheckpointError(
            f"checkpoint {path} rejected: it contains pickled Python objects that could run code "
            f"when loaded ({rejected_global}); if you trust its source, load it yourself with "
            "torch.load(..., weights_only=False) and re-save only its state_dict()"
        ) from None
    except (RuntimeError, EOFError, ValueError, KeyError) as error:
        raise _corrupted(path, error) from None


def _corrupted(path: Path, error: Exception) -> CheckpointError:
    # torch wraps unpickling errors in paragraphs about weights_only; keep the specific sentence.
    boilerplate = ("Weights only", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    specific = [line for line in lines if not line.startswith(boilerplate)]
    reason = (specific[-1] if specific else type(error).__name__).split(". ")[0]
    return CheckpointError(
        f"checkpoint {path} could not be read, it is probably truncated or corrupted "
        f"({reason}); copy or download the file again"
    )


def _check_file_header(path: Path) -> None:
    """Reject missing, empty and non-PyTorch files before calling torch.load."""
    if not path.exists():
        raise CheckpointError(f"checkpoint file {path} not found; check the path")
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} is not a file; pass the path of a .pt/.pth/.th file"
        )
    with path.open("rb") as file:
        head = file.read(4)
    if not head:
        raise CheckpointError(
            f"checkpoint {path} is empty (0 bytes); it was probably cut off while being written, "
            "copy or download it again"
        )
    # torch.save writes a zip archive; files from before PyTorch 1.6 start with a pickle opcode.
    if head != _ZIP_MAGIC and head[0] != _PICKLE_PROTOCOL_OPCODE:
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint: it starts with {head!r}, expected a zip archive "
            "(b'PK\\x03\\x04') or a pickle written by torch.save; pass a file saved with torch.save"
        )


def _rejected_global(error: pickle.UnpicklingError) -> str | None:
    """Extract the global that torch's weights_only unpickler rejected, e.g. ``posix.system``."""
    match = re.search(r"GLOBAL (\S+)", str(error))
    return match.group(1) if match else None


# ---------------------------------------------------------------------------------------------
# Format detection


def _detect_format(checkpoint: Any, source: str) -> str:
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(
            f"{source} contains a {type(checkpoint).__name__}, expected a dict (a state dict or "
            "a checkpoint dict); save the model's state_dict(), not the model"
        )
    if checkpoint.get("format") == "blockdrop":
        return "blockdrop"
    if checkpoint.get("format") == "blockdrop_agent":
        raise CheckpointError(
            f"{source} is an agent checkpoint (format 'blockdrop_agent'), expected a ResNet "
            "checkpoint; pass it as `--checkpoint` to `blockdrop evaluate`, or pass a ResNet file"
        )
    if isinstance(checkpoint.get("resnet"), Mapping):
        return "blockdrop_release_finetuned"

    state = _find_state_dict(checkpoint)
    detected = _classify_state_dict(_strip_module_prefix(state)) if state is not None else None
    if detected is None:
        found = list(_strip_module_prefix(state)) if state is not None else list(checkpoint)
        raise CheckpointError(
            f"{source} has an unknown format: expected one of {', '.join(CHECKPOINT_FORMATS)} "
            "(state-dict keys such as conv1.weight, layer1.0.conv1.weight and linear.weight or "
            f"fc.weight, or blocks.0.0.conv1.weight under 'resnet'), found keys {_sample(found)}; "
            "pass a ResNet checkpoint"
        )
    return detected


def _find_state_dict(checkpoint: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The state dict itself, or the one nested under a common wrapper key, or None."""
    if _is_state_dict(checkpoint):
        return checkpoint
    for key in _STATE_DICT_WRAPPERS:
        value = checkpoint.get(key)
        if isinstance(value, Mapping) and _is_state_dict(value):
            return value
    return None


def _is_state_dict(candidate: Mapping[Any, Any]) -> bool:
    return bool(candidate) and all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in candidate.items()
    )


def _classify_state_dict(state: Mapping[str, torch.Tensor]) -> str | None:
    conv1 = state.get("conv1.weight")
    if conv1 is None or not any(_BLOCK_KEY.match(key) for key in state):
        return "blockdrop_release_finetuned" if _has_flat_blocks(state) else None
    if "linear.weight" in state:
        return "pytorch_resnet_cifar10"
    if "fc.weight" not in state:
        return None
    is_imagenet_stem = conv1.dim() == 4 and conv1.shape[-1] == 7
    if is_imagenet_stem or any(key.startswith("layer4.") for key in state):
        return "torchvision"
    return "blockdrop_release_base"


def _has_flat_blocks(state: Mapping[str, Any]) -> bool:
    return "fc.weight" in state and any(key.startswith("blocks.") for key in state)


def _strip_module_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
    """Drop the ``module.`` prefix ``nn.DataParallel`` adds, where present."""
    return {key.removeprefix("module."): value for key, value in state.items()}


# ---------------------------------------------------------------------------------------------
# Format parsers


def _parse_blockdrop(checkpoint: Mapping[str, Any], source: str) -> _ParsedCheckpoint:
    version = checkpoint.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{source} has format_version {version!r}, expected {FORMAT_VERSION}; "
            "save it again with this version of blockdrop or upgrade blockdrop"
        )
    fields = ("arch", "num_classes", "state_dict", "normalization", "input_size")
    missing = [name for name in fields if name not in checkpoint]
    if missing:
        raise CheckpointError(
            f"{source} is a blockdrop checkpoint without the field(s) {missing}; "
            "save it again with save_resnet"
        )
    state = checkpoint["state_dict"]
    size = checkpoint["input_size"]
    valid_size = isinstance(size, (list, tuple)) and len(size) == 2
    if not isinstance(state, Mapping) or not valid_size:
        raise CheckpointError(
            f"{source} is a damaged blockdrop checkpoint: `state_dict` is a "
            f"{type(state).__name__} and `input_size` is {size!r}, expected a dict and [height, "
            "width]; save it again with save_resnet"
        )
    return _ParsedCheckpoint(
        arch=str(checkpoint["arch"]),
        num_classes=int(checkpoint["num_classes"]),
        state_dict=dict(state),
        normalization=_stored_normalization(checkpoint["normalization"], source),
        input_size=(int(size[0]), int(size[1])),
        extra=dict(checkpoint.get("extra") or {}),
        shortcut=checkpoint.get("shortcut"),
    )


def _parse_pytorch_resnet_cifar10(checkpoint: Mapping[str, Any], source: str) -> _ParsedCheckpoint:
    state = _strip_module_prefix(_find_state_dict(checkpoint) or {})
    depth = _cifar_depth(state, source)
    return _ParsedCheckpoint(
        arch=f"cifar_resnet{depth}",
        num_classes=_head_rows(state, "linear.weight", source),
        state_dict=state,
        normalization=IMAGENET_NORMALIZATION,
        input_size=_CIFAR_INPUT_SIZE,
        extra=_extra_items(checkpoint),
        shortcut="A",
    )


def _parse_release_base(checkpoint: Mapping[str, Any], source: str) -> _ParsedCheckpoint:
    state = _strip_module_prefix(_find_state_dict(checkpoint) or {})
    state = _rename_prefixes(state, [("fc.", "linear.")])
    depth = _cifar_depth(state, source)
    num_classes = _head_rows(state, "linear.weight", source)
    return _ParsedCheckpoint(
        arch=f"cifar_resnet{depth}",
        num_classes=num_classes,
        state_dict=state,
        normalization=_release_cifar_normalization(depth, num_classes),
        input_size=_CIFAR_INPUT_SIZE,
        extra=_extra_items(checkpoint),
        shortcut="avgpool",
    )


def _parse_release_finetuned(checkpoint: Mapping[str, Any], source: str) -> _ParsedCheckpoint:
    if isinstance(checkpoint.get("resnet"), Mapping):
        state = _strip_module_prefix(checkpoint["resnet"])
        extra = {key: value for key, value in checkpoint.items() if key not in ("resnet", "agent")}
        if "agent" in checkpoint:
            extra["agent_state_dict"] = checkpoint["agent"]
    else:
        # The network's state dict alone, without the policy network beside it.
        state = _strip_module_prefix(_find_state_dict(checkpoint) or {})
        extra = _extra_items(checkpoint)
    conv1 = state.get("conv1.weight")
    if isinstance(conv1, torch.Tensor) and conv1.dim() == 4 and conv1.shape[-1] == 7:
        return _release_finetuned_imagenet(state, extra, source)
    return _release_finetuned_cifar(state, extra, source)


def _release_finetuned_cifar(
    state: dict[str, Any], extra: dict[str, Any], source: str
) -> _ParsedCheckpoint:
    state = _rename_flat_blocks(state, downsample_prefix=None)
    state = _rename_prefixes(state, [("fc.", "linear.")])
    depth = _cifar_depth(state, source)
    num_classes = _head_rows(state, "linear.weight", source)
    return _ParsedCheckpoint(
        arch=f"cifar_resnet{depth}",
        num_classes=num_classes,
        state_dict=state,
        normalization=_release_cifar_normalization(depth, num_classes),
        input_size=_CIFAR_INPUT_SIZE,
        extra=extra,
        shortcut="avgpool",
    )


def _release_finetuned_imagenet(
    state: dict[str, Any], extra: dict[str, Any], source: str
) -> _ParsedCheckpoint:
    # The release keeps the downsample of stage S apart as ds.S; torchvision puts it in block 0.
    state = _rename_flat_blocks(state, downsample_prefix="0.downsample.")
    return _ParsedCheckpoint(
        arch=_torchvision_arch(state, source),
        num_classes=_head_rows(state, "fc.weight", source),
        state_dict=state,
        normalization=IMAGENET_NORMALIZATION,
        input_size=_IMAGENET_INPUT_SIZE,
        extra=extra,
    )


def _parse_torchvision(checkpoint: Mapping[str, Any], source: str) -> _ParsedCheckpoint:
    state = _strip_module_prefix(_find_state_dict(checkpoint) or {})
    return _ParsedCheckpoint(
        arch=_torchvision_arch(state, source),
        num_classes=_head_rows(state, "fc.weight", source),
        state_dict=state,
        normalization=IMAGENET_NORMALIZATION,
        input_size=_IMAGENET_INPUT_SIZE,
        extra=_extra_items(checkpoint),
    )


_PARSERS: dict[str, Callable[[Mapping[str, Any], str], _ParsedCheckpoint]] = {
    "blockdrop": _parse_blockdrop,
    "pytorch_resnet_cifar10": _parse_pytorch_resnet_cifar10,
    "blockdrop_release_base": _parse_release_base,
    "blockdrop_release_finetuned": _parse_release_finetuned,
    "torchvision": _parse_torchvision,
}


def _release_cifar_normalization(depth: int, num_classes: int) -> Normalization | None:
    # The original BlockDrop release (github.com/Tushar-N/blockdrop, utils.get_transforms)
    # normalises only for its ResNet-32 on CIFAR-10. It uses mean (125.3, 123.0, 113.9)/255 and
    # std (63.0, 62.1, 66.7)/255, which differ from CIFAR10_NORMALIZATION by under 0.0002 each.
    if depth == 32 and num_classes == 10:
        return CIFAR10_NORMALIZATION
    return None


def _extra_items(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """Everything at the top level of a checkpoint except the state dict itself."""
    state = _find_state_dict(checkpoint)
    if state is checkpoint:
        return {}
    return {key: value for key, value in checkpoint.items() if value is not state}


def _stored_normalization(value: Any, source: str) -> Normalization | None:
    if value is None:
        return None
    try:
        return Normalization(tuple(value["mean"]), tuple(value["std"]))
    except (KeyError, TypeError, ConfigError) as error:
        raise CheckpointError(
            f"{source} has an invalid normalization {value!r} ({error}); expected None or "
            '{"mean": [m, m, m], "std": [s, s, s]}'
        ) from None


# ---------------------------------------------------------------------------------------------
# Key renaming and layout inference


def _rename_prefixes(state: dict[str, Any], renames: Iterable[tuple[str, str]]) -> dict[str, Any]:
    renamed = {}
    for key, value in state.items():
        for old, new in renames:
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        renamed[key] = value
    return renamed


def _rename_flat_blocks(state: dict[str, Any], downsample_prefix: str | None) -> dict[str, Any]:
    """Rename the release's flat keys to torchvision-style stage keys.

    ``blocks.S.B.`` becomes ``layer{S+1}.B.`` and ``ds.S.`` becomes
    ``layer{S+1}.{downsample_prefix}``. With ``downsample_prefix`` None, ``ds.S.`` keys are kept
    as they are, so that loading reports them as unexpected (a CIFAR average-pool shortcut has
    no parameters).
    """
    renamed = {}
    for key, value in state.items():
        block = re.match(r"^blocks\.(\d+)\.(\d+)\.(.*)$", key)
        downsample = re.match(r"^ds\.(\d+)\.(.*)$", key)
        if block:
            key = f"layer{int(block.group(1)) + 1}.{block.group(2)}.{block.group(3)}"
        elif downsample and downsample_prefix is not None:
            key = f"layer{int(downsample.group(1)) + 1}.{downsample_prefix}{downsample.group(2)}"
        renamed[key] = value
    return renamed


def _blocks_per_stage(state: Mapping[str, Any], source: str) -> tuple[int, ...]:
    """Count ``layerS.B`` blocks per stage, checking that stages run 1..S and blocks 0..n-1."""
    indices: dict[int, set[int]] = {}
    for key in state:
        match = _BLOCK_KEY.match(key)
        if match:
            indices.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
    stages = sorted(indices)
    if stages != list(range(1, len(stages) + 1)):
        raise CheckpointError(
            f"{source} has an inconsistent stage layout: stages {_layer_names(stages)}, expected "
            "consecutive stages from layer1 on; the state dict is incomplete"
        )
    for stage in stages:
        blocks = sorted(indices[stage])
        if blocks != list(range(len(blocks))):
            raise CheckpointError(
                f"{source} has an inconsistent stage layout: layer{stage} has blocks {blocks}, "
                f"expected 0..{len(blocks) - 1} without gaps; the state dict is incomplete"
            )
    return tuple(len(indices[stage]) for stage in stages)


def _cifar_depth(state: Mapping[str, Any], source: str) -> int:
    counts = _blocks_per_stage(state, source)
    if len(counts) != 3 or len(set(counts)) != 1:
        raise CheckpointError(
            f"{source} has an inconsistent stage layout: blocks per stage {counts}, but a CIFAR "
            "ResNet (depth 6n+2) has the same number n of blocks in each of its 3 stages; the "
            "state dict is incomplete or not a CIFAR ResNet"
        )
    return 6 * counts[0] + 2


def _torchvision_arch(state: Mapping[str, Any], source: str) -> str:
    counts = _blocks_per_stage(state, source)
    bottleneck = any(re.match(r"^layer\d+\.\d+\.conv3\.weight$", key) for key in state)
    arch = _TORCHVISION_LAYOUTS.get((counts, bottleneck))
    if arch is None:
        known = ", ".join(
            f"{name} {layout} {'Bottleneck' if neck else 'BasicBlock'}"
            for (layout, neck), name in _TORCHVISION_LAYOUTS.items()
        )
        raise CheckpointError(
            f"{source} has an inconsistent stage layout: blocks per stage {counts} with "
            f"{'Bottleneck' if bottleneck else 'BasicBlock'} blocks, expected one of {known}; "
            "the state dict is incomplete or not a torchvision ResNet"
        )
    return arch


def _head_rows(state: Mapping[str, Any], key: str, source: str) -> int:
    weight = state.get(key)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else None
        raise CheckpointError(
            f"{source} has no 2-D classifier weight {key!r} (found shape {shape}); "
            "the state dict is incomplete"
        )
    return int(weight.shape[0])


def _layer_names(stages: Iterable[int]) -> str:
    return ", ".join(f"layer{stage}" for stage in stages)


# ---------------------------------------------------------------------------------------------
# Building and loading


def _resolve_normalization_argument(
    normalization: Normalization | None | str,
) -> Normalization | None | str:
    if normalization is None or isinstance(normalization, Normalization):
        return normalization
    if normalization == "auto":
        return "auto"
    if isinstance(normalization, str) and normalization in NORMALIZATION_NAMES:
        return NORMALIZATION_NAMES[normalization]
    raise ConfigError(
        f"`normalization` must be 'auto', one of {sorted(NORMALIZATION_NAMES)}, a Normalization "
        f"or None, got {normalization!r}"
    )


def _check_expected(
    parsed: _ParsedCheckpoint, arch: str | None, num_classes: int | None, source: str
) -> None:
    if arch is not None and arch != parsed.arch:
        raise CheckpointError(
            f"{source} contains a {parsed.arch}, expected `arch` {arch}; pass "
            f"arch={parsed.arch!r} or leave `arch` unset to use the file's architecture"
        )
    if num_classes is not None and num_classes != parsed.num_classes:
        raise CheckpointError(
            f"{source} has {parsed.num_classes} classes, expected `num_classes` {num_classes}; "
            f"pass num_classes={parsed.num_classes} or leave it unset to use the file's head"
        )


def _build(
    parsed: _ParsedCheckpoint,
    normalization: Normalization | None,
    input_size: tuple[int, int] | None,
    source: str,
) -> BlockDropResNet:
    size = input_size if input_size is not None else parsed.input_size
    try:
        # build_resnet ignores `shortcut` for the torchvision architectures.
        return build_resnet(
            parsed.arch,
            parsed.num_classes,
            shortcut=parsed.shortcut or "A",
            normalization=normalization,
            input_size=size,
        )
    except ConfigError as error:
        raise CheckpointError(
            f"cannot build the network that {source} describes: {error}"
        ) from None


def _load_weights(model: BlockDropResNet, parsed: _ParsedCheckpoint, source: str) -> None:
    """Load ``parsed.state_dict`` strictly, reporting mismatched keys and shapes by name."""
    expected = model.state_dict()
    state = dict(parsed.state_dict)
    # Checkpoints from PyTorch before 0.4.1 have no BatchNorm num_batches_tracked counters.
    for key in expected:
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = expected[key]

    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not fit {parsed.arch}: missing keys {_sample(missing)}, unexpected "
            f"keys {_sample(unexpected)}; the file is incomplete or of another architecture"
        )
    mismatched = [
        f"{key} {_shape(state[key])} vs {tuple(expected[key].shape)}"
        for key in expected
        if _shape(state[key]) != tuple(expected[key].shape)
    ]
    if mismatched:
        raise CheckpointError(
            f"{source} does not fit {parsed.arch}: shapes in file vs model differ for "
            f"{_sample(mismatched)}; the file is of another architecture"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        reason = " ".join(str(error).split())[:300]
        raise CheckpointError(f"{source} does not fit {parsed.arch}: {reason}") from None


def _shape(value: Any) -> tuple[int, ...] | str:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__


def _sample(items: list[str], limit: int = 5) -> str:
    if not items:
        return "none"
    listed = ", ".join(repr(item) for item in items[:limit])
    return listed if len(items) <= limit else f"{listed}, ... ({len(items)} in all)"


# ---------------------------------------------------------------------------------------------
# Saving


def resnet_to_state(model: BlockDropResNet, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Build the dict that :func:`save_resnet` writes, for embedding in larger checkpoints."""
    normalization = model.normalization
    return {
        "format": "blockdrop",
        "format_version": FORMAT_VERSION,
        "arch": _arch_name(model),
        "num_classes": int(model.num_classes),
        "shortcut": model.shortcut_kind if isinstance(model, CifarResNet) else None,
        "normalization": None
        if normalization is None
        else {"mean": list(normalization.mean), "std": list(normalization.std)},
        "input_size": [int(model.input_size[0]), int(model.input_size[1])],
        "state_dict": {key: value.detach().cpu() for key, value in model.state_dict().items()},
        "extra": dict(extra or {}),
    }


def _arch_name(model: BlockDropResNet) -> str:
    if isinstance(model, CifarResNet):
        return f"cifar_resnet{model.depth}"
    if isinstance(model, ImageNetResNet):
        return model.arch
    raise ConfigError(
        f"`model` must be a CifarResNet or ImageNetResNet to be saved, got {type(model).__name__}"
    )


def _check_safe_value(value: Any, name: str) -> None:
    """Raise unless ``torch.load(weights_only=True)`` can read ``value`` back."""
    # Exact types, because subclasses such as numpy.float64 pickle as globals that it rejects.
    if value is None or type(value) in (str, int, float, bool) or isinstance(value, torch.Tensor):
        return
    if type(value) in (list, tuple):
        for index, item in enumerate(value):
            _check_safe_value(item, f"{name}[{index}]")
        return
    if type(value) in (dict, OrderedDict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise ConfigError(f"`{name}` has a key of type {type(key).__name__}; use str keys")
            _check_safe_value(item, f"{name}[{key!r}]")
        return
    raise ConfigError(
        f"`{name}` has type {type(value).__name__}, which torch.load(weights_only=True) cannot "
        "read back; convert it to a tensor, dict, list, str, int, float, bool or None"
    )


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable; a no-op where directories cannot be opened (Windows)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


# ---------------------------------------------------------------------------------------------
# torchvision weights


def _torchvision_weights(arch: str, weights: str) -> Any:
    if arch not in IMAGENET_ARCHS:
        raise ConfigError(f"`arch` must be one of {IMAGENET_ARCHS}, got {arch!r}")
    enum = get_model_weights(arch)
    try:
        return enum[weights]
    except KeyError:
        raise ConfigError(
            f"`weights` must be one of {list(enum.__members__)} for {arch}, got {weights!r}"
        ) from None


def _download_weights(weights_entry: Any, file: Path, download: bool) -> None:
    if not download:
        raise CheckpointError(
            f"torchvision weights {weights_entry} are not in the torch.hub cache, expected at "
            f"{file}; pass download=True (or `--download`) to fetch them from {weights_entry.url}"
        )
    file.parent.mkdir(parents=True, exist_ok=True)
    hash_match = torch.hub.HASH_REGEX.search(file.name)
    try:
        torch.hub.download_url_to_file(
            weights_entry.url, str(file), hash_match.group(1) if hash_match else None, progress=True
        )
    except (OSError, RuntimeError) as error:
        raise CheckpointError(
            f"downloading {weights_entry.url} to {file} failed ({error}); check the network "
            "connection or place the file there yourself"
        ) from None
