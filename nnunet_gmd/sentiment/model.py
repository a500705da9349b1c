"""Dynamic Sharing network for sequence features: text, audio and vision through one shared temporal backbone.

* Modality-specific input encoders f_i (feature standardization + linear map) bring every modality to a common
  width.
* A shared backbone T(.; theta) runs each modality separately: a Transformer for sequences, or a residual MLP
  (``backbone="mlp"``) for utterance-level features, whose single time step gives attention nothing to do.
  Its normalizations are the core's :class:`~nnunet_gmd.networks.ModalityNorm`, so only the norm affine
  parameters are modality-specific, exactly as in the DS U-Net.
* Fusion is the mean of the pooled hidden states of the available modalities, followed by a shared regression
  head. A missing modality is switched off: its branch is not computed, so its features and its own
  parameters never enter the graph (GMD's "parameters every subset reaches" rule relies on that).

The availability mask follows the DS U-Net: bool ``(M,)`` or ``(B, M)``, True = available.

:class:`EarlyFusionMLP` is the baseline without Dynamic Sharing: standardized, time-pooled features of all
modalities concatenated (a missing modality zero-filled, i.e. set to its training mean) into one MLP.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nnunet_gmd.networks import ModalityNorm
from nnunet_gmd.networks.modality import expand_availability, modality_owners
from nnunet_gmd.sentiment import MODALITIES


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the network from a checkpoint."""

    feature_dims: tuple[int, ...]  # per modality, in MODALITIES order
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    dropout: float = 0.1
    backbone: str = "transformer"  # DS backbone: "transformer" or "mlp"
    fusion: str = "late"  # "late": DS network; "early": EarlyFusionMLP

    def to_dict(self) -> dict:
        d = asdict(self)
        d["feature_dims"] = list(self.feature_dims)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(**{**d, "feature_dims": tuple(int(x) for x in d["feature_dims"])})


@dataclass
class SequenceBatch:
    """Per-modality features ``(B, T_m, d_m)`` and valid lengths ``(B,)`` (None: all steps valid)."""

    features: list[Tensor]
    lengths: list[Optional[Tensor]]

    @property
    def batch_size(self) -> int:
        return int(self.features[0].shape[0])

    def to(self, device: torch.device) -> "SequenceBatch":
        return SequenceBatch([x.to(device) for x in self.features],
                             [None if n is None else n.to(device) for n in self.lengths])


class ChannelLayerNorm(nn.Module):
    """LayerNorm over dim 1 of ``(N, C, T)``, without affine: the ``norm_op`` that ``ModalityNorm`` wraps.

    Layer norm rather than instance norm: it normalizes each time step on its own, so zero padding never
    leaks into the statistics of real steps.
    """

    def __init__(self, num_features: int, affine: bool = False, eps: float = 1e-5) -> None:
        super().__init__()
        if affine:
            raise ValueError("ChannelLayerNorm carries no affine; ModalityNorm adds the per-modality one")
        self.num_features = num_features
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x.transpose(1, -1), (self.num_features,), eps=self.eps).transpose(1, -1)


class SequenceModalityNorm(nn.Module):
    """``ModalityNorm`` applied to ``(N, T, C)`` sequences."""

    def __init__(self, hidden: int, num_modalities: int) -> None:
        super().__init__()
        self.norm = ModalityNorm(hidden, num_modalities, norm_op=ChannelLayerNorm)

    def forward(self, x: Tensor, counts: list[int]) -> Tensor:
        return self.norm(x.transpose(1, 2), counts).transpose(1, 2)


class SharedBlock(nn.Module):
    """Pre-norm Transformer block with shared attention/feed-forward weights and modality-specific norms."""

    def __init__(self, hidden: int, heads: int, dropout: float, num_modalities: int) -> None:
        super().__init__()
        self.norm1 = SequenceModalityNorm(hidden, num_modalities)
        self.attn = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.norm2 = SequenceModalityNorm(hidden, num_modalities)
        self.ff = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Dropout(dropout),
                                nn.Linear(2 * hidden, hidden))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, padding: Tensor, counts: list[int]) -> Tensor:
        h = self.norm1(x, counts)
        x = x + self.dropout(self.attn(h, h, h, key_padding_mask=padding, need_weights=False)[0])
        return x + self.dropout(self.ff(self.norm2(x, counts)))


class SharedTemporalBackbone(nn.Module):
    """T(.; theta): sinusoidal positions, shared blocks, final modality norm, masked mean pooling over time."""

    def __init__(self, hidden: int, layers: int, heads: int, dropout: float, num_modalities: int) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
        self.hidden = hidden
        self.blocks = nn.ModuleList([SharedBlock(hidden, heads, dropout, num_modalities) for _ in range(layers)])
        self.final_norm = SequenceModalityNorm(hidden, num_modalities)

    def positions(self, steps: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        pos = torch.arange(steps, device=device, dtype=torch.float32)[:, None]
        freq = torch.exp(torch.arange(0, self.hidden, 2, device=device, dtype=torch.float32)
                         * (-math.log(10000.0) / self.hidden))
        pe = torch.zeros(steps, self.hidden, device=device)
        pe[:, 0::2] = torch.sin(pos * freq)
        pe[:, 1::2] = torch.cos(pos * freq[: self.hidden // 2])
        return pe.to(dtype)

    def forward(self, x: Tensor, lengths: Tensor, counts: list[int]) -> Tensor:
        """``x`` (N, T, H) rows ordered modality-major with ``counts`` rows per modality -> pooled (N, H)."""
        steps = x.shape[1]
        padding = torch.arange(steps, device=x.device)[None, :] >= lengths[:, None]
        x = x + self.positions(steps, x.device, x.dtype)
        for block in self.blocks:
            x = block(x, padding, counts)
        x = self.final_norm(x, counts)
        valid = (~padding).unsqueeze(-1).to(x.dtype)
        return (x * valid).sum(1) / lengths.unsqueeze(-1).to(x.dtype)


class SharedMLPBlock(nn.Module):
    """Pre-norm residual MLP block, shared weights and modality-specific norms: the Transformer block minus
    attention, which has nothing to attend to when every modality is one vector per utterance."""

    def __init__(self, hidden: int, dropout: float, num_modalities: int) -> None:
        super().__init__()
        self.norm = SequenceModalityNorm(hidden, num_modalities)
        self.ff = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Dropout(dropout),
                                nn.Linear(2 * hidden, hidden))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, counts: list[int]) -> Tensor:
        return x + self.dropout(self.ff(self.norm(x, counts)))


class SharedMLPBackbone(nn.Module):
    """T(.; theta) for utterance features: shared residual MLP blocks per step, final modality norm, masked mean
    pooling over time (a no-op for length-1 inputs, so sequence files still work)."""

    def __init__(self, hidden: int, layers: int, dropout: float, num_modalities: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([SharedMLPBlock(hidden, dropout, num_modalities) for _ in range(layers)])
        self.final_norm = SequenceModalityNorm(hidden, num_modalities)

    def forward(self, x: Tensor, lengths: Tensor, counts: list[int]) -> Tensor:
        for block in self.blocks:
            x = block(x, counts)
        x = self.final_norm(x, counts)
        if x.shape[1] == 1:
            return x[:, 0]
        valid = (torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]).unsqueeze(-1).to(x.dtype)
        return (x * valid).sum(1) / lengths.unsqueeze(-1).to(x.dtype)


BACKBONES: tuple[str, ...] = ("transformer", "mlp")
FUSIONS: tuple[str, ...] = ("late", "early")


class InputEncoder(nn.Module):
    """f_i: standardize the modality's features with training-set statistics, then map them to the common width."""

    feature_mean: Tensor
    feature_std: Tensor

    def __init__(self, feature_dim: int, hidden: int) -> None:
        super().__init__()
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        self.register_buffer("feature_std", torch.ones(feature_dim))
        self.proj = nn.Linear(feature_dim, hidden)

    def set_statistics(self, mean: Tensor, std: Tensor) -> None:
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std.clamp_min(1e-6))

    def forward(self, x: Tensor) -> Tensor:
        return self.proj((x - self.feature_mean) / self.feature_std)


def check_availability(available: Optional[Tensor], batch_size: int, num_modalities: int,
                       device: torch.device) -> Tensor:
    """Expand and check a mask exactly as the DS U-Net does (one rule: :func:`expand_availability`)."""
    return expand_availability(available, batch_size, num_modalities, device)


class DSSentimentModel(nn.Module):
    """DS network over text, audio and vision sequences with a regression output in sentiment units."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if len(config.feature_dims) != len(MODALITIES):
            raise ValueError(f"need {len(MODALITIES)} feature sizes ({', '.join(MODALITIES)}), "
                             f"got {list(config.feature_dims)}")
        self.config = config
        self.num_modalities = len(MODALITIES)
        if config.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {config.backbone!r}")
        self.encoders = nn.ModuleList([InputEncoder(d, config.hidden) for d in config.feature_dims])
        self.backbone: nn.Module
        if config.backbone == "mlp":
            self.backbone = SharedMLPBackbone(config.hidden, config.layers, config.dropout, self.num_modalities)
        else:
            self.backbone = SharedTemporalBackbone(config.hidden, config.layers, config.heads, config.dropout,
                                                   self.num_modalities)
        self.head = nn.Sequential(nn.Linear(config.hidden, config.hidden), nn.GELU(), nn.Dropout(config.dropout),
                                  nn.Linear(config.hidden, 1))

    # ------------------------------------------------------------------ branches
    def branch(self, m: int, x: Tensor, lengths: Optional[Tensor]) -> Tensor:
        """Pooled hidden state ``(n, H)`` of modality ``m`` for the rows in ``x`` (n, T, d_m)."""
        n, steps = x.shape[0], x.shape[1]
        if lengths is None:
            lengths = torch.full((n,), steps, dtype=torch.long, device=x.device)
        # A zero-length sequence (possible in unaligned files) keeps its first (zero-padded) step: attention
        # over no keys at all would be NaN.
        lengths = lengths.to(device=x.device, dtype=torch.long).clamp(1, steps)
        counts = [0] * self.num_modalities
        counts[m] = n
        return self.backbone(self.encoders[m](x), lengths, counts)

    def forward_branches(self, batch: SequenceBatch) -> list[Tensor]:
        """Pooled state ``(B, H)`` of every modality: one forward from which all subset losses are taken.

        A list, not a stacked tensor: stacking would link every branch into every subset's graph, and autograd
        would hand an absent modality's parameters zero gradients instead of None.
        """
        return [self.branch(m, batch.features[m], batch.lengths[m]) for m in range(self.num_modalities)]

    def predict_subset(self, pooled: Sequence[Tensor], subset: Sequence[int]) -> Tensor:
        """Fused prediction ``(B,)`` of ``subset`` from :meth:`forward_branches` output."""
        fused = sum(pooled[m] for m in subset) / len(subset)
        return self.head(fused).squeeze(-1)

    # ------------------------------------------------------------------ inference with missing modalities
    def availability(self, available: Optional[Tensor], batch_size: int, device: torch.device) -> Tensor:
        """Expand and check a ``(M,)`` or ``(B, M)`` mask, as the DS U-Net does."""
        return check_availability(available, batch_size, self.num_modalities, device)

    def forward(self, batch: SequenceBatch, available: Optional[Tensor] = None) -> Tensor:
        """Prediction ``(B,)`` from the available modalities only; missing branches are never computed."""
        b = batch.batch_size
        device = batch.features[0].device
        mask = self.availability(available, b, device)
        total = torch.zeros(b, self.config.hidden, device=device, dtype=batch.features[0].dtype)
        for m in range(self.num_modalities):
            rows = mask[:, m].nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            lengths = batch.lengths[m]
            pooled = self.branch(m, batch.features[m][rows], None if lengths is None else lengths[rows])
            total = total.index_add(0, rows, pooled)
        fused = total / mask.sum(1, keepdim=True).to(total.dtype)
        return self.head(fused).squeeze(-1)

    def modality_of_parameters(self) -> dict[str, Optional[int]]:
        """Parameter name -> owning modality index, or None for weights shared by every branch."""
        return modality_owners([name for name, _ in self.named_parameters()])   # the DS U-Net's rule


class Standardizer(nn.Module):
    """Per-feature standardization with training-set statistics (the early-fusion model's only per-modality part)."""

    feature_mean: Tensor
    feature_std: Tensor

    def __init__(self, feature_dim: int) -> None:
        super().__init__()
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        self.register_buffer("feature_std", torch.ones(feature_dim))

    def set_statistics(self, mean: Tensor, std: Tensor) -> None:
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std.clamp_min(1e-6))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.feature_mean) / self.feature_std


class EarlyFusionMLP(nn.Module):
    """Baseline: one MLP on the concatenated, standardized, time-pooled features of all modalities.

    A missing modality is zero-filled after standardization (its training mean), the usual way such models are
    run on incomplete inputs; with random modality dropout in training it learns to expect that.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if len(config.feature_dims) != len(MODALITIES):
            raise ValueError(f"need {len(MODALITIES)} feature sizes ({', '.join(MODALITIES)}), "
                             f"got {list(config.feature_dims)}")
        self.config = config
        self.num_modalities = len(MODALITIES)
        self.encoders = nn.ModuleList([Standardizer(d) for d in config.feature_dims])
        layers: list[nn.Module] = []
        width = sum(config.feature_dims)
        for _ in range(config.layers):
            layers += [nn.Linear(width, config.hidden), nn.GELU(), nn.Dropout(config.dropout)]
            width = config.hidden
        self.mlp = nn.Sequential(*layers, nn.Linear(width, 1))

    @staticmethod
    def _pool(x: Tensor, lengths: Optional[Tensor]) -> Tensor:
        if lengths is None or x.shape[1] == 1:
            return x.mean(1)
        steps = x.shape[1]
        lengths = lengths.to(device=x.device, dtype=torch.long).clamp(1, steps)
        valid = (torch.arange(steps, device=x.device)[None, :] < lengths[:, None]).unsqueeze(-1).to(x.dtype)
        return (x * valid).sum(1) / lengths.unsqueeze(-1).to(x.dtype)

    def forward(self, batch: SequenceBatch, available: Optional[Tensor] = None) -> Tensor:
        mask = check_availability(available, batch.batch_size, self.num_modalities, batch.features[0].device)
        parts = []
        for m in range(self.num_modalities):
            pooled = self._pool(self.encoders[m](batch.features[m]), batch.lengths[m])
            # where() rather than a product: a missing modality's (possibly garbage) values never reach the output
            parts.append(torch.where(mask[:, m:m + 1], pooled, torch.zeros_like(pooled)))
        return self.mlp(torch.cat(parts, 1)).squeeze(-1)


SentimentModel = DSSentimentModel | EarlyFusionMLP


def build_model(config: ModelConfig) -> SentimentModel:
    """The network a config describes: the DS network (late fusion) or the early-fusion baseline."""
    if config.fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS}, got {config.fusion!r}")
    return EarlyFusionMLP(config) if config.fusion == "early" else DSSentimentModel(config)
