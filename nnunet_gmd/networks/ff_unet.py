"""Feature-fusion Dynamic Sharing U-Net: a shared encoder per sequence, fused skips, one shared decoder.

The logit-fusion :class:`~nnunet_gmd.networks.ds_unet.DSUNet` averages four independent single-channel U-Nets,
so no layer ever sees two sequences together; with every sequence present it trails nnU-Net's early fusion.
Here each available sequence runs through the *shared* encoder (modality-specific norm affines, as in DSUNet),
the available branches' features are fused at every skip level by an operator that does not depend on how many
are present, and one shared decoder segments the fused features (the paper's Eq. 2 applied to hidden states, as
HeMIS, RFNet and mmFormer do). A missing branch is still never computed, so its values cannot reach the output.

Fusion operators (``fusion``):

* ``"mean"``: the mean of the available branches' features.
* ``"mean_var"``: HeMIS' mean and variance, concatenated (the variance of a single branch is 0); the decoder's
  skip inputs are then twice as wide.
"""
from typing import List, Optional, Sequence, Type, Union

import torch
from torch import Tensor, nn

from nnunet_gmd.networks.ds_unet import DSLayout, DSNetworkBase, _init_he

FUSIONS = ("mean", "mean_var")


class DSFeatureFusionUNet(DSNetworkBase):
    """Dynamic Sharing U-Net fused at every skip level; ``PlainConvUNet``'s arguments plus ``fusion``.

    ``forward(x, available)`` is as :class:`DSUNet`'s. For GMD, ``forward_branch_graphs`` returns each branch's
    encoder features as its own graph, and ``decode_subset`` fuses and decodes one subset from them.
    """

    per_modality_decoder = False  # the decoder sees fused features: its norms belong to no modality

    def __init__(self, num_modalities: int, n_stages: int, features_per_stage: Union[int, Sequence[int]],
                 conv_op: Type[nn.Module], kernel_sizes, strides, n_conv_per_stage: Union[int, Sequence[int]],
                 num_classes: int, n_conv_per_stage_decoder: Union[int, Sequence[int]], conv_bias: bool = False,
                 norm_op: Optional[Type[nn.Module]] = None, norm_op_kwargs: Optional[dict] = None,
                 dropout_op: Optional[Type[nn.Module]] = None, dropout_op_kwargs: Optional[dict] = None,
                 nonlin: Optional[Type[nn.Module]] = None, nonlin_kwargs: Optional[dict] = None,
                 deep_supervision: bool = False, fusion: str = "mean") -> None:
        super().__init__(num_modalities, num_classes)
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        self.fusion = fusion
        layout = DSLayout(n_stages, features_per_stage, conv_op, kernel_sizes, strides, n_conv_per_stage,
                          n_conv_per_stage_decoder)
        common = (conv_bias, norm_op, norm_op_kwargs, dropout_op, dropout_op_kwargs, nonlin, nonlin_kwargs)
        self.encoder = layout.encoder(**layout.block_kwargs(num_modalities, *common))
        # One "modality" in the decoder: its ModalityNorms are then plain norms with one affine.
        self.decoder = layout.decoder(num_classes, deep_supervision, skip_factor=2 if fusion == "mean_var" else 1,
                                      **layout.block_kwargs(1, *common))
        self.apply(_init_he)

    def _fuse_features(self, rows: Tensor, sample_idx: Tensor, batch: int) -> Tensor:
        mean = self._fuse(rows, sample_idx, batch)
        if self.fusion == "mean_var":
            var = self._fuse((rows - mean.index_select(0, sample_idx)) ** 2, sample_idx, batch)
            return torch.cat((mean, var), 1)
        return mean

    def _decode(self, fused_skips: List[Tensor]) -> List[Tensor]:
        return self.decoder(fused_skips, [fused_skips[0].shape[0]])

    def forward(self, x: Tensor, available: Optional[Tensor] = None) -> Union[Tensor, List[Tensor]]:
        rows, sample_idx, counts = self.fold(x, available)
        b = x.shape[0]
        skips = [self._fuse_features(s, sample_idx, b) for s in self.encoder(rows, counts)]
        outputs = self._decode(skips)
        if self.decoder.deep_supervision:
            return outputs
        return outputs[0]

    @torch.jit.unused
    def forward_branch_graphs(self, x: Tensor) -> List[List[Tensor]]:
        """Each branch's encoder features as its own graph: ``out[m][stage]`` of shape ``(B, C_stage, ...)``."""
        return self._each_branch(x, self.encoder)

    @torch.jit.unused
    def decode_subset(self, branch_features: List[List[Tensor]], subset: Sequence[int]) -> List[Tensor]:
        """Fuse the features of ``subset``'s branches and decode them: what ``forward`` gives for that subset."""
        b = branch_features[0][0].shape[0]
        n = len(subset)
        sample_idx = torch.arange(b, device=branch_features[0][0].device).repeat(n)
        skips = []
        for s in range(len(branch_features[0])):
            rows = torch.cat([branch_features[m][s] for m in subset]) if n > 1 else branch_features[subset[0]][s]
            skips.append(self._fuse_features(rows, sample_idx, b))
        return self._decode(skips)


__all__ = ["DSFeatureFusionUNet", "FUSIONS"]

