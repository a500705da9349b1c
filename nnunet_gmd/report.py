"""Missing-modality robustness reports (``missing_modality_report.json``), the one format both integrations write:
JSON, CSV, Markdown and a heatmap, and side-by-side comparison.

One format for every trainer (GMD, DS, stock nnU-Net with zero-filled channels), so methods are compared on the
same footing. Every file is written atomically: readers never see half a report.
"""
from __future__ import annotations

import csv
import io
import json
import math
import warnings
from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from nnunet_gmd.errors import UserError  # noqa: E402
from nnunet_gmd.atomic import atomic_write, write_json, write_text  # noqa: E402

REPORT_JSON = "missing_modality_report.json"
REPORT_CSV = "missing_modality_report.csv"
REPORT_MD = "missing_modality_report.md"
REPORT_PNG = "missing_modality_report.png"
_REQUIRED = ("trainer", "dataset", "channels", "subsets", "mean")


# ---------------------------------------------------------------------------------------------- helpers
def _value(x: Optional[float]) -> float:
    return float("nan") if x is None else float(x)


def _fmt(x: Optional[float], digits: int = 3) -> str:
    x = _value(x)
    return "n/a" if math.isnan(x) else f"{x:.{digits}f}"


def subset_label(entry: dict) -> str:
    return "+".join(entry["available"])


def regions_of(report: dict) -> list[str]:
    return list(report.get("regions") or (report["subsets"][0]["metrics"].keys() if report["subsets"] else []))


def metrics_of(report: dict) -> list[str]:
    """Metrics present in the report, Dice first (HD95 only when evaluate computed it)."""
    found: list[str] = []
    for entry in report["subsets"]:
        for block in entry["metrics"].values():
            found += [m for m in block if m not in found]
    return sorted(found, key=lambda m: (m != "dice", m))


def mean_dice(entry: dict) -> float:
    """Dice averaged over the regions of one subset (NaN regions skipped)."""
    values = [_value(b.get("dice")) for b in entry["metrics"].values()]
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def _mean_of_means(report: dict) -> float:
    values = [v for v in (mean_dice(e) for e in report["subsets"]) if not math.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def dice_matrix(report: dict) -> np.ndarray:
    """Subsets x regions Dice matrix (NaN where undefined)."""
    regions = regions_of(report)
    return np.array([[_value(e["metrics"].get(r, {}).get("dice")) for r in regions] for e in report["subsets"]],
                    dtype=float).reshape(len(report["subsets"]), len(regions))


# ---------------------------------------------------------------------------------------------- one report
def to_csv(report: dict) -> str:
    """One row per subset: each region's metrics and the mean Dice over regions; last row: mean over subsets."""
    regions, metrics = regions_of(report), metrics_of(report)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["available", "n_channels"] + [f"{r} {m}" for m in metrics for r in regions] + ["mean dice"])
    for e in report["subsets"]:
        w.writerow([subset_label(e), len(e["available"])]
                   + [_csv_num(e["metrics"].get(r, {}).get(m)) for m in metrics for r in regions]
                   + [_csv_num(mean_dice(e))])
    mean = report["mean"]
    w.writerow(["mean over subsets", ""] + [_csv_num(mean.get(r, {}).get(m)) for m in metrics for r in regions]
               + [_csv_num(_mean_of_means(report))])
    return buf.getvalue()


def _csv_num(x: Optional[float]) -> str:
    x = _value(x)
    return "" if math.isnan(x) else f"{x:.6g}"


def to_markdown(report: dict) -> str:
    regions, metrics = regions_of(report), metrics_of(report)
    lines = [f"# Missing-modality robustness: {report['trainer']} on {report['dataset']}", ""]
    details = [f"channels: {', '.join(report['channels'])}"]
    for key in ("configuration", "fold", "network"):
        if key in report:
            details.append(f"{key}: {report[key]}")
    if "cases" in report:
        details.append(f"{len(report['cases'])} validation case(s)")
    lines += ["; ".join(details), ""]
    for m in metrics:
        title = {"dice": "Dice (higher is better)", "hd95": "HD95 in mm (lower is better)"}.get(m, m)
        lines += [f"## {title}", ""]
        head = ["available"] + regions + (["mean"] if m == "dice" else [])
        lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
        for e in report["subsets"]:
            row = [subset_label(e)] + [_fmt(e["metrics"].get(r, {}).get(m), 3 if m == "dice" else 2)
                                       for r in regions]
            if m == "dice":
                row.append(_fmt(mean_dice(e)))
            lines.append("| " + " | ".join(row) + " |")
        mean_row = ["**mean over subsets**"] + [_fmt(report["mean"].get(r, {}).get(m), 3 if m == "dice" else 2)
                                                for r in regions]
        if m == "dice":
            mean_row.append(_fmt(_mean_of_means(report)))
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
    atomic_write(path, lambda p: fig.savefig(p, dpi=120, bbox_inches="tight", format="png"))
    plt.close(fig)


def plot_heatmap(report: dict, path: Path) -> None:
    """Subsets x regions Dice, with the mean over regions as the last column."""
    matrix = dice_matrix(report)
    means = np.array([[mean_dice(e)] for e in report["subsets"]])
    full = np.hstack([matrix, means]) if len(report["subsets"]) else matrix
    rows = [subset_label(e) for e in report["subsets"]]
    fig, ax = plt.subplots(figsize=(1.2 * full.shape[1] + 2.5, 0.32 * len(rows) + 1.6))
    im = _heatmap(ax, full, rows, regions_of(report) + ["mean"], f"Dice: {report['trainer']} ({report['dataset']})")
    fig.colorbar(im, ax=ax, fraction=0.05)
    _save_figure(fig, path)


def write_report(report: dict, out_dir: Path) -> dict[str, Path]:
    """Write the JSON, CSV, Markdown and PNG forms of a report into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    paths = {"json": out_dir / REPORT_JSON, "csv": out_dir / REPORT_CSV, "markdown": out_dir / REPORT_MD,
             "heatmap": out_dir / REPORT_PNG}
    write_json(paths["json"], report)   # strict JSON: NaN becomes null there
    write_text(paths["csv"], to_csv(report))
    write_text(paths["markdown"], to_markdown(report))
    plot_heatmap(report, paths["heatmap"])
    return paths


def load_report(path: Path) -> dict:
    """Read a report written by ``nnunet-gmd evaluate``, with a clear error for anything else."""
    path = Path(path)
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(report, dict) or any(k not in report for k in _REQUIRED):
        raise UserError(f"{path} is not a missing-modality report (needs keys {', '.join(_REQUIRED)})")
    for e in report["subsets"]:
        if not isinstance(e, dict) or "available" not in e or "metrics" not in e:
            raise UserError(f"{path}: every subset entry needs 'available' and 'metrics'")
    return report


# ---------------------------------------------------------------------------------------------- comparison
def comparison_labels(reports: Sequence[dict], paths: Sequence[Path]) -> list[str]:
    """Trainer names, made unique with the report's folder name where two reports share a trainer."""
    trainers = [r["trainer"] for r in reports]
    labels = [f"{t} ({Path(p).resolve().parent.name})" if trainers.count(t) > 1 else t
              for t, p in zip(trainers, paths)]
    return [f"{label} #{i + 1}" if labels.count(label) > 1 else label  # same folder name too: number them
            for i, label in enumerate(labels)]


def check_comparable(reports: Sequence[dict], paths: Sequence[Path]) -> None:
    first = reports[0]
    for r, p in zip(reports[1:], paths[1:]):
        if [c.lower() for c in r["channels"]] != [c.lower() for c in first["channels"]]:
            raise UserError(f"{p} has channels {', '.join(r['channels'])}, but {paths[0]} has "
                            f"{', '.join(first['channels'])}; only reports on the same channels compare")
        if regions_of(r) != regions_of(first):
            raise UserError(f"{p} scores {', '.join(regions_of(r))}, but {paths[0]} scores "
                            f"{', '.join(regions_of(first))}")


def comparison_rows(reports: Sequence[dict], region: Optional[str] = None) -> tuple[list[str], np.ndarray]:
    """Subsets (union, in the first report's order) x reports: Dice of ``region``, or mean Dice over regions."""
    order: list[str] = []
    for r in reports:
        order += [subset_label(e) for e in r["subsets"] if subset_label(e) not in order]
    table = np.full((len(order), len(reports)), np.nan)
    for j, r in enumerate(reports):
        for e in r["subsets"]:
            i = order.index(subset_label(e))
            table[i, j] = mean_dice(e) if region is None else _value(e["metrics"].get(region, {}).get("dice"))
    return order, table


def compare_table(reports: Sequence[dict], labels: Sequence[str], region: Optional[str] = None) -> str:
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


def plot_comparison(reports: Sequence[dict], labels: Sequence[str], path: Path) -> None:
    """One subsets x regions Dice heatmap per report, side by side on one colour scale."""
    rows, _ = comparison_rows(reports)
    regions = regions_of(reports[0])
    fig, axes = plt.subplots(1, len(reports), figsize=(1.3 * (len(regions) + 1) * len(reports) + 3,
                                                       0.32 * len(rows) + 1.8), squeeze=False)
    im = None
    for j, (r, label) in enumerate(zip(reports, labels)):
        by_name = {subset_label(e): e for e in r["subsets"]}
        matrix = np.full((len(rows), len(regions) + 1), np.nan)
        for i, name in enumerate(rows):
            if name in by_name:
                e = by_name[name]
                matrix[i, :-1] = [_value(e["metrics"].get(reg, {}).get("dice")) for reg in regions]
                matrix[i, -1] = mean_dice(e)
        im = _heatmap(axes[0, j], matrix, rows, regions + ["mean"], label, show_rows=(j == 0))
    fig.colorbar(im, ax=list(axes[0]), fraction=0.03, label="Dice")
    _save_figure(fig, path)
