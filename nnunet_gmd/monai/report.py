"""Per-subset evaluation report: Dice per region for every modality subset, as ``missing_modality_report.json``.

The schema is shared with the nnU-Net path so both can be compared and plotted by the same tools::

    {"trainer": str, "dataset": str, "channels": [names],
     "subsets": [{"available": [names], "n_cases": n, "metrics": {region: {"dice": x}}}],
     "mean": {region: {"dice": mean over subsets}}}

Dice follows the BraTS convention for empty regions: 1 when both prediction and reference are empty, 0 when
only one is, so every case counts and the file never holds NaN. The files (JSON, CSV, Markdown, heatmap) are
written by the nnU-Net path's own writer, so ``nnunet-gmd`` reads and compares both kinds of report alike.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from monai.data import decollate_batch
from monai.metrics import compute_dice

from nnunet_gmd.monai.brats import MODALITIES, REGION_KEYS, REGION_NAMES
from nnunet_gmd.monai.data import CASE_KEY, SUBSET_KEY, CaseListError
from nnunet_gmd.report import Report, SubsetResult, write_report
from nnunet_gmd.subsets import all_subsets, subset_name

#: Region order in the report (independent of the network's channel order).
REPORT_REGION_ORDER = ("wt", "tc", "et")


class MissingModalityReport:
    """Evaluator handler collecting per-(subset, case) Dice and writing the report into ``output_dir`` at the end.

    Expects each evaluated item to carry ``subset`` (e.g. ``"t1ce+flair"``) and ``case`` (see
    :func:`nnunet_gmd.monai.data.expand_subsets`), and binary region maps under ``pred``/``label`` in the
    region channel order ``region_keys``.
    """

    def __init__(self, output_dir: str | os.PathLike, trainer: str = "DSUNet+GMD (MONAI bundle)",
                 dataset: str = "", modalities: Sequence[str] = MODALITIES,
                 region_keys: Sequence[str] = REGION_KEYS, pred_key: str = "pred", label_key: str = "label",
                 subset_key: str = SUBSET_KEY, case_key: str = CASE_KEY) -> None:
        self.output_dir = Path(output_dir)
        self.trainer = trainer
        self.dataset = dataset
        self.modalities = list(modalities)
        self.region_keys = list(region_keys)
        self.pred_key, self.label_key = pred_key, label_key
        self.subset_key, self.case_key = subset_key, case_key
        self.scores: dict[str, dict[str, list[float]]] = {}

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def reset(self, engine: Any = None) -> None:
        self.scores = {}

    def collect(self, engine: Any) -> None:
        batch, output = engine.state.batch, engine.state.output
        if isinstance(batch, dict):  # an engine that does not decollate
            batch, output = decollate_batch(batch), decollate_batch(output)
        for item, out in zip(batch, output):
            self.add(str(item[self.subset_key]), str(item[self.case_key]), out[self.pred_key],
                     out[self.label_key] if self.label_key in out else item[self.label_key])

    def add(self, subset: str, case: str, pred: torch.Tensor, label: torch.Tensor) -> list[float]:
        """Score one case under one subset; returns the Dice per region in ``region_keys`` order."""
        if tuple(pred.shape) != tuple(label.shape):
            raise CaseListError(f"case {case!r}, subset {subset!r}: prediction shape {tuple(pred.shape)} differs "
                                f"from the label's {tuple(label.shape)}")
        if pred.shape[0] != len(self.region_keys):
            raise CaseListError(f"case {case!r}: expected {len(self.region_keys)} region channels, got "
                                f"{pred.shape[0]}")
        dice = compute_dice(torch.as_tensor(pred)[None].float(), torch.as_tensor(label)[None].float(),
                            include_background=True, ignore_empty=False)[0]
        values = [float(v) for v in dice]
        self.scores.setdefault(subset, {})[case] = values
        return values

    def report(self) -> Report:
        """The report over the subsets seen so far, in :func:`all_subsets` order."""
        order = [subset_name(s, self.modalities) for s in all_subsets(len(self.modalities))]
        unknown = set(self.scores) - set(order)
        if unknown:
            raise CaseListError(f"unknown subsets in the evaluation: {sorted(unknown)}")
        subsets = []
        for name in (n for n in order if n in self.scores):
            cases = self.scores[name]
            metrics = {}
            for region in REPORT_REGION_ORDER:
                idx = self.region_keys.index(region)
                values = [scores[idx] for scores in cases.values()]
                metrics[REGION_NAMES[region]] = {"dice": sum(values) / len(values)}
            subsets.append(SubsetResult(name.split("+"), metrics, n_cases=len(cases)))
        cases = list(dict.fromkeys(case for per_case in self.scores.values() for case in per_case))
        return Report(trainer=self.trainer, dataset=self.dataset, channels=list(self.modalities), subsets=subsets,
                      regions=[REGION_NAMES[r] for r in REPORT_REGION_ORDER], cases=cases,
                      details={"network": "dynamic sharing"})

    def write(self, engine: Optional[Any] = None) -> Path:
        """Write ``missing_modality_report.{json,csv,md,png}``; returns the JSON's path."""
        if not self.scores:
            raise CaseListError("the evaluation scored no case; nothing to report")
        return write_report(self.report(), self.output_dir)["json"]
