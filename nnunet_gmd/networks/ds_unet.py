"""Dynamic Sharing (DS) U-Net: one single-channel U-Net whose convolutions are shared by all modality branches.

Each modality is run as its own single-channel image; the available branches are folded into the batch
dimension so every shared convolution runs once for all of them. Only the normalization affine parameters
are modality-specific. The logits of the available branches are averaged (late fusion). A missing branch is
never computed, so values in a missing channel cannot reach the output.

The constructor takes the arguments of ``dynamic_network_architectures``' ``PlainConvUNet`` (stages, features,
kernels, strides, conv/norm/dropout/nonlin ops), so the network is built straight from nnU-Net plans.

Why not wrap ``PlainConvUNet`` itself? Its blocks call ``norm(x)`` with one argument, so a modality-aware norm
would have to learn "which branch is row i" through hidden mutable state set before every call. Threading the
per-modality row counts through ``forward`` instead keeps the module stateless, scriptable with TorchScript
(the mask stays a runtime input of the exported model) and safe under DDP. Layer layout, padding, He
initialisation and deep-supervision outputs follow ``PlainConvUNet``.
"""
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
from torch import Tensor, nn

from nnunet_gmd.networks.modality import expand_availability, modality_owners

_TRANSPOSED = {nn.Conv1d: nn.ConvTranspose1d, nn.Conv2d: nn.ConvTranspose2d, nn.Conv3d: nn.ConvTranspose3d}


def segment_sum(values: Tensor, sample_idx: Tensor, batch: int) -> Tensor:
    """Per sample, the sum of the rows that belong to it (``sample_idx[r]`` is row ``r``'s sample): how every DS
    network fuses its available branches, whatever the weights."""
    shape = [batch] + list(values.shape[1:])
    return torch.zeros(shape, dtype=values.dtype, device=values.device).index_add_(0, sample_idx, values)


def _as_list(value, n: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


class _Affine(nn.Module):
    """Per-channel scale and shift of one modality."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))


class ModalityNorm(nn.Module):
    """A normalization op without affine, followed by the affine of each row's modality.

    Rows are ordered modality-major and ``counts[m]`` says how many rows modality m owns. Only the affines of
    modalities that are present enter the autograd graph: an absent modality's parameters get no gradient
    (``None``), which is what GMD's "parameters that every subset reaches" rule looks at.
    """

    def __init__(self, num_features: int, num_modalities: int, norm_op: Type[nn.Module] = nn.InstanceNorm3d,
                 norm_op_kwargs: Optional[dict] = None) -> None:
        super().__init__()
        kwargs = dict(norm_op_kwargs or {})
        kwargs["affine"] = False
        self.norm = norm_op(num_features, **kwargs)
        self.affines = nn.ModuleList([_Affine(num_features) for _ in range(num_modalities)])
        # Instance norm with a per-row affine is one batch-norm call over (1, N*C, ...): one fused kernel that
        # saves only its input for backward, instead of norm + addcmul saving two activations.
        self.fused_instance_norm = (isinstance(self.norm, nn.modules.instancenorm._InstanceNorm)
                                    and not self.norm.track_running_stats)
        self.eps = float(kwargs.get("eps", 1e-5))

    def forward(self, x: Tensor, counts: List[int]) -> Tensor:
        if self.fused_instance_norm:
            w, b = self._row_affine(counts)
            shape = [1, x.shape[0] * x.shape[1]] + list(x.shape[2:])
            return nn.functional.instance_norm(x.reshape(shape), weight=w.reshape(-1).to(x.dtype),
                                               bias=b.reshape(-1).to(x.dtype), eps=self.eps).view(x.shape)
        y = self.norm(x)
        w, b = self._row_affine(counts)
        shape = [y.shape[0], y.shape[1]] + [1] * (y.dim() - 2)
        return torch.addcmul(b.view(shape).to(y.dtype), y, w.view(shape).to(y.dtype))

    def _row_affine(self, counts: List[int]) -> Tuple[Tensor, Tensor]:
        """``(N, C)`` scale and shift, each row its modality's; absent modalities stay out of the graph."""
        weights: List[Tensor] = []
        biases: List[Tensor] = []
        for m, affine in enumerate(self.affines):
            n = counts[m]
            if n > 0:
                weights.append(affine.weight.expand(n, -1))
                biases.append(affine.bias.expand(n, -1))
        return torch.cat(weights), torch.cat(biases)


class ConvNormAct(nn.Module):
    """conv -> dropout -> modality norm -> nonlinearity, as nnU-Net's ``ConvDropoutNormReLU``."""

    def __init__(self, conv_op: Type[nn.Module], in_channels: int, out_channels: int, kernel_size: Sequence[int],
                 stride: Union[int, Sequence[int]], conv_bias: bool, num_modalities: int,
                 norm_op: Type[nn.Module], norm_op_kwargs: Optional[dict], dropout_op: Optional[Type[nn.Module]],
                 dropout_op_kwargs: Optional[dict], nonlin: Optional[Type[nn.Module]],
                 nonlin_kwargs: Optional[dict]) -> None:
        super().__init__()
        kernel_size = list(kernel_size)
        self.conv = conv_op(in_channels, out_channels, kernel_size, stride,
                            padding=[(k - 1) // 2 for k in kernel_size], dilation=1, bias=conv_bias)
        self.dropout = dropout_op(**(dropout_op_kwargs or {})) if dropout_op is not None else nn.Identity()
        self.norm = ModalityNorm(out_channels, num_modalities, norm_op, norm_op_kwargs)
        self.nonlin = nonlin(**(nonlin_kwargs or {})) if nonlin is not None else nn.Identity()

    def forward(self, x: Tensor, counts: List[int]) -> Tensor:
        return self.nonlin(self.norm(self.dropout(self.conv(x)), counts))


class ConvStack(nn.Module):
    """``n`` ConvNormAct blocks; the first one carries the stride."""

    def __init__(self, n: int, conv_op, in_channels: int, out_channels: int, kernel_size, stride, **block_kwargs):
        super().__init__()
        blocks = [ConvNormAct(conv_op, in_channels, out_channels, kernel_size, stride, **block_kwargs)]
        blocks += [ConvNormAct(conv_op, out_channels, out_channels, kernel_size, 1, **block_kwargs)
                   for _ in range(n - 1)]
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor, counts: List[int]) -> Tensor:
        for block in self.blocks:
            x = block(x, counts)
        return x


class DSEncoder(nn.Module):
    def __init__(self, stages: List[ConvStack]) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)

    def forward(self, x: Tensor, counts: List[int]) -> List[Tensor]:
        skips: List[Tensor] = []
        for stage in self.stages:
            x = stage(x, counts)
            skips.append(x)
        return skips


class DecoderStage(nn.Module):
    """Upsample, concatenate the skip, convolve; the segmentation head is always built so weights load either way."""

    def __init__(self, transpconv: nn.Module, convs: ConvStack, seg_layer: nn.Module) -> None:
        super().__init__()
        self.transpconv = transpconv
        self.convs = convs
        self.seg_layer = seg_layer

    def forward(self, below: Tensor, skip: Tensor, counts: List[int]) -> Tensor:
        return self.convs(torch.cat((self.transpconv(below), skip), 1), counts)


class DSDecoder(nn.Module):
    """Decoder whose ``deep_supervision`` flag nnU-Net toggles (``network.decoder.deep_supervision``)."""

    def __init__(self, stages: List[DecoderStage], deep_supervision: bool) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.deep_supervision = deep_supervision

    def forward(self, skips: List[Tensor], counts: List[int]) -> List[Tensor]:
        """Segmentation logits, highest resolution first (one entry unless deep supervision is on)."""
        x = skips[-1]
        outputs: List[Tensor] = []
        n = len(self.stages)
        for s, stage in enumerate(self.stages):
            x = stage(x, skips[-(s + 2)], counts)
            if self.deep_supervision or s == n - 1:
                outputs.append(stage.seg_layer(x))
        outputs.reverse()
        return outputs


class DSLayout:
    """The U-Net layout of ``PlainConvUNet``'s arguments, checked and expanded to one entry per stage."""

    def __init__(self, n_stages: int, features_per_stage, conv_op: Type[nn.Module], kernel_sizes, strides,
                 n_conv_per_stage, n_conv_per_stage_decoder) -> None:
        if conv_op not in _TRANSPOSED:
            raise ValueError(f"conv_op must be one of {list(_TRANSPOSED)}, got {conv_op}")
        dims = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[conv_op]
        self.n_stages = n_stages
        self.conv_op = conv_op
        self.features = _as_list(features_per_stage, n_stages)
        self.kernels = [_as_list(k, dims) for k in _as_list(kernel_sizes, n_stages)]
        self.strides = _as_list(strides, n_stages)
        self.n_conv = _as_list(n_conv_per_stage, n_stages)
        self.n_conv_dec = _as_list(n_conv_per_stage_decoder, n_stages - 1)
        if not (len(self.features) == len(self.kernels) == len(self.strides) == len(self.n_conv) == n_stages
                and len(self.n_conv_dec) == n_stages - 1):
            raise ValueError("features_per_stage, kernel_sizes, strides and n_conv_per_stage need n_stages entries "
                             "and n_conv_per_stage_decoder n_stages - 1")

    def block_kwargs(self, num_modalities: int, conv_bias: bool, norm_op, norm_op_kwargs, dropout_op,
                     dropout_op_kwargs, nonlin, nonlin_kwargs) -> dict:
        default_norm = nn.InstanceNorm3d if self.conv_op is nn.Conv3d else nn.InstanceNorm2d
        return dict(conv_bias=conv_bias, num_modalities=num_modalities, norm_op=norm_op or default_norm,
                    norm_op_kwargs=norm_op_kwargs if norm_op_kwargs is not None else {"eps": 1e-5},
                    dropout_op=dropout_op, dropout_op_kwargs=dropout_op_kwargs, nonlin=nonlin,
                    nonlin_kwargs=nonlin_kwargs)

    def encoder(self, **block_kwargs) -> DSEncoder:
        stages, in_ch = [], 1
        for s in range(self.n_stages):
            stages.append(ConvStack(self.n_conv[s], self.conv_op, in_ch, self.features[s], self.kernels[s],
                                    self.strides[s], **block_kwargs))
            in_ch = self.features[s]
        return DSEncoder(stages)

    def decoder(self, num_classes: int, deep_supervision: bool, skip_factor: int = 1, **block_kwargs) -> DSDecoder:
        """``skip_factor``: channels of each skip relative to its encoder stage (2 for mean-and-variance fusion)."""
        transp = _TRANSPOSED[self.conv_op]
        conv_bias = block_kwargs["conv_bias"]
        stages = []
        for s in range(1, self.n_stages):
            below, skip, stride = self.features[-s], self.features[-(s + 1)], self.strides[-s]
            below_in = below * skip_factor if s == 1 else below
            stages.append(DecoderStage(
                transp(below_in, skip, stride, stride, bias=conv_bias),
                ConvStack(self.n_conv_dec[s - 1], self.conv_op, skip + skip * skip_factor, skip,
                          self.kernels[-(s + 1)], 1, **block_kwargs),
                self.conv_op(skip, num_classes, 1, 1, 0, bias=True)))
        return DSDecoder(stages, deep_supervision)


class DSNetworkBase(nn.Module):
    """What every Dynamic Sharing network shares: the availability mask, folding and the default mask.

    Subclasses own ``encoder`` and ``decoder`` and say whether the decoder's norm affines are per modality
    (``per_modality_decoder``).
    """

    _default_available: Optional[Tensor]
    per_modality_decoder: bool = True

    def __init__(self, num_modalities: int, num_classes: int) -> None:
        super().__init__()
        if num_modalities < 1:
            raise ValueError(f"num_modalities must be >= 1, got {num_modalities}")
        self.num_modalities = num_modalities
        self.num_classes = num_classes
        self._default_available = None

    def _mask(self, x: Tensor, available: Optional[Tensor]) -> Tensor:
        self._check_channels(x)
        if available is None:
            available = self._default_available
        return expand_availability(available, x.shape[0], x.shape[1], x.device)

    def fold(self, x: Tensor, available: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, List[int]]:
        """Select the available branches into a ``(N, 1, *spatial)`` batch, modality-major.

        Returns the rows, the sample index of each row and the number of rows per modality.
        """
        mask = self._mask(x, available)
        idx = mask.t().nonzero()
        modality_idx, sample_idx = idx[:, 0], idx[:, 1]
        rows = x[sample_idx, modality_idx].unsqueeze(1)
        counts: List[int] = mask.sum(0).tolist()
        return rows, sample_idx, counts

    @staticmethod
    def _fuse(values: Tensor, sample_idx: Tensor, batch: int) -> Tensor:
        """Per-sample mean of the rows that belong to it."""
        n = torch.bincount(sample_idx, minlength=batch).to(values.dtype)
        return segment_sum(values, sample_idx, batch) / n.view([batch] + [1] * (values.dim() - 1))

    def _check_channels(self, x: Tensor) -> None:
        if x.shape[1] != self.num_modalities:
            raise ValueError(f"expected {self.num_modalities} modality channels in dim 1, got {x.shape[1]}")

    @torch.jit.unused
    def _each_branch(self, x: Tensor, run: Callable[[Tensor, List[int]], List[Tensor]]) -> List[List[Tensor]]:
        """``run`` on each modality's single-channel rows alone, each call its own autograd graph (for GMD)."""
        self._check_channels(x)
        b, m = x.shape[0], x.shape[1]
        return [run(x[:, i:i + 1], [b if j == i else 0 for j in range(m)]) for i in range(m)]

    @torch.jit.unused
    def uses_deep_supervision(self) -> bool:
        return bool(self.decoder.deep_supervision)

    @torch.jit.unused
    def modality_of_parameters(self) -> Dict[str, Optional[int]]:
        """Parameter name -> owning modality index, or ``None`` for weights shared by every branch."""
        return modality_owners([name for name, _ in self.named_parameters()],
                               shared_prefixes=() if self.per_modality_decoder else ("decoder",))

    @torch.jit.unused
    def set_default_available(self, available: Optional[Tensor]) -> None:
        """Availability used when ``forward`` is called without a mask (nnU-Net's predictor calls ``network(x)``).

        ``(M,)`` for every sample, or ``(B, M)`` for one batch of known size (nnU-Net's validation step).
        """
        if available is not None:
            available = available.to(torch.bool)
            shape_ok = available.dim() in (1, 2) and available.shape[-1] == self.num_modalities
            if not shape_ok or not bool(available.reshape(-1, self.num_modalities).any(1).all()):
                raise ValueError(f"default availability must be a ({self.num_modalities},) or (B, "
                                 f"{self.num_modalities}) mask with a modality in every row, got {available.tolist()}")
        self._default_available = available


class FusionWeight(nn.Module):
    """One modality's learned fusion logit per output channel; 0 at the start, which is the plain mean."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_classes))


class DSUNet(DSNetworkBase):
    """Dynamic Sharing U-Net over ``num_modalities`` single-channel branches, fused at the logits.

    ``forward(x, available)`` takes ``x`` of shape ``(B, M, *spatial)`` and an optional boolean availability
    mask of shape ``(M,)`` or ``(B, M)`` (default: all available). It returns the fused logits, or a list of
    them (highest resolution first) when deep supervision is on. ``forward_branch_graphs`` returns the per-branch
    logits that GMD needs.

    ``learned_fusion=True`` replaces the plain mean by learned, availability-masked weights per modality and
    output channel: output channel c is ``sum_m a_mc * logits_m`` with ``a_mc`` the softmax of the weights over
    the *available* modalities only (the official code's unused option). The full set can then lean on FLAIR for
    whole tumour and on T1ce for enhancing tumour, where a plain mean dilutes each with three weaker branches; a
    missing modality still never enters, and the weights start at 0, i.e. at the plain mean. Each modality's
    weights belong to that modality (``fusion_weights.<m>``), like its norm affines.
    """

    def __init__(self, num_modalities: int, n_stages: int, features_per_stage: Union[int, Sequence[int]],
                 conv_op: Type[nn.Module], kernel_sizes, strides, n_conv_per_stage: Union[int, Sequence[int]],
                 num_classes: int, n_conv_per_stage_decoder: Union[int, Sequence[int]], conv_bias: bool = False,
                 norm_op: Optional[Type[nn.Module]] = None, norm_op_kwargs: Optional[dict] = None,
                 dropout_op: Optional[Type[nn.Module]] = None, dropout_op_kwargs: Optional[dict] = None,
                 nonlin: Optional[Type[nn.Module]] = None, nonlin_kwargs: Optional[dict] = None,
                 deep_supervision: bool = False, learned_fusion: bool = False) -> None:
        super().__init__(num_modalities, num_classes)
        layout = DSLayout(n_stages, features_per_stage, conv_op, kernel_sizes, strides, n_conv_per_stage,
                          n_conv_per_stage_decoder)
        block_kwargs = layout.block_kwargs(num_modalities, conv_bias, norm_op, norm_op_kwargs, dropout_op,
                                           dropout_op_kwargs, nonlin, nonlin_kwargs)
        self.encoder = layout.encoder(**block_kwargs)
        self.decoder = layout.decoder(num_classes, deep_supervision, **block_kwargs)
        self.apply(_init_he)
        self.learned_fusion = learned_fusion
        # empty without learned fusion: the state dict (and strict loading of older checkpoints) is unchanged
        self.fusion_weights = nn.ModuleList([FusionWeight(num_classes) for _ in range(num_modalities)]
                                            if learned_fusion else [])

    def _run(self, rows: Tensor, counts: List[int]) -> List[Tensor]:
        return self.decoder(self.encoder(rows, counts), counts)

    def _row_weights(self, counts: List[int], device: torch.device, dtype: torch.dtype) -> Tensor:
        """``exp(weight)`` of each folded row's modality, ``(N, C)`` (shifted per channel; the shift cancels).

        Only the present modalities' weights enter the graph, so an absent modality's get no gradient (``None``),
        as its norm affines do: GMD's mean rule then sees them as that modality's parameters.
        """
        present: List[Tensor] = []
        rows: List[int] = []
        for m, f in enumerate(self.fusion_weights):
            if counts[m] > 0:
                present.append(f.weight)
                rows.append(counts[m])
        weights = torch.stack(present).to(device=device, dtype=dtype)
        scores = torch.exp(weights - weights.max(0, keepdim=True)[0])
        return torch.repeat_interleave(scores, torch.tensor(rows, device=device), dim=0)

    @staticmethod
    def _weighted_fuse(values: Tensor, row_weights: Tensor, sample_idx: Tensor, batch: int) -> Tensor:
        """Per sample and channel, the rows' values weighted by ``row_weights`` and normalised over its rows."""
        view = list(row_weights.shape) + [1] * (values.dim() - 2)
        total = segment_sum(values * row_weights.view(view), sample_idx, batch)
        norm = segment_sum(row_weights.to(values.dtype), sample_idx, batch)
        return total / norm.view([batch] + view[1:])

    def _fuse_outputs(self, outputs: List[Tensor], sample_idx: Tensor, counts: List[int],
                      batch: int) -> List[Tensor]:
        if not self.learned_fusion:
            return [self._fuse(o, sample_idx, batch) for o in outputs]
        row_weights = self._row_weights(counts, sample_idx.device, outputs[0].dtype)
        return [self._weighted_fuse(o, row_weights, sample_idx, batch) for o in outputs]

    def forward(self, x: Tensor, available: Optional[Tensor] = None) -> Union[Tensor, List[Tensor]]:
        rows, sample_idx, counts = self.fold(x, available)
        fused = self._fuse_outputs(self._run(rows, counts), sample_idx, counts, x.shape[0])
        if self.decoder.deep_supervision:
            return fused
        return fused[0]

    @torch.jit.unused
    def fuse_subset(self, branch_outputs: List[List[Tensor]], subset: Sequence[int]) -> List[Tensor]:
        """What ``forward`` gives for ``subset``, from the per-branch logit graphs of :meth:`forward_branch_graphs`."""
        order = sorted(subset)   # modality-major, as the folded rows of forward
        b = branch_outputs[0][0].shape[0]
        sample_idx = torch.arange(b, device=branch_outputs[0][0].device).repeat(len(order))
        counts = [b if m in order else 0 for m in range(self.num_modalities)]
        rows = [torch.cat([branch_outputs[m][s] for m in order]) for s in range(len(branch_outputs[0]))]
        return self._fuse_outputs(rows, sample_idx, counts, b)

    @torch.jit.unused
    def forward_branch_graphs(self, x: Tensor) -> List[List[Tensor]]:
        """Each modality branch as its own autograd graph: ``out[m][scale]`` of shape ``(B, C, *spatial)``.

        Used by GMD's structured path: a subset's VJP then runs through that subset's branches only, instead
        of through every branch with zero cotangents. The convolutions see batch B instead of M*B here.
        """
        return self._each_branch(x, self._run)


def _init_he(module: nn.Module, neg_slope: float = 1e-2) -> None:
    """nnU-Net's ``InitWeights_He``."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                           nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=neg_slope)
        if module.bias is not None:
            nn.init.constant_(module.bias, 0)
