"""Build a Dynamic Sharing U-Net from nnU-Net plans, so training and the stock predictor make the same network."""
from __future__ import annotations

import pydoc

from nnunet_gmd.networks import FUSIONS, DSFeatureFusionUNet, DSNetworkBase, DSUNet

LOGIT_FUSION = "logits"

# Architecture arguments of PlainConvUNet that DSUNet takes unchanged.
_PASSED_THROUGH = ("n_stages", "kernel_sizes", "strides", "n_conv_per_stage_decoder", "conv_bias", "norm_op_kwargs",
                   "dropout_op_kwargs", "nonlin_kwargs")
_CLASSES = ("conv_op", "norm_op", "dropout_op", "nonlin")


def scaled_features(features: list[int], width_factor: float) -> list[int]:
    """Channel counts times ``width_factor`` (at least 1 each)."""
    return [max(1, int(round(f * width_factor))) for f in features]


def ds_unet_from_plans(arch_class_name: str, arch_kwargs: dict, num_input_channels: int, num_output_channels: int,
                       deep_supervision: bool, width_factor: float = 1.0,
                       fusion: str = LOGIT_FUSION) -> DSNetworkBase:
    """A DS network with ``num_input_channels`` branches laid out as the planned U-Net.

    ``fusion`` is ``"logits"`` (:class:`DSUNet`) or a feature-fusion operator of
    :class:`DSFeatureFusionUNet` (``"mean"``, ``"mean_var"``).

    Plain U-Net plans map one to one. Residual-encoder plans (``n_blocks_per_stage``) get that many plain
    convolutions per stage instead of residual blocks, since the DS network's blocks are plain convs.
    """
    kwargs = dict(arch_kwargs)
    for key in _CLASSES:
        if isinstance(kwargs.get(key), str):
            located = pydoc.locate(kwargs[key])
            if located is None:
                raise ValueError(f"plans name {key}={kwargs[key]!r}, which cannot be imported")
            kwargs[key] = located
    n_conv = kwargs.get("n_conv_per_stage", kwargs.get("n_blocks_per_stage"))
    if n_conv is None:
        raise ValueError(f"plans architecture {arch_class_name} has neither n_conv_per_stage nor n_blocks_per_stage")
    if fusion != LOGIT_FUSION and fusion not in FUSIONS:
        raise ValueError(f"fusion must be {LOGIT_FUSION!r} or one of {FUSIONS}, got {fusion!r}")
    features = kwargs["features_per_stage"]
    features = [features] * kwargs["n_stages"] if isinstance(features, int) else list(features)
    network_class = DSUNet if fusion == LOGIT_FUSION else DSFeatureFusionUNet
    extra = {} if fusion == LOGIT_FUSION else {"fusion": fusion}
    return network_class(
        num_modalities=num_input_channels,
        features_per_stage=scaled_features(features, width_factor),
        n_conv_per_stage=n_conv,
        num_classes=num_output_channels,
        conv_op=kwargs["conv_op"],
        norm_op=kwargs.get("norm_op"),
        dropout_op=kwargs.get("dropout_op"),
        nonlin=kwargs.get("nonlin"),
        deep_supervision=deep_supervision,
        **{k: kwargs.get(k) for k in _PASSED_THROUGH if k in kwargs},
        **extra,
    )
