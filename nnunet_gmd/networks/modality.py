"""What every Dynamic Sharing model shares, whatever its backbone: the availability mask and parameter ownership.

The segmentation U-Nets and the sentiment model follow one contract. A mask is a boolean ``(M,)`` (the same for
every sample) or ``(B, M)`` tensor, True = available, with at least one modality per sample. A parameter belongs
to modality ``m`` when its name runs through a per-modality container (``affines.<m>`` of :class:`ModalityNorm`,
``encoders.<m>`` of a per-modality input layer, ``fusion_weights.<m>`` of learned logit fusion), and to no modality (``None``: shared by every branch) otherwise.
GMD's mean rule and the amortised merge read that map to tell shared weights from per-modality ones.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

#: Name segments whose next segment is a modality index.
PER_MODALITY_CONTAINERS: Tuple[str, ...] = ("affines", "encoders", "fusion_weights")


def expand_availability(available: Optional[Tensor], batch_size: int, num_modalities: int,
                        device: torch.device) -> Tensor:
    """A ``(B, M)`` bool mask from ``None`` (all available), ``(M,)`` or ``(B, M)``; malformed or all-missing rows
    raise ``ValueError``. TorchScript-compatible, so a scripted network keeps the mask a runtime input."""
    m = num_modalities
    if available is None:
        return torch.ones(batch_size, m, dtype=torch.bool, device=device)
    mask = available.to(device=device, dtype=torch.bool)
    if mask.dim() == 1 and mask.shape[0] == m:
        mask = mask.unsqueeze(0).expand(batch_size, m)
    if mask.dim() != 2 or mask.shape[0] != batch_size or mask.shape[1] != m:
        raise ValueError(f"availability mask must have shape ({m},) or ({batch_size}, {m}), "
                         f"got {list(available.shape)}")
    if not bool(mask.any(1).all()):
        raise ValueError("every sample needs at least one available modality; got an all-missing mask row")
    return mask


def modality_owners(names: Sequence[str], shared_prefixes: Sequence[str] = ()) -> Dict[str, Optional[int]]:
    """Parameter name -> owning modality index, or ``None`` for weights shared by every branch.

    Names starting with one of ``shared_prefixes`` (e.g. a feature-fusion decoder whose norms serve the fused
    features, not one modality) are shared whatever containers they pass through.
    """
    owners: Dict[str, Optional[int]] = {}
    for name in names:
        parts: List[str] = name.split(".")
        owner: Optional[int] = None
        if parts[0] not in shared_prefixes:
            for i, part in enumerate(parts[:-1]):
                if part in PER_MODALITY_CONTAINERS and parts[i + 1].isdigit():
                    owner = int(parts[i + 1])
                    break
        owners[name] = owner
    return owners
