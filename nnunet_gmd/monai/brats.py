"""BraTS conventions of the MONAI bundle: sequence order and region channel order.

Kept in one place because the configs, the metadata, the transforms and the report must agree on them, and
the two frameworks disagree: MONAI's ``ConvertToMultiChannelBasedOnBratsClasses`` yields TC/WT/ET, nnU-Net's
BraTS regions are WT/TC/ET. The bundle follows MONAI (TC/WT/ET); reports name regions, never indices.
"""
from __future__ import annotations

#: Modality channel order of the network input (same keys as the nnU-Net path's channel names).
MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")

#: Region channel order of the network output: MONAI's BraTS convention (TC, WT, ET).
REGION_KEYS: tuple[str, ...] = ("tc", "wt", "et")

#: Report names per region key, shared with the nnU-Net path's ``missing_modality_report.json``.
REGION_NAMES: dict[str, str] = {"tc": "tumor core", "wt": "whole tumor", "et": "enhancing tumor"}

#: BraTS label written where a region is the innermost one predicted; later entries win (WT, then TC, then ET).
REGION_TO_BRATS_LABEL: dict[str, int] = {"wt": 2, "tc": 1, "et": 4}

#: Label values of a BraTS 2018-2021 segmentation (MONAI's ``ConvertToMultiChannelBasedOnBratsClasses`` reads
#: enhancing tumour as 4; a BraTS 2023 map uses 3 and would silently give an empty enhancing-tumour reference).
BRATS_LABELS: tuple[int, ...] = (0, 1, 2, 4)
