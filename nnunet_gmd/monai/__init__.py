"""MONAI glue for the Dynamic Sharing network and GMD (used by ``monai_bundle/``).

* :mod:`.data` — case lists from BraTS-style folders or datalist JSON; absent sequences are normal.
* :mod:`.transforms` — stack sequences + availability mask, per-subset evaluation, regions -> BraTS labels.
* :mod:`.inferers` — sliding-window inference that passes each case's mask to the network.
* :mod:`.gmd_update` — GMD as ``SupervisedTrainer``'s ``iteration_update``, with conflict-count outputs.
* :mod:`.handlers` — nnU-Net's poly learning rate as a stateless, resume-safe handler.
* :mod:`.report` — ``missing_modality_report.json`` (Dice per region for every subset).
* :mod:`.nnunet_plan` — nnU-Net's preprocessing, sliding window and export as MONAI components, for bundles
  written by ``nnunet-gmd export-bundle``.
"""
from nnunet_gmd.monai import brats, data, gmd_update, handlers, inferers, io, nnunet_plan, report, transforms
from nnunet_gmd.monai.brats import MODALITIES, REGION_KEYS, REGION_NAMES
from nnunet_gmd.monai.data import CaseListError, expand_subsets, load_cases, split_train_val
from nnunet_gmd.monai.gmd_update import GMDIterationUpdate, training_scalars
from nnunet_gmd.monai.handlers import PolyLRHandler
from nnunet_gmd.monai.inferers import AvailabilitySlidingWindowInferer
from nnunet_gmd.monai.report import MissingModalityReport
from nnunet_gmd.monai.transforms import ApplySubsetd, CheckBratsLabelsd, RegionsToBratsLabelsd, StackModalitiesd

__all__ = ["brats", "data", "gmd_update", "handlers", "inferers", "io", "nnunet_plan", "report", "transforms", "MODALITIES", "REGION_KEYS",
           "REGION_NAMES", "CaseListError", "expand_subsets", "load_cases", "split_train_val",
           "GMDIterationUpdate", "training_scalars", "PolyLRHandler", "AvailabilitySlidingWindowInferer", "MissingModalityReport",
           "ApplySubsetd", "CheckBratsLabelsd", "RegionsToBratsLabelsd", "StackModalitiesd"]
