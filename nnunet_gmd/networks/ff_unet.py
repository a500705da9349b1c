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
* ``"attention_var"``: as ``"mean_var"``, but the mean and the variance are weighted per voxel and channel by a
  softmax over the *available* branches of scores from a shared 1x1 convolution on each branch's features. With
  every sequence present a plain mean dilutes the one sequence that shows a structure (T1ce for enhancing
  tumour) with three that do not; learned weights can lean on it, and a missing branch has no score, so the
  softmax runs over what is there. The scores start at 0, which is exactly ``"mean_var"``.
"""
from typing import List, Optional, Sequence, Type, Union

import torch
from torch import Tensor, nn

from nnunet_gmd.networks.ds_unet import DSLayout, DSNetworkBase, _init_he, segment_sum

FUSIONS = ("mean", "mean_var", "attention_var")
VARIANCE_FUSIONS = ("mean_var", "attention_var")
# Scores are squashed into (-SCORE_BOUND, SCORE_BOUND) so that exp() neither overflows nor underflows in float16
# and the softmax needs no per-sample maximum: weights stay within a factor exp(2 * SCORE_BOUND) of each other.
SCORE_BOUND = 4.0


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
        self.decoder = layout.decoder(num_classes, deep_supervision,
                                      skip_factor=2 if fusion in VARIANCE_FUSIONS else 1,
                                      **layout.block_kwargs(1, *common))
        # One score convolution per skip level, shared by every branch (the branches' own norm affines tell the
        # sequences apart); empty for the unweighted fusions, so their state dicts are unchanged.
        self.fusion_scores = nn.ModuleList(
            [conv_op(c, c, kernel_size=1, bias=True) for c in layout.features] if fusion == "attention_var" else [])
        self.apply(_init_he)
        for score in self.fusion_scores:
            nn.init.zeros_(score.weight)
            nn.init.zeros_(score.bias)

    def _fuse_features(self, rows: Tensor, sample_idx: Tensor, batch: int) -> Tensor:
        mean = self._fuse(rows, sample_idx, batch)
        if self.fusion == "mean_var":
            var = self._fuse((rows - mean.index_select(0, sample_idx)) ** 2, sample_idx, batch)
            return torch.cat((mean, var), 1)
        return mean

    @staticmethod
    def _attention_fuse(rows: Tensor, scores: Tensor, sample_idx: Tensor, batch: int,
                        bound: float = SCORE_BOUND) -> Tensor:
        """Softmax-weighted mean and variance over each sample's rows (``scores`` as ``rows``)."""
        e = torch.exp(bound * torch.tanh(scores / bound))
        weights = e / segment_sum(e, sample_idx, batch).index_select(0, sample_idx)
        mean = segment_sum(weights * rows, sample_idx, batch)
        centred = rows - mean.index_select(0, sample_idx)
        return torch.cat((mean, segment_sum(weights * centred * centred, sample_idx, batch)), 1)

    def _fuse_skips(self, skip_rows: List[Tensor], sample_idx: Tensor, batch: int) -> List[Tensor]:
        """Each skip level's rows (every available branch of every sample) fused into one per sample."""
        if len(self.fusion_scores) == 0:
            return [self._fuse_features(s, sample_idx, batch) for s in skip_rows]
        fused: List[Tensor] = []
        for level, score in enumerate(self.fusion_scores):
            fused.append(self._attention_fuse(skip_rows[level], score(skip_rows[level]), sample_idx, batch))
        return fused

    def _decode(self, fused_skips: List[Tensor]) -> List[Tensor]:
        return self.decoder(fused_skips, [fused_skips[0].shape[0]])

    def forward(self, x: Tensor, available: Optional[Tensor] = None) -> Union[Tensor, List[Tensor]]:
        rows, sample_idx, counts = self.fold(x, available)
        b = x.shape[0]
        outputs = self._decode(self._fuse_skips(self.encoder(rows, counts), sample_idx, b))
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
        skip_rows = [torch.cat([branch_features[m][s] for m in subset]) if n > 1 else branch_features[subset[0]][s]
                     for s in range(len(branch_features[0]))]
        return self._decode(self._fuse_skips(skip_rows, sample_idx, b))


__all__ = ["DSFeatureFusionUNet", "FUSIONS"]

