"""Dictionary transforms that carry modality availability through a MONAI pipeline.

``LoadImaged(allow_missing_keys=True)`` loads whichever sequences a case has; :class:`StackModalitiesd` then
builds the network's fixed ``(M, *spatial)`` input (zeros where a sequence is absent) plus the ``(M,)``
availability mask that switches those branches off. The mask travels as its own key, so it collates to
``(B, M)`` and reaches the network through ``PrepareBatchExtraInput``.
"""
from __future__ import annotations

from copy import deepcopy
from typing import Any, Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from nnunet_gmd.monai.brats import BRATS_LABELS, MODALITIES, REGION_KEYS, REGION_TO_BRATS_LABEL
from nnunet_gmd.monai.data import CASE_KEY, SUBSET_KEY, CaseListError
from nnunet_gmd.nifti import cannot, nonfinite_problem
from nnunet_gmd.subsets import subset_mask

AFFINE_TOLERANCE = 1e-3  # voxel-to-world differences below this are rounding, not misregistration


def _describe(image: Any, key: str) -> str:
    meta = getattr(image, "meta", {}) or {}
    return f"{key} ({meta.get('filename_or_obj', 'in memory')})"


class StackModalitiesd(MapTransform):
    """Stack the loaded sequences into ``image`` ``(M, *spatial)`` and record ``available`` ``(M,)``.

    Absent sequences become zero channels; the mask, not the zeros, is what keeps them out of the prediction.
    The stacked image takes the metadata (geometry, file name) of the first available sequence, plus the case
    name under ``meta["case"]`` so writers can name outputs after the case. The per-sequence keys are removed.
    """

    def __init__(self, keys: KeysCollection = MODALITIES, image_key: str = "image", mask_key: str = "available",
                 case_key: str = CASE_KEY) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.image_key = image_key
        self.mask_key = mask_key
        self.case_key = case_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        case = d.get(self.case_key, "<unnamed case>")
        present = [k for k in self.keys if d.get(k) is not None]
        if not present:
            raise CaseListError(f"case {case!r}: none of the sequences {', '.join(map(str, self.keys))} is "
                                f"available")
        ref_key = present[0]
        ref = d[ref_key]
        for key in present:
            image = d[key]
            if image.ndim != ref.ndim or image.shape[0] != 1:
                raise CaseListError(f"case {case!r}: {_describe(image, str(key))} must be a single 3D volume, "
                                    f"got shape {tuple(image.shape)} (channel first)")
            if image.shape != ref.shape:
                raise CaseListError(f"case {case!r}: {_describe(image, str(key))} has shape {tuple(image.shape[1:])}"
                                    f" but {_describe(ref, str(ref_key))} has {tuple(ref.shape[1:])}; the "
                                    f"sequences must be co-registered on one grid")
            problem = nonfinite_problem(image) if image.is_floating_point() else None
            if problem:   # the same refusal as ``nnunet-gmd predict``: NaN voxels silently gave an empty mask
                raise CaseListError(f"case {case!r}: {cannot(_describe(image, str(key)), problem)}")
            if isinstance(image, MetaTensor) and isinstance(ref, MetaTensor) and not torch.allclose(
                    image.affine.double(), ref.affine.double(), atol=AFFINE_TOLERANCE):
                raise CaseListError(f"case {case!r}: {_describe(image, str(key))} and {_describe(ref, str(ref_key))}"
                                    f" have different affines; the sequences must be co-registered on one grid")
        channels = [torch.as_tensor(d.pop(k), dtype=torch.float32) if k in present
                    else torch.zeros(ref.shape, dtype=torch.float32) for k in self.keys]
        for k in self.keys:
            d.pop(k, None)
        meta = deepcopy(ref.meta) if isinstance(ref, MetaTensor) else {}
        meta["case"] = str(case)
        d[self.image_key] = MetaTensor(torch.cat([c.as_tensor() if isinstance(c, MetaTensor) else c
                                                  for c in channels]), meta=meta)
        d[self.mask_key] = torch.tensor([k in present for k in self.keys], dtype=torch.bool)
        return d


class CheckBratsLabelsd(MapTransform):
    """Refuse a label map with values outside BraTS 2018-2021's 0/1/2/4, naming the case and the file.

    Without it a BraTS 2023 map (3 = enhancing tumour) trains and scores against an empty enhancing tumour.
    """

    def __init__(self, keys: KeysCollection = "label", allowed: Sequence[int] = BRATS_LABELS,
                 case_key: str = CASE_KEY) -> None:
        super().__init__(keys)
        self.allowed = tuple(int(v) for v in allowed)
        self.case_key = case_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            values = sorted(int(v) for v in torch.unique(torch.as_tensor(d[key])).tolist())
            extra = [v for v in values if v not in self.allowed]
            if extra:
                hint = " (3 is BraTS 2023's enhancing tumour: map it to 4)" if extra == [3] else ""
                raise CaseListError(f"case {d.get(self.case_key, '<unnamed case>')!r}: {_describe(d[key], str(key))} "
                                    f"has label values {values}; expected BraTS labels "
                                    f"{'/'.join(map(str, self.allowed))}{hint}")
        return d


class ApplySubsetd(MapTransform):
    """Keep only the sequences of ``data["subset"]`` (e.g. ``"t1ce+flair"``): zero the others, narrow the mask.

    Used by the per-subset evaluation, which feeds every case once per subset. Zeroing as well as masking
    means a network that ignored the mask would be caught by the evaluation instead of looking perfect.
    """

    def __init__(self, keys: KeysCollection = "image", mask_key: str = "available", subset_key: str = SUBSET_KEY,
                 modalities: Sequence[str] = MODALITIES, case_key: str = CASE_KEY) -> None:
        super().__init__(keys)
        self.mask_key = mask_key
        self.subset_key = subset_key
        self.modalities = list(modalities)
        self.case_key = case_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        case = d.get(self.case_key, "<unnamed case>")
        names = [n for n in str(d[self.subset_key]).split("+") if n]
        unknown = [n for n in names if n not in self.modalities]
        if unknown or not names:
            raise CaseListError(f"case {case!r}: subset {d[self.subset_key]!r} must be modality names from "
                                f"{', '.join(self.modalities)} joined by '+'")
        mask = subset_mask([self.modalities.index(n) for n in names], len(self.modalities))
        available = torch.as_tensor(d[self.mask_key], dtype=torch.bool)
        if bool((mask & ~available).any()):
            absent = [n for n, m, a in zip(self.modalities, mask.tolist(), available.tolist()) if m and not a]
            raise CaseListError(f"case {case!r}: subset {d[self.subset_key]!r} needs {', '.join(absent)}, which "
                                f"the case does not have")
        for key in self.key_iterator(d):
            image = d[key].clone()
            image[~mask] = 0
            d[key] = image
        d[self.mask_key] = mask
        return d


class RegionsToBratsLabelsd(MapTransform):
    """Binary region channels (TC/WT/ET by default) -> one BraTS label channel (0, 1, 2, 4), uint8.

    Standard nesting: whole tumour is edema (2) unless in the tumour core (1), unless enhancing (4).
    """

    def __init__(self, keys: KeysCollection = "pred", region_keys: Sequence[str] = REGION_KEYS) -> None:
        super().__init__(keys)
        unknown = set(region_keys) ^ set(REGION_TO_BRATS_LABEL)
        if unknown or len(region_keys) != len(REGION_TO_BRATS_LABEL):
            raise ValueError(f"region_keys must be an order of {sorted(REGION_TO_BRATS_LABEL)}, got {region_keys}")
        self.region_keys = list(region_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            regions = d[key]
            if regions.shape[0] != len(self.region_keys):
                raise ValueError(f"{key}: expected {len(self.region_keys)} region channels "
                                 f"({'/'.join(self.region_keys)}), got shape {tuple(regions.shape)}")
            values = regions.as_tensor() if isinstance(regions, MetaTensor) else torch.as_tensor(regions)
            labels = torch.zeros((1, *values.shape[1:]), dtype=torch.uint8, device=values.device)
            for region, label in REGION_TO_BRATS_LABEL.items():
                labels[values[self.region_keys.index(region)].unsqueeze(0) > 0.5] = label
            if isinstance(regions, MetaTensor):
                labels = MetaTensor(labels, meta=regions.meta, applied_operations=regions.applied_operations)
            d[key] = labels
        return d
