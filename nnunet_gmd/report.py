"""Missing-modality robustness reports (``missing_modality_report.json``): the :class:`Report` type that both
integrations produce, its JSON, CSV, Markdown and heatmap forms, and side-by-side comparison.

One format for every trainer (GMD, DS, stock nnU-Net with zero-filled channels), so methods are compared on the
same footing. Every file is written atomically: readers never see half a report.
"""
from __future__ import annotations

import csv
import io
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from nnunet_gmd.errors import UserError  # noqa: E402
from nnunet_gmd.atomic import save_figure, write_json, write_text  # noqa: E402

REPORT_JSON = "missing_modality_report.json"
REPORT_CSV = "missing_modality_report.csv"
REPORT_MD = "missing_modality_report.md"
REPORT_PNG = "missing_modality_report.png"
_REQUIRED = ("trainer", "dataset", "channels", "subsets", "mean")


# ---------------------------------------------------------------------------------------------- the type
Metrics = dict[str, dict[str, Optional[float]]]   # region -> metric ("dice", "hd95", ...) -> value; None: undefined
_KNOWN_KEYS = ("trainer", "dataset", "channels", "regions", "cases", "subsets", "mean")


@dataclass
class SubsetResult:
    """The scores under one modality subset: per region and metric, averaged over ``n_cases`` cases."""

    available: list[str]
    metrics: Metrics
    n_cases: Optional[int] = None   # None only in reports written before nnunet-gmd counted cases

    @property
    def label(self) -> str:
        return "+".join(self.available)

    def mean_dice(self) -> float:
        """Dice averaged over the regions (NaN regions skipped; NaN when none is defined)."""
        values = [v for v in (_value(b.get("dice")) for b in self.metrics.values()) if not math.isnan(v)]
        return float(np.mean(values)) if values else float("nan")


@dataclass
class Report:
    """A missing-modality robustness report, what ``missing_modality_report.json`` holds.

    Both integrations produce it (``nnunet-gmd evaluate`` and the MONAI bundle's evaluator), so every reader,
    comparison and plot works on either. ``mean`` defaults to the mean over subsets (NaN-aware), the paper's
    headline figure. ``details`` carries the producer's provenance (configuration, plans, fold, checkpoint,
    network) as it is written to the JSON.
    """

    trainer: str
    dataset: str
    channels: list[str]
    subsets: list[SubsetResult]
    regions: list[str] = field(default_factory=list)
    cases: list[str] = field(default_factory=list)
    mean: Optional[Metrics] = None
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.regions:
            self.regions = list(self.subsets[0].metrics) if self.subsets else []
        if self.mean is None:
            self.mean = mean_over_subsets(self.subsets)
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self, source: str = "report") -> None:
        """Raise :class:`UserError` naming ``source`` and the first problem found."""
        def fail(problem: str) -> None:
            raise UserError(f"{source}: {problem}")

        if not isinstance(self.trainer, str) or not isinstance(self.dataset, str):
            fail("'trainer' and 'dataset' must be strings")
        if not self.channels or not all(isinstance(c, str) for c in self.channels):
            fail("'channels' must be a non-empty list of names")
        known = {c.lower() for c in self.channels}
        seen: set[tuple[str, ...]] = set()
        for entry in self.subsets:
            name = entry.label or "(empty)"
            if not entry.available or any(not isinstance(c, str) or c.lower() not in known for c in entry.available):
                fail(f"subset {name} names sequences that are not among the channels {', '.join(self.channels)}")
            key = tuple(c.lower() for c in entry.available)
            if key in seen:
                fail(f"subset {name} appears twice")
            seen.add(key)
            if entry.n_cases is not None and (not isinstance(entry.n_cases, int) or entry.n_cases < 0):
                fail(f"subset {name}: n_cases must be a count, got {entry.n_cases!r}")
            unknown = [r for r in entry.metrics if r not in self.regions]
            if unknown:
                fail(f"subset {name} scores {unknown[0]!r}, which is not among the regions {', '.join(self.regions)}")
            for region, block in entry.metrics.items():
                if not isinstance(block, dict):
                    fail(f"subset {name}, {region}: metrics must be a mapping such as {{'dice': 0.8}}")
                for metric, value in block.items():
                    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                        fail(f"subset {name}, {region} {metric}: {value!r} is not a number")
                    if metric == "dice" and value is not None and not (0.0 <= value <= 1.0 or math.isnan(value)):
                        fail(f"subset {name}, {region}: Dice {value} is outside [0, 1]")

    # ------------------------------------------------------------------ JSON form
    @classmethod
    def from_dict(cls, data: Any, source: str = "report") -> "Report":
        if not isinstance(data, dict) or any(k not in data for k in _REQUIRED):
            raise UserError(f"{source} is not a missing-modality report (needs keys {', '.join(_REQUIRED)})")
        entries = data["subsets"]
        if not isinstance(entries, list) or any(not isinstance(e, dict) or "available" not in e
                                                or "metrics" not in e for e in entries):
            raise UserError(f"{source}: every subset entry needs 'available' and 'metrics'")
        subsets = [SubsetResult([str(c) for c in e["available"]] if isinstance(e["available"], list) else [],
                                e["metrics"] if isinstance(e["metrics"], dict) else {}, e.get("n_cases"))
                   for e in entries]
        try:
            return cls(trainer=data["trainer"], dataset=data["dataset"], channels=list(data["channels"]),
                       subsets=subsets, regions=list(data.get("regions") or []),
                       cases=[str(c) for c in data.get("cases") or []], mean=data["mean"],
                       details={k: v for k, v in data.items() if k not in _KNOWN_KEYS})
        except UserError as e:
            raise UserError(str(e).replace("report:", f"{source}:", 1)) from None

    def to_dict(self) -> dict:
        """The JSON layout of ``missing_modality_report.json`` (unchanged since the first release)."""
        out: dict[str, Any] = {"trainer": self.trainer, "dataset": self.dataset, **self.details,
                               "channels": list(self.channels), "regions": list(self.regions)}
        if self.cases:
            out["cases"] = list(self.cases)
        out["subsets"] = [{"available": list(e.available), **({} if e.n_cases is None else {"n_cases": e.n_cases}),
                           "metrics": e.metrics} for e in self.subsets]
        out["mean"] = self.mean
        return out

    @classmethod
    def from_json(cls, path: Path) -> "Report":
        """Read a report, with a one-line error naming the file for anything that is not one."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"{path} does not exist") from None
        except IsADirectoryError:
            raise UserError(f"{path} is a folder, not a report file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path} is not valid JSON ({e})") from None
        return cls.from_dict(data, source=str(path))

    def to_json(self, path: Path) -> Path:
        """Write the strict-JSON form atomically (NaN becomes null)."""
        write_json(Path(path), self.to_dict())
        return Path(path)

    # ------------------------------------------------------------------ views
    def subset(self, available: Sequence[str]) -> Optional[SubsetResult]:
        wanted = [c.lower() for c in available]
        return next((e for e in self.subsets if [c.lower() for c in e.available] == wanted), None)

    @property
    def full_set(self) -> Optional[SubsetResult]:
        return self.subset(self.channels)

    def metric_names(self) -> list[str]:
        """Metrics present in the report, Dice first (HD95 only when evaluate computed it)."""
        found: list[str] = []
        for entry in self.subsets:
            for block in entry.metrics.values():
                found += [m for m in block if m not in found]
        return sorted(found, key=lambda m: (m != "dice", m))

    def dice_matrix(self) -> np.ndarray:
        """Subsets x regions Dice matrix (NaN where undefined)."""
        return np.array([[_value(e.metrics.get(r, {}).get("dice")) for r in self.regions] for e in self.subsets],
                        dtype=float).reshape(len(self.subsets), len(self.regions))

    def mean_of_means(self) -> float:
        """Mean over subsets of the mean Dice over regions (NaN subsets skipped)."""
        values = [v for v in (e.mean_dice() for e in self.subsets) if not math.isnan(v)]
        return float(np.mean(values)) if values else float("nan")


def mean_over_subsets(subsets: Sequence[SubsetResult]) -> Metrics:
    """Per region and metric, the mean over subsets (NaN-aware), as the paper averages over all 15 subsets."""
    collected: dict[str, dict[str, list[float]]] = {}
    for entry in subsets:
        for region, block in entry.metrics.items():
            for metric, value in block.items():
                if metric != "n_cases":
                    collected.setdefault(region, {}).setdefault(metric, []).append(_value(value))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a region without any value stays NaN
        return {r: {m: float(np.nanmean(v)) for m, v in ms.items()} for r, ms in collected.items()}


def _value(x: Optional[float]) -> float:
    return float("nan") if x is None else float(x)


def _fmt(x: Optional[float], digits: int = 3) -> str:
    x = _value(x)
    return "n/a" if math.isnan(x) else f"{x:.{digits}f}"


# ---------------------------------------------------------------------------------------------- one report
def to_csv(report: Report) -> str:
    """One row per subset: each region's metrics and the mean Dice over regions; last row: mean over subsets."""
    regions, metrics = report.regions, report.metric_names()
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["available", "n_channels", "n_cases"] + [f"{r} {m}" for m in metrics for r in regions]
               + ["mean dice"])
    for e in report.subsets:
        w.writerow([e.label, len(e.available), "" if e.n_cases is None else e.n_cases]
                   + [_csv_num(e.metrics.get(r, {}).get(m)) for m in metrics for r in regions]
                   + [_csv_num(e.mean_dice())])
    w.writerow(["mean over subsets", "", ""]
               + [_csv_num(report.mean.get(r, {}).get(m)) for m in metrics for r in regions]
               + [_csv_num(report.mean_of_means())])
    return buf.getvalue()


def _csv_num(x: Optional[float]) -> str:
    x = _value(x)
    return "" if math.isnan(x) else f"{x:.6g}"


def to_markdown(report: Report) -> str:
    regions, metrics = report.regions, report.metric_names()
    lines = [f"# Missing-modality robustness: {report.trainer} on {report.dataset}", ""]
    details = [f"channels: {', '.join(report.channels)}"]
    for key in ("configuration", "fold", "network"):
        if key in report.details:
            details.append(f"{key}: {report.details[key]}")
    if report.cases:
        details.append(f"{len(report.cases)} validation case(s)")
    lines += ["; ".join(details), ""]
    with_counts = any(e.n_cases is not None for e in report.subsets)
    for m in metrics:
        title = {"dice": "Dice (higher is better)", "hd95": "HD95 in mm (lower is better)"}.get(m, m)
        lines += [f"## {title}", ""]
        head = ["available"] + (["cases"] if with_counts else []) + regions + (["mean"] if m == "dice" else [])
        lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
        for e in report.subsets:
            row = [e.label] + ([str(e.n_cases) if e.n_cases is not None else "n/a"] if with_counts else [])
            row += [_fmt(e.metrics.get(r, {}).get(m), 3 if m == "dice" else 2) for r in regions]
            if m == "dice":
                row.append(_fmt(e.mean_dice()))
            lines.append("| " + " | ".join(row) + " |")
        mean_row = ["**mean over subsets**"] + ([""] if with_counts else [])
        mean_row += [_fmt(report.mean.get(r, {}).get(m), 3 if m == "dice" else 2) for r in regions]
        if m == "dice":
            mean_row.append(_fmt(report.mean_of_means()))
        lines += ["| " + " | ".join(mean_row) + " |", ""]
    return "\n".join(lines)


def _heatmap(ax, matrix: np.ndarray, rows: Sequence[str], cols: Sequence[str], title: str,
             show_rows: bool = True):
    im = ax.imshow(np.ma.masked_invalid(matrix), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows if show_rows else [""] * len(rows))
    ax.set_title(title, fontsize=10)
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            v = matrix[i, j]
            ax.text(j, i, "n/a" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if np.isnan(v) or v < 0.6 else "black")
    return im


def _save_figure(fig, path: Path) -> None:
    save_figure(fig, path, dpi=120, bbox_inches="tight")   # the project's one atomic writer
    plt.close(fig)


def plot_heatmap(report: Report, path: Path) -> None:
    """Subsets x regions Dice, with the mean over regions as the last column."""
    matrix = report.dice_matrix()
    means = np.array([[e.mean_dice()] for e in report.subsets])
    full = np.hstack([matrix, means]) if report.subsets else matrix
    rows = [e.label for e in report.subsets]
    fig, ax = plt.subplots(figsize=(1.2 * full.shape[1] + 2.5, 0.32 * len(rows) + 1.6))
    im = _heatmap(ax, full, rows, report.regions + ["mean"], f"Dice: {report.trainer} ({report.dataset})")
    fig.colorbar(im, ax=ax, fraction=0.05)
    _save_figure(fig, path)


def write_report(report: Report, out_dir: Path) -> dict[str, Path]:
    """Write the JSON, CSV, Markdown and PNG forms of a report into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    paths = {"json": out_dir / REPORT_JSON, "csv": out_dir / REPORT_CSV, "markdown": out_dir / REPORT_MD,
             "heatmap": out_dir / REPORT_PNG}
    report.to_json(paths["json"])
    write_text(paths["csv"], to_csv(report))
    write_text(paths["markdown"], to_markdown(report))
    plot_heatmap(report, paths["heatmap"])
    return paths


def load_report(path: Path) -> Report:
    """Read a report written by ``nnunet-gmd evaluate`` or the MONAI bundle, with a clear error for anything else."""
    return Report.from_json(path)


# ---------------------------------------------------------------------------------------------- comparison
def comparison_labels(reports: Sequence[Report], paths: Sequence[Path]) -> list[str]:
    """Trainer names, made unique with the report's folder name where two reports share a trainer."""
    trainers = [r.trainer for r in reports]
    labels = [f"{t} ({Path(p).resolve().parent.name})" if trainers.count(t) > 1 else t
              for t, p in zip(trainers, paths)]
    return [f"{label} #{i + 1}" if labels.count(label) > 1 else label  # same folder name too: number them
            for i, label in enumerate(labels)]


def check_comparable(reports: Sequence[Report], paths: Sequence[Path]) -> None:
    first = reports[0]
    for r, p in zip(reports[1:], paths[1:]):
        if [c.lower() for c in r.channels] != [c.lower() for c in first.channels]:
            raise UserError(f"{p} has channels {', '.join(r.channels)}, but {paths[0]} has "
                            f"{', '.join(first.channels)}; only reports on the same channels compare")
        if r.regions != first.regions:
            raise UserError(f"{p} scores {', '.join(r.regions)}, but {paths[0]} scores {', '.join(first.regions)}")


def comparison_rows(reports: Sequence[Report], region: Optional[str] = None) -> tuple[list[str], np.ndarray]:
    """Subsets (union, in the first report's order) x reports: Dice of ``region``, or mean Dice over regions."""
    order: list[str] = []
    for r in reports:
        order += [e.label for e in r.subsets if e.label not in order]
    table = np.full((len(order), len(reports)), np.nan)
    for j, r in enumerate(reports):
        for e in r.subsets:
            i = order.index(e.label)
            table[i, j] = e.mean_dice() if region is None else _value(e.metrics.get(region, {}).get("dice"))
    return order, table


def compare_table(reports: Sequence[Report], labels: Sequence[str], region: Optional[str] = None) -> str:
    """Markdown table: one row per subset, one column per report, plus the mean over subsets."""
    rows, table = comparison_rows(reports, region)
    what = f"{region} Dice" if region else "Dice, mean over regions"
    lines = [f"{what} per available subset", "",
             "| available | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for name, values in zip(rows, table):
        best = np.nanmax(values) if not np.all(np.isnan(values)) else np.nan
        cells = [(f"**{_fmt(v)}**" if len(labels) > 1 and v == best else _fmt(v)) for v in values]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a column without any value stays NaN
        means = np.nanmean(table, axis=0)
    lines.append("| **mean over subsets** | " + " | ".join(_fmt(v) for v in means) + " |")
    return "\n".join(lines) + "\n"


def plot_comparison(reports: Sequence[Report], labels: Sequence[str], path: Path) -> None:
    """One subsets x regions Dice heatmap per report, side by side on one colour scale."""
    rows, _ = comparison_rows(reports)
    regions = reports[0].regions
    fig, axes = plt.subplots(1, len(reports), figsize=(1.3 * (len(regions) + 1) * len(reports) + 3,
                                                       0.32 * len(rows) + 1.8), squeeze=False)
    im = None
    for j, (r, label) in enumerate(zip(reports, labels)):
        by_name = {e.label: e for e in r.subsets}
        matrix = np.full((len(rows), len(regions) + 1), np.nan)
        for i, name in enumerate(rows):
            if name in by_name:
                e = by_name[name]
                matrix[i, :-1] = [_value(e.metrics.get(reg, {}).get("dice")) for reg in regions]
                matrix[i, -1] = e.mean_dice()
        im = _heatmap(axes[0, j], matrix, rows, regions + ["mean"], label, show_rows=(j == 0))
    fig.colorbar(im, ax=list(axes[0]), fraction=0.03, label="Dice")
    _save_figure(fig, path)
