"""Backbones: feature map shapes, and how weights are found, loaded and refused."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import torchvision

from patchproto.backbones import BACKBONES, WeightsError, load_backbone, torchvision_cache_path

# (stride-8 channels, stride-16 channels, pooled channels) of each backbone's chosen stages.
CHANNELS = {
    "wide_resnet50_2": (512, 1024, 2048),
    "resnet18": (128, 256, 512),
    "efficientnet_lite0": (40, 112, 1280),
    "efficientnet_lite2": (48, 120, 1280),
}


@pytest.fixture(scope="module")
def random_backbones() -> dict:
    torch.manual_seed(0)
    return {name: load_backbone(name, pretrained=False) for name in BACKBONES}


def test_every_backbone_is_covered() -> None:
    assert set(CHANNELS) == set(BACKBONES)


@pytest.mark.parametrize("name", list(CHANNELS))
@pytest.mark.parametrize(("height", "width"), [(224, 224), (64, 96)])
def test_feature_map_shapes(random_backbones, name: str, height: int, width: int) -> None:
    backbone = random_backbones[name]
    c8, c16, pooled = CHANNELS[name]

    with torch.inference_mode():
        maps = backbone(torch.randn(1, 3, height, width))

    assert tuple(maps.stride8.shape) == (1, c8, height // 8, width // 8)
    assert tuple(maps.stride16.shape) == (1, c16, height // 16, width // 16)
    assert tuple(maps.pooled.shape) == (1, pooled)
    assert backbone.channels == (c8, c16)
    assert backbone.pooled_channels == pooled


def test_backbones_are_frozen_and_in_eval_mode(random_backbones) -> None:
    for backbone in random_backbones.values():
        assert not backbone.training
        assert not any(p.requires_grad for p in backbone.parameters())
        assert backbone.weights_id == "random-init"


def test_unknown_name_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="wide_resnet50_2"):
        load_backbone("vgg16")


def test_missing_torchvision_weights_say_how_to_get_them(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = torchvision_cache_path("wide_resnet50_2")
    assert str(expected).startswith(str(tmp_path))

    with pytest.raises(WeightsError) as caught:
        load_backbone("wide_resnet50_2")

    message = str(caught.value)
    assert str(expected) in message  # where to put them
    assert "https://download.pytorch.org/models/" in message  # where to get them
    assert "--weights" in message  # or how to point at them
    assert "efficientnet_lite2" in message  # or what to use instead


def _layer_maps(model: torchvision.models.ResNet, x: torch.Tensor) -> tuple:
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    stride8 = model.layer2(model.layer1(x))
    return stride8, model.layer3(stride8)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_file_is_loaded(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(1)
    model = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path / f"my_resnet18{suffix}"
    if suffix == ".pth":
        torch.save(model.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))

    backbone = load_backbone("resnet18", weights=path)
    x = torch.randn(1, 3, 64, 64)
    maps = backbone(x)
    with torch.no_grad():
        stride8, stride16 = _layer_maps(model, x)

    assert torch.equal(maps.stride8, stride8)
    assert torch.equal(maps.stride16, stride16)
    assert backbone.weights_id == hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def test_checkpoint_with_a_state_dict_entry_is_loaded(tmp_path: Path) -> None:
    model = torchvision.models.resnet18(weights=None)
    path = tmp_path / "checkpoint.pth"
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, path)

    backbone = load_backbone("resnet18", weights=path)

    assert torch.equal(backbone.model.conv1.weight, model.conv1.weight)


def test_weights_of_another_architecture_name_the_file(tmp_path: Path, random_backbones) -> None:
    resnet = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), resnet)
    efficientnet = tmp_path / "lite0.pth"
    torch.save(random_backbones["efficientnet_lite0"].model.state_dict(), efficientnet)

    for name, path in (("efficientnet_lite0", resnet), ("resnet18", efficientnet)):
        with pytest.raises(WeightsError) as caught:
            load_backbone(name, weights=path)
        assert str(path) in str(caught.value)
        assert name in str(caught.value)


def test_unreadable_or_missing_weights_name_the_file(tmp_path: Path) -> None:
    garbage = tmp_path / "weights.pth"
    garbage.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(WeightsError) as caught:
        load_backbone("resnet18", weights=garbage)
    assert str(garbage) in str(caught.value)

    tensor = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(WeightsError, match="not a state dict") as caught:
        load_backbone("resnet18", weights=tensor)
    assert str(tensor) in str(caught.value)

    absent = tmp_path / "absent.pth"
    for name in ("resnet18", "efficientnet_lite0"):
        with pytest.raises(WeightsError) as caught:
            load_backbone(name, weights=absent)
        assert str(absent) in str(caught.value)
