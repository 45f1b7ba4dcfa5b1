"""Tests for blockdrop_env/resnet.py: per-sample block execution, shortcuts and FLOPs."""

from __future__ import annotations

import copy

import pytest
import torch

from blockdrop_env.errors import ConfigError
from blockdrop_env.resnet import (
    CifarResNet,
    ImageNetResNet,
    Normalization,
    build_resnet,
    prefer_channels_last,
)


def _randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> None:
    """Give BatchNorm layers non-trivial statistics so eval-mode outputs are not degenerate."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            size = module.num_features
            module.running_mean.copy_(torch.randn(size, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(size, generator=generator) * 0.5 + 0.25)
            module.bias.data.copy_(torch.randn(size, generator=generator) * 0.1)


def _models() -> list[tuple[str, torch.nn.Module, tuple[int, int]]]:
    torch.manual_seed(0)
    models = [
        ("cifar_A", CifarResNet(depth=14, num_classes=7, shortcut="A"), (32, 32)),
        ("cifar_avgpool", CifarResNet(depth=14, num_classes=7, shortcut="avgpool"), (32, 32)),
        ("resnet18", ImageNetResNet("resnet18", num_classes=5, input_size=(64, 64)), (64, 64)),
        ("resnet50", ImageNetResNet("resnet50", num_classes=5, input_size=(64, 64)), (64, 64)),
    ]
    for _, model, _ in models:
        _randomize_batchnorm(model)
        model.eval()
    return models


MODELS = _models()
MODEL_IDS = [name for name, _, _ in MODELS]


@pytest.mark.parametrize(("name", "model", "size"), MODELS, ids=MODEL_IDS)
def test_all_ones_policy_equals_plain_forward(name, model, size):
    x = torch.randn(6, 3, *size)
    ones = torch.ones(6, model.num_blocks)
    with torch.no_grad():
        plain = model(x)
        sparse = model(x, ones, mode="sparse")
        masked = model(x, ones, mode="masked")
        full = model(x, ones, mode="full")
    torch.testing.assert_close(sparse, plain, rtol=0, atol=1e-5)
    torch.testing.assert_close(masked, plain, rtol=0, atol=1e-5)
    torch.testing.assert_close(full, plain, rtol=0, atol=0)


@pytest.mark.parametrize(("name", "model", "size"), MODELS, ids=MODEL_IDS)
def test_sparse_matches_masked_on_random_policies(name, model, size):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, *size, generator=generator)
    policy = torch.randint(0, 2, (8, model.num_blocks), generator=generator)
    policy[0] = 0  # one sample drops every block
    with torch.no_grad():
        sparse = model(x, policy, mode="sparse")
        masked = model(x, policy, mode="masked")
        full = model(x)
    torch.testing.assert_close(sparse, masked, rtol=0, atol=1e-4)
    assert not torch.allclose(sparse, full, atol=1e-3)


@pytest.mark.parametrize(("name", "model", "size"), MODELS, ids=MODEL_IDS)
def test_sparse_forward_channels_last_matches_contiguous(name, model, size):
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(8, 3, *size, generator=generator)
    policy = torch.randint(0, 2, (8, model.num_blocks), generator=generator)
    last = prefer_channels_last(copy.deepcopy(model), "cpu")
    weights = [p for p in last.parameters() if p.dim() == 4]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
    with torch.no_grad():
        expected = model(x, policy, mode="sparse")
        stem = last.stem(x)
        actual = last(x, policy, mode="sparse")
    assert stem.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-4)


def test_dropped_block_is_not_computed_for_any_sample(monkeypatch):
    model = CifarResNet(depth=14).eval()
    batch_sizes: dict[int, list[int]] = {i: [] for i in range(model.num_blocks)}
    original = CifarResNet.residual

    def counting_residual(self, index, x):
        batch_sizes[index].append(x.shape[0])
        return original(self, index, x)

    monkeypatch.setattr(CifarResNet, "residual", counting_residual)
    policy = torch.zeros(5, model.num_blocks)
    policy[:, 1] = 1
    policy[[0, 3], 2] = 1
    with torch.no_grad():
        model(torch.randn(5, 3, 32, 32), policy, mode="sparse")
    assert batch_sizes[0] == []
    assert batch_sizes[1] == [5]
    assert batch_sizes[2] == [2]
    assert all(batch_sizes[i] == [] for i in range(3, model.num_blocks))


def test_all_zero_policy_skips_every_block():
    model = CifarResNet(depth=8, num_classes=4, shortcut="A").eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = model(x, torch.zeros(3, model.num_blocks), mode="sparse")
        expected = model.stem(x)
        for i in range(model.num_blocks):
            expected = model.shortcut(i, expected)
        expected = model.head(expected)
    torch.testing.assert_close(out, expected)


def test_sparse_mode_propagates_gradients_to_kept_samples_only():
    model = CifarResNet(depth=8, num_classes=3).train()
    x = torch.randn(4, 3, 32, 32)
    policy = torch.ones(4, model.num_blocks)
    policy[:, 0] = 0
    model(x, policy, mode="sparse").sum().backward()
    assert model.layer1[0].conv1.weight.grad is None
    assert model.layer2[0].conv1.weight.grad.abs().sum() > 0


def test_masked_dropped_block_gets_zero_gradient():
    model = CifarResNet(depth=8, num_classes=3).train()
    x = torch.randn(4, 3, 32, 32)
    policy = torch.ones(4, model.num_blocks)
    policy[:, 1] = 0
    model(x, policy, mode="masked").sum().backward()
    assert model.layer2[0].conv1.weight.grad.abs().sum() == 0
    assert model.layer3[0].conv1.weight.grad.abs().sum() > 0


def test_option_a_shortcut_pads_channels_on_both_sides():
    model = CifarResNet(depth=8, shortcut="A")
    x = torch.randn(2, 16, 32, 32)
    out = model.shortcut(1, x)
    assert out.shape == (2, 32, 16, 16)
    torch.testing.assert_close(out[:, 8:24], x[:, :, ::2, ::2])
    assert out[:, :8].abs().sum() == 0
    assert out[:, 24:].abs().sum() == 0


def test_avgpool_shortcut_appends_zero_channels():
    model = CifarResNet(depth=8, shortcut="avgpool")
    x = torch.randn(2, 16, 32, 32)
    out = model.shortcut(1, x)
    assert out.shape == (2, 32, 16, 16)
    torch.testing.assert_close(out[:, :16], torch.nn.functional.avg_pool2d(x, 2))
    assert out[:, 16:].abs().sum() == 0


@pytest.mark.parametrize(
    ("depth", "num_blocks"), [(8, 3), (14, 6), (20, 9), (32, 15), (56, 27), (110, 54)]
)
def test_cifar_depth_sets_block_count(depth, num_blocks):
    model = CifarResNet(depth=depth)
    assert model.num_blocks == num_blocks
    assert model.block_names[0] == "layer1.0"
    assert model.block_names[-1] == f"layer3.{num_blocks // 3 - 1}"


@pytest.mark.parametrize(
    ("arch", "num_blocks", "gmacs"),
    [("resnet18", 8, 1.81), ("resnet34", 16, 3.66), ("resnet50", 16, 4.09), ("resnet101", 33, 7.80)],
)
def test_imagenet_block_counts_and_flops_match_torchvision(arch, num_blocks, gmacs):
    model = ImageNetResNet(arch)
    assert model.num_blocks == num_blocks
    assert model.flops_table.total / 1e9 == pytest.approx(gmacs, abs=0.01)


def test_imagenet_state_dict_keys_are_torchvision_keys():
    import torchvision

    ours = set(ImageNetResNet("resnet18").state_dict())
    theirs = set(torchvision.models.resnet18().state_dict())
    assert ours == theirs


def test_cifar_resnet32_flops_by_hand():
    table = CifarResNet(depth=32).flops_table
    stage1 = 2 * 16 * 16 * 9 * 32 * 32
    assert table.stem == 3 * 16 * 9 * 32 * 32
    assert table.blocks[0] == stage1
    assert table.blocks[5] == (16 * 32 * 9 + 32 * 32 * 9) * 16 * 16
    assert table.head == 64 * 10
    assert sum(table.shortcuts) == 0


def test_policy_flops_counts_fixed_parts_and_kept_blocks():
    model = ImageNetResNet("resnet18", num_classes=3, input_size=(64, 64))
    table = model.flops_table
    policy = torch.zeros(2, model.num_blocks)
    policy[1, [0, 3]] = 1
    flops = model.policy_flops(policy)
    assert flops[0].item() == table.fixed
    assert flops[1].item() == table.fixed + table.blocks[0] + table.blocks[3]
    assert sum(table.shortcuts) > 0
    assert model.policy_flops(torch.ones(1, model.num_blocks)).item() == table.total


def test_preprocess_applies_normalization():
    model = CifarResNet(depth=8, normalization=Normalization((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))
    images = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    torch.testing.assert_close(model.preprocess(images), torch.full((1, 3, 2, 2), 2.0))
    model.set_normalization(None)
    torch.testing.assert_close(model.preprocess(images), torch.ones(1, 3, 2, 2))


def test_preprocess_rejects_float_images():
    with pytest.raises(ConfigError, match="`images` must be a uint8 tensor"):
        CifarResNet(depth=8).preprocess(torch.zeros(1, 3, 32, 32))


@pytest.mark.parametrize("depth", [7, 10, 0, 33])
def test_cifar_rejects_depth_not_6n_plus_2(depth):
    with pytest.raises(ConfigError, match="`depth` must be 6n\\+2"):
        CifarResNet(depth=depth)


def test_cifar_rejects_zero_classes():
    with pytest.raises(ConfigError, match="`num_classes` must be a positive integer, got 0"):
        CifarResNet(depth=8, num_classes=0)


def test_cifar_rejects_unknown_shortcut():
    with pytest.raises(ConfigError, match="`shortcut` must be one of"):
        CifarResNet(depth=8, shortcut="B")


def test_build_resnet_rejects_unknown_arch():
    with pytest.raises(ConfigError, match="got 'resnet99'"):
        build_resnet("resnet99", 10)


def test_build_resnet_names():
    assert build_resnet("cifar_resnet20", 10).num_blocks == 9
    assert build_resnet("resnet34", 10).num_blocks == 16


def test_forward_rejects_policy_with_wrong_width():
    model = CifarResNet(depth=8)
    with pytest.raises(ConfigError, match=r"`policy` must have shape \(B, 3\), got \(2, 4\)"):
        model(torch.randn(2, 3, 32, 32), torch.ones(2, 4))


def test_forward_rejects_policy_with_wrong_batch():
    model = CifarResNet(depth=8)
    with pytest.raises(ConfigError, match="`policy` has 3 rows but the batch has 2 images"):
        model(torch.randn(2, 3, 32, 32), torch.ones(3, 3))


def test_forward_rejects_non_binary_policy():
    model = CifarResNet(depth=8)
    with pytest.raises(ConfigError, match="`policy` entries must be 0 or 1"):
        model(torch.randn(2, 3, 32, 32), torch.full((2, 3), 0.5))


def test_forward_rejects_policy_that_is_not_a_tensor():
    model = CifarResNet(depth=8)
    with pytest.raises(ConfigError, match="`policy` must be a torch.Tensor"):
        model(torch.randn(2, 3, 32, 32), [[1, 1, 1], [1, 1, 1]])


def test_forward_rejects_unknown_mode():
    model = CifarResNet(depth=8)
    with pytest.raises(ConfigError, match="`mode` must be one of"):
        model(torch.randn(2, 3, 32, 32), torch.ones(2, 3), mode="dense")
