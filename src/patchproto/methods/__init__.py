"""Few-shot classification methods, one module per paper, swapped by name.

>>> sorted(METHODS)
['finetune', 'gt_proto', 'matching', 'patchproto', 'protonet', 'seg_proto', 'simpleshot']
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from patchproto.methods.base import FewShotMethod, ImageFeatures, Prediction, check_support
from patchproto.methods.finetune import Finetune
from patchproto.methods.masked import GroundTruthProto, SegmentationProto
from patchproto.methods.matching import MatchingNetworks
from patchproto.methods.patchproto import PatchProtoNetworks
from patchproto.methods.protonet import PrototypicalNetworks
from patchproto.methods.simpleshot import SimpleShot

METHODS: dict[str, Callable[..., FewShotMethod]] = {
    "patchproto": PatchProtoNetworks,
    "protonet": PrototypicalNetworks,
    "simpleshot": SimpleShot,
    "matching": MatchingNetworks,
    "finetune": Finetune,
    "seg_proto": SegmentationProto,
    "gt_proto": GroundTruthProto,
}


def make_method(name: str, **params: Any) -> FewShotMethod:
    """Build a method by name with its parameters.

    Raises:
        ValueError: The name is unknown, or a parameter does not belong to the method.

    Example:
        >>> make_method("patchproto", gamma=0.5, m=16)
        PatchProtoNetworks(gamma=0.5, m=16, temperature=1.0, normalize_weights=True)
    """
    if name not in METHODS:
        msg = f"unknown method {name!r}; choose one of: {', '.join(METHODS)}"
        raise ValueError(msg)
    try:
        return METHODS[name](**params)
    except TypeError as error:
        msg = f"method {name!r} does not take the parameters {sorted(params)}: {error}"
        raise ValueError(msg) from error


__all__ = [
    "METHODS",
    "FewShotMethod",
    "Finetune",
    "GroundTruthProto",
    "ImageFeatures",
    "MatchingNetworks",
    "PatchProtoNetworks",
    "Prediction",
    "PrototypicalNetworks",
    "SegmentationProto",
    "SimpleShot",
    "check_support",
    "make_method",
]
