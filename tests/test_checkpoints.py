"""Tests for blockdrop_env/checkpoints.py: format detection, loading, saving and error messages."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision

from blockdrop_env import checkpoints
from blockdrop_env.checkpoints import (
    CHECKPOINT_FORMATS,
    LoadedResNet,
    atomic_torch_save,
    detect_format,
    load_resnet,
    resnet_from_state,
    save_resnet,
    torchvision_pretrained,
)
from blockdrop_env.errors import CheckpointError, ConfigError
from blockdrop_env.resnet import (
    CIFAR10_NORMALIZATION,
    IMAGENET_NORMALIZATION,
    CifarResNet,
    ImageNetResNet,
    Normalization,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_MODELS = REPO_ROOT / ".." / "shared" / "models"


# ---------------------------------------------------------------------------------------------
# Helpers: tiny source models and their state dicts in each format


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every BatchNorm non-trivial statistics, so a wrongly mapped key changes the output."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            size = module.num_features
            module.running_mean.copy_(torch.randn(size, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(size, generator=generator) * 0.5 + 0.25)
            module.bias.data.copy_(torch.randn(size, generator=generator) * 0.1)
    return model.eval()


def _cifar(shortcut: str = "A", depth: int = 8, num_classes: int = 5) -> CifarResNet:
    torch.manual_seed(depth)
    return _randomize(CifarResNet(depth=depth, num_classes=num_classes, shortcut=shortcut))


def _torchvision_resnet18(num_classes: int = 3) -> torchvision.models.ResNet:
    torch.manual_seed(1)
    return _randomize(torchvision.models.resnet18(weights=None, num_classes=num_classes))


def _without_counters(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop num_batches_tracked, as in checkpoints written before PyTorch 0.4.1."""
    return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}


def _pytorch_resnet_cifar10_checkpoint(model: CifarResNet) -> dict[str, Any]:
    state = {f"module.{k}": v for k, v in _without_counters(model.state_dict()).items()}
    return {"state_dict": state, "best_prec1": 90.5}


def _release_base_state(model: CifarResNet) -> dict[str, torch.Tensor]:
    return {k.replace("linear.", "fc."): v for k, v in model.state_dict().items()}


def _flat_key(key: str) -> str:
    """Rename ``layerS.B.rest`` to ``blocks.{S-1}.B.rest`` and a downsample to ``ds.{S-1}.rest``."""
    if not key.startswith("layer"):
        return key
    stage, block, rest = key[len("layer") :].split(".", 2)
    if rest.startswith("downsample."):
        return f"ds.{int(stage) - 1}.{rest[len('downsample.') :]}"
    return f"blocks.{int(stage) - 1}.{block}.{rest}"


def _release_finetuned_checkpoint(state: dict[str, torch.Tensor], cifar: bool) -> dict[str, Any]:
    resnet = {_flat_key(k): v for k, v in _without_counters(state).items()}
    if cifar:
        resnet = {k.replace("linear.", "fc."): v for k, v in resnet.items()}
    agent = {"logit.weight": torch.randn(3, 64), "logit.bias": torch.zeros(3)}
    return {"resnet": resnet, "agent": agent, "epoch": 7}


def _outputs(model: torch.nn.Module, size: int = 32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(123)
    x = torch.randn(4, 3, size, size, generator=generator)
    with torch.no_grad():
        return model(x)


def _save(obj: Any, path: Path) -> Path:
    torch.save(obj, path)
    return path


def _assert_loaded(loaded: LoadedResNet, fmt: str, arch: str, num_classes: int) -> None:
    assert loaded.format == fmt
    assert loaded.arch == arch
    assert loaded.model.num_classes == num_classes
    assert not loaded.model.training
    assert next(loaded.model.parameters()).device.type == "cpu"


# ---------------------------------------------------------------------------------------------
# Each format: detection, architecture, normalisation default, identical outputs


def test_formats_constant_lists_five_formats():
    assert CHECKPOINT_FORMATS == (
        "blockdrop",
        "pytorch_resnet_cifar10",
        "blockdrop_release_base",
        "blockdrop_release_finetuned",
        "torchvision",
    )


def test_load_pytorch_resnet_cifar10(tmp_path):
    source = _cifar("A")
    path = _save(_pytorch_resnet_cifar10_checkpoint(source), tmp_path / "resnet8.th")

    loaded = load_resnet(path)

    _assert_loaded(loaded, "pytorch_resnet_cifar10", "cifar_resnet8", 5)
    assert loaded.model.shortcut_kind == "A"
    assert loaded.model.normalization == IMAGENET_NORMALIZATION
    assert loaded.extra == {"best_prec1": 90.5}
    assert loaded.path == path
    torch.testing.assert_close(_outputs(loaded.model), _outputs(source), rtol=0, atol=0)


def test_load_pytorch_resnet_cifar10_bare_state_dict(tmp_path):
    source = _cifar("A")
    path = _save(_pytorch_resnet_cifar10_checkpoint(source)["state_dict"], tmp_path / "bare.th")

    loaded = load_resnet(path)

    _assert_loaded(loaded, "pytorch_resnet_cifar10", "cifar_resnet8", 5)
    assert loaded.extra == {}
    torch.testing.assert_close(_outputs(loaded.model), _outputs(source), rtol=0, atol=0)


@pytest.mark.parametrize("wrapper", ["state_dict", "net", None])
def test_load_blockdrop_release_base(tmp_path, wrapper):
    source = _cifar("avgpool")
    state = {f"module.{k}": v for k, v in _release_base_state(source).items()}
    checkpoint = {wrapper: state, "epoch": 164} if wrapper else state
    path = _save(checkpoint, tmp_path / "base.t7")

    loaded = load_resnet(path)

    _assert_loaded(loaded, "blockdrop_release_base", "cifar_resnet8", 5)
    assert loaded.model.shortcut_kind == "avgpool"
    assert loaded.model.normalization is None
    assert loaded.extra == ({"epoch": 164} if wrapper else {})
    torch.testing.assert_close(_outputs(loaded.model), _outputs(source), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("depth", "num_classes", "expected"),
    [(32, 10, CIFAR10_NORMALIZATION), (32, 100, None), (8, 10, None)],
)
def test_release_base_normalization_default(depth, num_classes, expected):
    source = _cifar("avgpool", depth=depth, num_classes=num_classes)

    loaded = resnet_from_state({"state_dict": _release_base_state(source)})

    assert loaded.model.normalization == expected


def test_load_blockdrop_release_finetuned_cifar(tmp_path):
    source = _cifar("avgpool")
    checkpoint = _release_finetuned_checkpoint(source.state_dict(), cifar=True)
    path = _save(checkpoint, tmp_path / "ckpt_E_10.t7")

    loaded = load_resnet(path)

    _assert_loaded(loaded, "blockdrop_release_finetuned", "cifar_resnet8", 5)
    assert loaded.model.shortcut_kind == "avgpool"
    assert loaded.model.normalization is None
    assert loaded.extra["epoch"] == 7
    torch.testing.assert_close(
        loaded.extra["agent_state_dict"]["logit.weight"], checkpoint["agent"]["logit.weight"]
    )
    torch.testing.assert_close(_outputs(loaded.model), _outputs(source), rtol=0, atol=0)


def test_load_release_finetuned_resnet_without_agent(tmp_path):
    source = _cifar("avgpool")
    resnet = _release_finetuned_checkpoint(source.state_dict(), cifar=True)["resnet"]
    path = _save({"state_dict": resnet, "epoch": 2}, tmp_path / "rnet.t7")

    loaded = load_resnet(path)

    _assert_loaded(loaded, "blockdrop_release_finetuned", "cifar_resnet8", 5)
    assert loaded.extra == {"epoch": 2}
    torch.testing.assert_close(_outputs(loaded.model), _outputs(source), rtol=0, atol=0)


def test_load_blockdrop_release_finetuned_imagenet(tmp_path):
    source = _torchvision_resnet18()
    checkpoint = _release_finetuned_checkpoint(source.state_dict(), cifar=False)
    assert any(key.startswith("ds.1.") for key in checkpoint["resnet"])
    path = _save(checkpoint, tmp_path / "ckpt_imagenet.t7")

    loaded = load_resnet(path)

    _assert_loaded(loaded, "blockdrop_release_finetuned", "resnet18", 3)
    assert isinstance(loaded.model, ImageNetResNet)
    assert loaded.model.normalization == IMAGENET_NORMALIZATION
    assert "agent_state_dict" in loaded.extra
    torch.testing.assert_close(_outputs(loaded.model, 64), _outputs(source, 64))


def test_load_torchvision(tmp_path):
    source = _torchvision_resnet18()
    path = _save(source.state_dict(), tmp_path / "resnet18.pth")

    loaded = load_resnet(path)

    _assert_loaded(loaded, "torchvision", "resnet18", 3)
    assert loaded.model.normalization == IMAGENET_NORMALIZATION
    assert loaded.model.input_size == (224, 224)
    assert loaded.extra == {}
    torch.testing.assert_close(_outputs(loaded.model, 64), _outputs(source, 64))


@pytest.mark.parametrize(
    ("layout", "bottleneck", "arch"),
    [
        ((2, 2, 2, 2), False, "resnet18"),
        ((3, 4, 6, 3), False, "resnet34"),
        ((3, 4, 6, 3), True, "resnet50"),
        ((3, 4, 23, 3), True, "resnet101"),
        ((3, 8, 36, 3), True, "resnet152"),
    ],
)
def test_torchvision_arch_inferred_from_layout(layout, bottleneck, arch):
    keys = [
        f"layer{stage}.{block}.conv{3 if bottleneck else 2}.weight"
        for stage, count in enumerate(layout, start=1)
        for block in range(count)
    ]
    state = {key: torch.zeros(1) for key in keys}

    assert checkpoints._torchvision_arch(state, "checkpoint") == arch


def test_load_blockdrop_format_round_trip(tmp_path):
    source = _cifar("avgpool", num_classes=4)
    custom = Normalization((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    source.set_normalization(custom)
    path = tmp_path / "run" / "model.pt"

    save_resnet(source, path, extra={"accuracy": 0.91, "epochs": [1, 2], "note": None})
    loaded = load_resnet(path)

    _assert_loaded(loaded, "blockdrop", "cifar_resnet8", 4)
    assert loaded.model.shortcut_kind == "avgpool"
    assert loaded.model.normalization == custom
    assert loaded.extra == {"accuracy": 0.91, "epochs": [1, 2], "note": None}
    torch.testing.assert_close(_outputs(loaded.model), _outputs(source), rtol=0, atol=0)


def test_blockdrop_format_imagenet_input_size(tmp_path):
    source = _randomize(ImageNetResNet("resnet18", num_classes=2, input_size=(96, 128)))
    path = tmp_path / "resnet18.pt"

    save_resnet(source, path)
    loaded = load_resnet(path)

    _assert_loaded(loaded, "blockdrop", "resnet18", 2)
    assert loaded.model.input_size == (96, 128)
    torch.testing.assert_close(_outputs(loaded.model, 64), _outputs(source, 64))


def test_blockdrop_format_stores_only_plain_types(tmp_path):
    path = tmp_path / "model.pt"
    save_resnet(_cifar(), path)

    raw = torch.load(path, map_location="cpu", weights_only=True)

    assert raw["format"] == "blockdrop"
    assert raw["format_version"] == 1
    assert raw["arch"] == "cifar_resnet8"
    assert raw["num_classes"] == 5
    assert raw["shortcut"] == "A"
    assert raw["normalization"] == {
        "mean": list(IMAGENET_NORMALIZATION.mean),
        "std": list(IMAGENET_NORMALIZATION.std),
    }
    assert raw["input_size"] == [32, 32]
    assert raw["extra"] == {}


def test_detect_format_for_each_format():
    cifar, avgpool, tv = _cifar("A"), _cifar("avgpool"), _torchvision_resnet18()
    ours = checkpoints.resnet_to_state(cifar)
    cases = {
        "blockdrop": ours,
        "pytorch_resnet_cifar10": _pytorch_resnet_cifar10_checkpoint(cifar),
        "blockdrop_release_base": {"state_dict": _release_base_state(avgpool)},
        "blockdrop_release_finetuned": _release_finetuned_checkpoint(avgpool.state_dict(), True),
        "torchvision": tv.state_dict(),
    }
    for expected, checkpoint in cases.items():
        assert detect_format(checkpoint) == expected, expected


def test_override_normalization(tmp_path):
    path = _save(_pytorch_resnet_cifar10_checkpoint(_cifar()), tmp_path / "r.th")
    custom = Normalization((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))

    assert load_resnet(path, normalization=None).model.normalization is None
    assert load_resnet(path, normalization="cifar10").model.normalization == CIFAR10_NORMALIZATION
    assert load_resnet(path, normalization="none").model.normalization is None
    assert load_resnet(path, normalization=custom).model.normalization == custom


def test_input_size_override(tmp_path):
    path = _save(_pytorch_resnet_cifar10_checkpoint(_cifar()), tmp_path / "r.th")

    assert load_resnet(path, input_size=(40, 48)).model.input_size == (40, 48)


def test_matching_arch_and_num_classes_accepted(tmp_path):
    path = _save(_pytorch_resnet_cifar10_checkpoint(_cifar()), tmp_path / "r.th")

    loaded = load_resnet(path, arch="cifar_resnet8", num_classes=5)

    assert loaded.arch == "cifar_resnet8"


def test_describe_format_line(tmp_path):
    path = _save(_pytorch_resnet_cifar10_checkpoint(_cifar()), tmp_path / "r.th")

    described = load_resnet(path).describe()

    assert described == (
        f"cifar_resnet8 (3 blocks, 5 classes) from {path}, format pytorch_resnet_cifar10, "
        "normalization imagenet"
    )


def test_describe_in_memory_checkpoint():
    loaded = resnet_from_state({"state_dict": _release_base_state(_cifar("avgpool"))})

    described = loaded.describe()

    assert "from an in-memory checkpoint" in described
    assert described.endswith("normalization none")


# ---------------------------------------------------------------------------------------------
# atomic_torch_save


def test_atomic_save_replaces_target(tmp_path):
    path = tmp_path / "state.pt"
    atomic_torch_save({"version": 1}, path)

    atomic_torch_save({"version": 2}, path)

    assert torch.load(path, weights_only=True) == {"version": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]


def test_atomic_save_failure_keeps_old_file(tmp_path):
    path = tmp_path / "state.pt"
    atomic_torch_save({"version": 1}, path)

    with pytest.raises(Exception):
        atomic_torch_save({"unpicklable": lambda: None}, path)

    assert torch.load(path, weights_only=True) == {"version": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]


def test_atomic_save_creates_parent_directories(tmp_path):
    path = tmp_path / "a" / "b" / "state.pt"

    atomic_torch_save({"x": 1}, path)

    assert torch.load(path, weights_only=True) == {"x": 1}


@pytest.mark.skipif(os.name == "nt", reason="POSIX permission bits")
def test_atomic_save_uses_default_file_permissions(tmp_path):
    path = tmp_path / "state.pt"
    umask = os.umask(0o022)
    os.umask(umask)

    atomic_torch_save({"x": 1}, path)

    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


# ---------------------------------------------------------------------------------------------
# Errors: one case each


def test_load_rejects_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"missing\.th not found"):
        load_resnet(tmp_path / "missing.th")


def test_load_rejects_directory(tmp_path):
    with pytest.raises(CheckpointError, match="is not a file"):
        load_resnet(tmp_path)


def test_load_rejects_empty_file(tmp_path):
    path = tmp_path / "empty.th"
    path.write_bytes(b"")

    with pytest.raises(CheckpointError, match=r"is empty \(0 bytes\)"):
        load_resnet(path)


def test_load_rejects_truncated_file(tmp_path):
    path = _save(_pytorch_resnet_cifar10_checkpoint(_cifar()), tmp_path / "r.th")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(CheckpointError, match="probably truncated or corrupted"):
        load_resnet(path)


def test_load_rejects_truncated_legacy_file(tmp_path):
    path = tmp_path / "legacy.th"
    torch.save(_cifar().state_dict(), path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(CheckpointError, match="probably truncated or corrupted"):
        load_resnet(path)


def test_load_rejects_corrupted_legacy_file(tmp_path):
    path = tmp_path / "corrupted.th"
    path.write_bytes(b"\x80\x02" + b"\xff" * 64)

    with pytest.raises(CheckpointError, match="probably truncated or corrupted"):
        load_resnet(path)


def test_load_reads_legacy_file(tmp_path):
    path = tmp_path / "legacy.th"
    source = _cifar()
    checkpoint = _pytorch_resnet_cifar10_checkpoint(source)
    torch.save(checkpoint, path, _use_new_zipfile_serialization=False)

    loaded = load_resnet(path)

    torch.testing.assert_close(_outputs(loaded.model), _outputs(source), rtol=0, atol=0)


def test_load_rejects_text_file(tmp_path):
    path = tmp_path / "notes.th"
    path.write_text("epoch 10: accuracy 0.91\n")

    pattern = (
        "is not a PyTorch checkpoint: it starts with b'epoc'"
    )
    with pytest.raises(CheckpointError, match=pattern):
        load_resnet(path)


def test_load_rejects_png_file(tmp_path):
    path = tmp_path / "image.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))

    with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint"):
        load_resnet(path)


class _RunsShellCommand:
    """Pickles as a call to os.system, so unpickling it unsafely would run the command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (self.command,))


def test_load_rejects_pickled_code(tmp_path):
    marker = tmp_path / "marker"
    path = _save({"state_dict": _RunsShellCommand(f"touch {marker}")}, tmp_path / "evil.th")

    pattern = (
        "rejected: it contains pickled Python objects that could run code"
    )
    with pytest.raises(CheckpointError, match=pattern):
        load_resnet(path)

    assert not marker.exists()


def test_load_rejects_pickled_module(tmp_path):
    path = _save(_cifar(), tmp_path / "module.th")

    with pytest.raises(CheckpointError, match=r"rejected: .*re-save only its state_dict\(\)"):
        load_resnet(path)


def test_load_rejects_non_dict_checkpoint(tmp_path):
    path = _save([torch.zeros(2)], tmp_path / "list.th")

    with pytest.raises(CheckpointError, match="contains a list, expected a dict"):
        load_resnet(path)


def test_load_rejects_unknown_format(tmp_path):
    unrelated = {"encoder.weight": torch.zeros(2), "decoder.bias": torch.zeros(2)}
    path = _save(unrelated, tmp_path / "x.pt")

    pattern = (
        r"unknown format: expected one of blockdrop, pytorch_resnet_cifar10, "
        r".*found keys 'encoder.weight', 'decoder.bias'"
    )
    with pytest.raises(CheckpointError, match=pattern):
        load_resnet(path)


def test_detect_format_rejects_unrelated_dict():
    pattern = (
        r"unknown format: .*torchvision.*found keys 'epoch', 'optimizer'"
    )
    with pytest.raises(CheckpointError, match=pattern):
        detect_format({"epoch": 3, "optimizer": {"lr": 0.1}})


def test_load_rejects_wrong_arch(tmp_path):
    path = _save(_pytorch_resnet_cifar10_checkpoint(_cifar()), tmp_path / "r.th")

    pattern = (
        r"r\.th contains a cifar_resnet8, expected `arch` cifar_resnet32; "
        r"pass arch='cifar_resnet8'"
    )
    with pytest.raises(CheckpointError, match=pattern):
        load_resnet(path, arch="cifar_resnet32")


def test_load_rejects_wrong_num_classes(tmp_path):
    path = _save(_pytorch_resnet_cifar10_checkpoint(_cifar()), tmp_path / "r.th")

    pattern = (
        r"r\.th has 5 classes, expected `num_classes` 10; pass num_classes=5"
    )
    with pytest.raises(CheckpointError, match=pattern):
        load_resnet(path, num_classes=10)


def test_load_rejects_unequal_blocks_per_stage(tmp_path):
    state = _cifar(depth=14).state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("layer2.1.")}
    path = _save({"state_dict": state}, tmp_path / "r.th")

    pattern = (
        r"inconsistent stage layout: blocks per stage \(2, 1, 2\)"
    )
    with pytest.raises(CheckpointError, match=pattern):
        load_resnet(path)


def test_load_rejects_gap_in_block_indices(tmp_path):
    state = _cifar(depth=14).state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("layer1.0.")}
    path = _save({"state_dict": state}, tmp_path / "r.th")

    pattern = (
        r"layer1 has blocks \[1\], expected 0..0 without gaps"
    )
    with pytest.raises(CheckpointError, match=pattern):
        load_resnet(path)


def test_load_rejects_missing_stage(tmp_path):
    state = {k: v for k, v in _cifar().state_dict().items() if not k.startswith("layer2.")}
    path = _save({"state_dict": state}, tmp_path / "r.th")

    pattern = (
        "stages layer1, layer3, expected consecutive stages from layer1 on"
    )
    with pytest.raises(CheckpointError, match=pattern):
        load_resnet(path)


def test_load_rejects_unknown_torchvision_layout(tmp_path):
    state = _torchvision_resnet18().state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("layer4.1.")}
    path = _save(state, tmp_path / "resnet.pth")

    pattern = (
        r"blocks per stage \(2, 2, 2, 1\) with BasicBlock blocks, "
        r"expected one of resnet18"
    )
    with pytest.raises(CheckpointError, match=pattern):
        load_resnet(path)


def test_load_rejects_missing_key(tmp_path):
    checkpoint = _pytorch_resnet_cifar10_checkpoint(_cifar())
    del checkpoint["state_dict"]["module.layer1.0.bn1.weight"]
    path = _save(checkpoint, tmp_path / "r.th")

    pattern = (
        r"r\.th does not fit cifar_resnet8: "
        r"missing keys 'layer1.0.bn1.weight', unexpected keys none"
    )
    with pytest.raises(CheckpointError, match=pattern):
        load_resnet(path)


def test_load_rejects_unexpected_key(tmp_path):
    checkpoint = _pytorch_resnet_cifar10_checkpoint(_cifar())
    checkpoint["state_dict"]["module.layer1.0.conv3.weight"] = torch.zeros(1)
    path = _save(checkpoint, tmp_path / "r.th")

    pattern = (
        "missing keys none, unexpected keys 'layer1.0.conv3.weight'"
    )
    with pytest.raises(CheckpointError, match=pattern):
        load_resnet(path)


def test_load_rejects_wrong_shape(tmp_path):
    checkpoint = _pytorch_resnet_cifar10_checkpoint(_cifar())
    checkpoint["state_dict"]["module.layer1.0.conv1.weight"] = torch.zeros(16, 16, 5, 5)
    path = _save(checkpoint, tmp_path / "r.th")

    pattern = (
        r"shapes in file vs model differ for "
        r"'layer1.0.conv1.weight \(16, 16, 5, 5\) vs \(16, 16, 3, 3\)'"
    )
    with pytest.raises(CheckpointError, match=pattern):
        load_resnet(path)


def test_load_rejects_newer_blockdrop_format_version(tmp_path):
    checkpoint = checkpoints.resnet_to_state(_cifar())
    checkpoint["format_version"] = 2
    path = _save(checkpoint, tmp_path / "future.pt")

    with pytest.raises(CheckpointError, match="format_version 2, expected 1"):
        load_resnet(path)


def test_load_rejects_blockdrop_format_missing_field(tmp_path):
    checkpoint = checkpoints.resnet_to_state(_cifar())
    del checkpoint["arch"]
    path = _save(checkpoint, tmp_path / "broken.pt")

    with pytest.raises(CheckpointError, match=r"without the field\(s\) \['arch'\]"):
        load_resnet(path)


def test_load_rejects_unknown_normalization_name(tmp_path):
    path = _save(_pytorch_resnet_cifar10_checkpoint(_cifar()), tmp_path / "r.th")

    with pytest.raises(ConfigError, match="`normalization` must be 'auto', one of"):
        load_resnet(path, normalization="imagenet1k")


def test_save_rejects_unsafe_extra(tmp_path):
    with pytest.raises(ConfigError, match=r"`extra\['when'\]` has type \w*Path"):
        save_resnet(_cifar(), tmp_path / "model.pt", extra={"when": Path("/tmp")})

    assert not (tmp_path / "model.pt").exists()


def test_save_rejects_numpy_scalar_in_extra(tmp_path):
    with pytest.raises(ConfigError, match=r"`extra\['accuracy'\]` has type float64"):
        save_resnet(_cifar(), tmp_path / "model.pt", extra={"accuracy": np.float64(0.9)})


def test_save_rejects_non_blockdrop_model(tmp_path):
    with pytest.raises(ConfigError, match="`model` must be a BlockDropResNet"):
        save_resnet(torch.nn.Linear(2, 2), tmp_path / "model.pt")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# torchvision pre-trained weights (never downloads)


@pytest.fixture
def hub_dir(tmp_path, monkeypatch):
    directory = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(directory))
    return directory


def test_torchvision_pretrained_requires_download(hub_dir):
    expected = hub_dir / "checkpoints" / "resnet18-f37072fd.pth"

    with pytest.raises(CheckpointError, match="pass download=True") as error:
        torchvision_pretrained("resnet18")

    assert str(expected) in str(error.value)


def test_torchvision_pretrained_reads_cached_file(hub_dir):
    source = _torchvision_resnet18(num_classes=1000)
    file = hub_dir / "checkpoints" / "resnet18-f37072fd.pth"
    file.parent.mkdir(parents=True)
    torch.save(source.state_dict(), file)

    loaded = torchvision_pretrained("resnet18", "IMAGENET1K_V1")

    _assert_loaded(loaded, "torchvision", "resnet18", 1000)
    assert loaded.path == file
    assert loaded.extra["weights"] == "ResNet18_Weights.IMAGENET1K_V1"
    assert len(loaded.extra["categories"]) == 1000
    assert loaded.model.normalization == IMAGENET_NORMALIZATION
    torch.testing.assert_close(_outputs(loaded.model, 64), _outputs(source, 64))


def test_torchvision_pretrained_download_writes_to_cache(hub_dir, monkeypatch):
    source = _torchvision_resnet18(num_classes=1000)
    requests = []

    def fake_download(
        url: str, dst: str, hash_prefix: str | None = None, progress: bool = True
    ) -> None:
        requests.append((url, hash_prefix))
        torch.save(source.state_dict(), dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)

    loaded = torchvision_pretrained("resnet18", download=True)

    assert requests == [("https://download.pytorch.org/models/resnet18-f37072fd.pth", "f37072fd")]
    assert loaded.path == hub_dir / "checkpoints" / "resnet18-f37072fd.pth"


def test_torchvision_pretrained_rejects_unknown_weights(hub_dir):
    pattern = (
        r"`weights` must be one of \['IMAGENET1K_V1', 'DEFAULT'\]"
    )
    with pytest.raises(ConfigError, match=pattern):
        torchvision_pretrained("resnet18", "IMAGENET1K_V9")


def test_torchvision_pretrained_rejects_unknown_arch(hub_dir):
    with pytest.raises(ConfigError, match="`arch` must be one of"):
        torchvision_pretrained("vgg16")


# ---------------------------------------------------------------------------------------------
# Real pre-trained CIFAR-10 ResNets


@pytest.mark.real_data
@pytest.mark.parametrize(
    ("filename", "depth", "num_blocks", "best_prec1"),
    [("resnet20-12fca82f.th", 20, 9, 91.78), ("resnet32-d509ac18.th", 32, 15, 92.78)],
)
def test_real_cifar10_resnets(filename, depth, num_blocks, best_prec1):
    path = SHARED_MODELS / filename
    if not path.is_file():
        pytest.skip(f"{path} not found")

    loaded = load_resnet(path)

    _assert_loaded(loaded, "pytorch_resnet_cifar10", f"cifar_resnet{depth}", 10)
    assert loaded.model.num_blocks == num_blocks
    assert loaded.model.normalization == IMAGENET_NORMALIZATION
    assert loaded.extra["best_prec1"] == pytest.approx(best_prec1, abs=1e-3)
