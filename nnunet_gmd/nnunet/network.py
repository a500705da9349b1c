"""Build a Dynamic Sharing U-Net from nnU-Net plans, so training and the stock predictor make the same network.

Every network built here is registered with its :class:`NetworkSpec` (:func:`network_spec`): the dotted class path
and the JSON-able constructor arguments it was made from (kept beside the module, not on it, so scripting,
copying and DDP never see it). ``nnunet-gmd export-bundle`` writes that spec into the
MONAI bundle's ``network_def``, so the bundle rebuilds exactly what the trainer built. A further DS-family class
only needs its own ``*_from_plans`` function that goes through :func:`build_from_spec`.
"""
from __future__ import annotations

import importlib
import json
import pydoc
import weakref
from dataclasses import dataclass, field
from typing import Any, Optional

from torch import nn

from nnunet_gmd.errors import UserError
from nnunet_gmd.networks import FUSIONS, DSFeatureFusionUNet, DSNetworkBase, DSUNet

LOGIT_FUSION = "logits"
LEARNED_LOGIT_FUSION = "learned_logits"   # DSUNet with learned, availability-masked fusion weights

# The plans keys (in a configuration) that record a DS model's branch width and fusion; see recorded_width and
# recorded_fusion. A class's default may change; a trained model keeps what its plans.json records.
WIDTH_KEY = "nnunet_gmd_width_factor"
FUSION_KEY = "nnunet_gmd_fusion"
ALL_FUSIONS = (LOGIT_FUSION, LEARNED_LOGIT_FUSION) + tuple(FUSIONS)

# Architecture arguments of PlainConvUNet that DSUNet takes unchanged.
_PASSED_THROUGH = ("n_stages", "kernel_sizes", "strides", "n_conv_per_stage_decoder", "conv_bias", "norm_op_kwargs",
                   "dropout_op_kwargs", "nonlin_kwargs")
_CLASSES = ("conv_op", "norm_op", "dropout_op", "nonlin")
_SPECS: "weakref.WeakKeyDictionary[nn.Module, NetworkSpec]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class NetworkSpec:
    """A network as ``target(**kwargs)``: ``target`` a dotted class path, classes in ``kwargs`` as dotted paths."""

    target: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    class_args: tuple[str, ...] = _CLASSES  # kwargs whose values are dotted class paths (or None)

    def build(self) -> nn.Module:
        module, _, name = self.target.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        kwargs = dict(self.kwargs)
        for key in self.class_args:
            if isinstance(kwargs.get(key), str):
                kwargs[key] = _locate(key, kwargs[key])
        return cls(**kwargs)

    def to_monai_config(self) -> dict[str, Any]:
        """The ``network_def`` of a MONAI bundle config (classes as ``$module.Class`` expressions)."""
        config: dict[str, Any] = {"_target_": self.target}
        for key, value in self.kwargs.items():
            config[key] = f"${value}" if key in self.class_args and isinstance(value, str) else value
        return config

    def imports(self) -> list[str]:
        """``$import top`` lines the config needs for its class expressions."""
        tops = sorted({v.split(".")[0] for k, v in self.kwargs.items() if k in self.class_args and isinstance(v, str)})
        return [f"$import {top}" for top in tops]


def _locate(key: str, path: str) -> type:
    located = pydoc.locate(path)
    if located is None:
        raise ValueError(f"plans name {key}={path!r}, which cannot be imported")
    return located


def _class_path(value: Any) -> Optional[str]:
    if value is None or isinstance(value, str):
        return value
    return f"{value.__module__}.{value.__qualname__}"


def build_from_spec(spec: NetworkSpec) -> nn.Module:
    """``spec.build()``, with the spec recorded on the network for exporters."""
    network = spec.build()
    _SPECS[network] = spec
    return network


def network_spec(network: nn.Module) -> Optional[NetworkSpec]:
    """The spec a network of this module was built from (``None`` for networks built elsewhere)."""
    return _SPECS.get(network)


def scaled_features(features: list[int], width_factor: float) -> list[int]:
    """Channel counts times ``width_factor`` (at least 1 each)."""
    return [max(1, int(round(f * width_factor))) for f in features]


def ds_unet_spec_from_plans(arch_class_name: str, arch_kwargs: dict, num_input_channels: int,
                            num_output_channels: int, deep_supervision: bool,
                            width_factor: float = 1.0, fusion: str = LOGIT_FUSION) -> NetworkSpec:
    """The DS network's arguments for ``num_input_channels`` branches laid out as the planned U-Net.

    ``fusion`` is ``"logits"`` (:class:`DSUNet`, plain mean), ``"learned_logits"`` (:class:`DSUNet` with
    learned fusion weights per modality and output channel) or a feature-fusion operator of
    :class:`DSFeatureFusionUNet` (``"mean"``, ``"mean_var"``, ``"attention_var"``).

    Plain U-Net plans map one to one. Residual-encoder plans (``n_blocks_per_stage``) get that many plain
    convolutions per stage instead of residual blocks, since the DS network's blocks are plain convs.
    """
    kwargs = dict(arch_kwargs)
    for key in _CLASSES:
        if kwargs.get(key) is not None and not isinstance(kwargs[key], str):
            kwargs[key] = _class_path(kwargs[key])
        elif isinstance(kwargs.get(key), str):
            kwargs[key] = _class_path(_locate(key, kwargs[key]))  # canonical, importable path
    n_conv = kwargs.get("n_conv_per_stage", kwargs.get("n_blocks_per_stage"))
    if n_conv is None:
        raise ValueError(f"plans architecture {arch_class_name} has neither n_conv_per_stage nor n_blocks_per_stage")
    if fusion not in ALL_FUSIONS:
        raise ValueError(f"fusion must be one of {ALL_FUSIONS}, got {fusion!r}")
    features = kwargs["features_per_stage"]
    features = [features] * kwargs["n_stages"] if isinstance(features, int) else list(features)
    network_class = DSUNet if fusion in (LOGIT_FUSION, LEARNED_LOGIT_FUSION) else DSFeatureFusionUNet
    extra = ({} if fusion == LOGIT_FUSION else {"learned_fusion": True} if fusion == LEARNED_LOGIT_FUSION
             else {"fusion": fusion})
    return NetworkSpec(f"{network_class.__module__}.{network_class.__qualname__}", {
        "num_modalities": num_input_channels,
        "features_per_stage": scaled_features(features, width_factor),
        "n_conv_per_stage": n_conv,
        "num_classes": num_output_channels,
        "conv_op": kwargs["conv_op"],
        "norm_op": kwargs.get("norm_op"),
        "dropout_op": kwargs.get("dropout_op"),
        "nonlin": kwargs.get("nonlin"),
        "deep_supervision": deep_supervision,
        **{k: kwargs.get(k) for k in _PASSED_THROUGH if k in kwargs},
        **extra,
    })


def recorded_width(configuration: dict, default: float) -> float:
    """The branch width a plans configuration records (:data:`WIDTH_KEY`), or ``default`` where it records none."""
    width = configuration.get(WIDTH_KEY, default)
    if not isinstance(width, (int, float)) or isinstance(width, bool) or not 0 < width <= 4:
        raise UserError(f"plans key {WIDTH_KEY} must be a number in (0, 4], got {width!r}")
    return float(width)


def recorded_fusion(configuration: dict, default: str) -> str:
    """The fusion a plans configuration records (:data:`FUSION_KEY`), or ``default`` where it records none."""
    fusion = configuration.get(FUSION_KEY, default)
    if fusion not in ALL_FUSIONS:
        raise UserError(f"plans key {FUSION_KEY} must be one of {', '.join(ALL_FUSIONS)}, got {fusion!r}")
    return fusion


def saved_configuration(plans_json: str, configuration: str) -> Optional[dict]:
    """One configuration of a model folder's plans.json, or None if the file lacks it."""
    try:
        with open(plans_json) as f:
            saved = json.load(f)["configurations"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{plans_json}: cannot read its configurations ({type(e).__name__}: {e}); move the "
                        f"folder away to train afresh") from None
    return saved.get(configuration)


def ds_unet_from_plans(arch_class_name: str, arch_kwargs: dict, num_input_channels: int, num_output_channels: int,
                       deep_supervision: bool, width_factor: float = 1.0,
                       fusion: str = LOGIT_FUSION) -> DSNetworkBase:
    """A DS network built from :func:`ds_unet_spec_from_plans` (the spec is kept beside the network)."""
    return build_from_spec(ds_unet_spec_from_plans(arch_class_name, arch_kwargs, num_input_channels,
                                                   num_output_channels, deep_supervision, width_factor, fusion))
