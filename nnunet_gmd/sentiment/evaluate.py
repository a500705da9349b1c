"""Missing-modality evaluation: MMSA metrics for each of the 7 subsets, and an optional random missing-rate curve.

Every prediction goes through the model's ``forward`` with an availability mask, i.e. the real inference path
in which absent branches are switched off. A subset is scored only on the samples that really have all of its
modalities (utterance tables may lack some); a subset no sample has gets NaN metrics.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from nnunet_gmd.sentiment import MODALITIES, SHORT_NAMES  # noqa: E402
from nnunet_gmd.atomic import save_figure, write_json, write_text  # noqa: E402
from nnunet_gmd.sentiment.batching import SplitTensors  # noqa: E402
from nnunet_gmd.sentiment.metrics import METRIC_NAMES, mmsa_regression_metrics  # noqa: E402
from nnunet_gmd.sentiment.model import SentimentModel  # noqa: E402
from nnunet_gmd.subsets import Subset, all_subsets, subset_mask, subset_name  # noqa: E402

SUBSETS: list[Subset] = all_subsets(len(MODALITIES))
MISSING_RATES: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def subset_label(subset: Sequence[int]) -> str:
    """``(0, 2)`` -> ``"LV"``: the short names used in the sentiment literature."""
    return subset_name(subset, SHORT_NAMES, sep="")


@torch.no_grad()
def predict(model: SentimentModel, tensors: SplitTensors, available: Tensor, batch_size: int = 64,
            device: torch.device | str = "cpu") -> np.ndarray:
    """Predictions for the whole split; ``available`` is ``(M,)`` or ``(N, M)`` for the split's N samples."""
    model.eval()
    out = []
    for start in range(0, len(tensors), batch_size):
        index = torch.arange(start, min(start + batch_size, len(tensors)))
        batch, _ = tensors.batch(index)
        mask = available if available.dim() == 1 else available[index]
        out.append(model(batch.to(torch.device(device)), mask).float().cpu())
    return torch.cat(out).numpy()


def subset_rows(tensors: SplitTensors, subset: Sequence[int]) -> Tensor:
    """Indices of the samples that have every modality of ``subset``."""
    return tensors.available[:, list(subset)].all(1).nonzero().squeeze(1)


def empty_metrics() -> dict[str, float]:
    return {k: float("nan") for k in METRIC_NAMES}


def predict_subsets(model: SentimentModel, tensors: SplitTensors, subsets: Sequence[Subset] = SUBSETS,
                    batch_size: int = 64, device: torch.device | str = "cpu") -> dict[str, tuple[Tensor, np.ndarray]]:
    """Per subset: the rows that have it and their predictions from exactly that subset."""
    out = {}
    for s in subsets:
        rows = subset_rows(tensors, s)
        preds = (predict(model, tensors.select(rows), subset_mask(s, len(MODALITIES)), batch_size, device)
                 if rows.numel() else np.zeros(0, dtype=np.float32))
        out[subset_label(s)] = (rows, preds)
    return out


def evaluate_subsets(model: SentimentModel, tensors: SplitTensors, subsets: Sequence[Subset] = SUBSETS,
                     batch_size: int = 64, device: torch.device | str = "cpu") -> dict[str, dict[str, float]]:
    """MMSA metrics per subset, keyed by short name (``L`` ... ``LAV``), over the samples that have the subset."""
    truth = tensors.labels.numpy()
    return {name: mmsa_regression_metrics(preds, truth[rows.numpy()]) if rows.numel() else empty_metrics()
            for name, (rows, preds) in predict_subsets(model, tensors, subsets, batch_size, device).items()}


def subset_counts(tensors: SplitTensors, subsets: Sequence[Subset] = SUBSETS) -> dict[str, int]:
    """How many samples each subset is scored on."""
    return {subset_label(s): int(subset_rows(tensors, s).numel()) for s in subsets}


def random_availability(n: int, num_modalities: int, rate: float, generator: torch.Generator) -> Tensor:
    """Each modality of each sample is missing with probability ``rate``; a sample left with none keeps one
    modality drawn uniformly (a sample with nothing cannot be predicted)."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"missing rate must be in [0, 1), got {rate}")
    mask = torch.rand(n, num_modalities, generator=generator) >= rate
    empty = ~mask.any(1)
    keep = torch.randint(num_modalities, (n,), generator=generator)
    mask[empty, keep[empty]] = True
    return mask


def drop_within(available: Tensor, rate: float, generator: torch.Generator) -> Tensor:
    """Randomly drop each available modality with probability ``rate``; a sample left with none keeps one of its
    own (uniformly drawn), so a genuinely missing modality is never switched back on."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"missing rate must be in [0, 1), got {rate}")
    mask = available & (torch.rand(available.shape, generator=generator) >= rate)
    empty = ~mask.any(1)
    if bool(empty.any()):
        scores = torch.rand(available.shape, generator=generator).masked_fill(~available, -1.0)
        keep = scores.argmax(1)
        mask[empty, keep[empty]] = True
    return mask


def missing_rate_curve(model: SentimentModel, tensors: SplitTensors, rates: Sequence[float] = MISSING_RATES,
                       seed: int = 0, batch_size: int = 64, device: torch.device | str = "cpu") -> list[dict]:
    """MMSA metrics under random per-sample missingness at each rate (one seeded draw per rate)."""
    truth = tensors.labels.numpy()
    curve = []
    for rate in rates:
        generator = torch.Generator().manual_seed(seed)
        if bool(tensors.available.all()):
            mask = random_availability(len(tensors), len(MODALITIES), rate, generator)
        else:  # genuinely missing modalities stay missing
            mask = drop_within(tensors.available, rate, generator)
        metrics = mmsa_regression_metrics(predict(model, tensors, mask, batch_size, device), truth)
        curve.append({"missing_rate": float(rate), "available_fraction": float(mask.float().mean()), **metrics})
    return curve


# ---------------------------------------------------------------------------- reports
def _fmt(value: float) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.4f}"


def metrics_markdown(metrics: dict[str, dict[str, float]], title: str,
                     counts: Optional[dict[str, int]] = None) -> str:
    lines = [f"# {title}", "", "| subset | " + ("N | " if counts else "") + " | ".join(METRIC_NAMES) + " |",
             "|---|" + ("---:|" if counts else "") + "---:|" * len(METRIC_NAMES)]
    for name, row in metrics.items():
        n = f"{counts[name]} | " if counts else ""
        lines.append(f"| {name} | {n}" + " | ".join(_fmt(row[k]) for k in METRIC_NAMES) + " |")
    lines += ["", "L = text, A = audio, V = vision. Metrics as defined by MMSA; values rounded to 4 decimals here, "
              "unrounded in metrics.json.", ""]
    return "\n".join(lines)


def metrics_figure(metrics: dict[str, dict[str, float]], title: str) -> plt.Figure:
    """One small bar chart per metric, subsets on the x axis (metrics have different scales)."""
    names = list(metrics)
    fig, axes = plt.subplots(2, 4, figsize=(16, 6.5))
    for ax, key in zip(axes.flat, METRIC_NAMES):
        values = [metrics[n][key] if metrics[n][key] is not None else np.nan for n in names]
        ax.bar(names, values, color=["#4C72B0" if len(n) == 1 else "#55A868" if len(n) == 2 else "#C44E52"
                                      for n in names])
        ax.set_title(key)
        ax.grid(axis="y", alpha=0.3)
        if key not in ("MAE", "Corr"):
            ax.set_ylim(0, 1)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def curve_figure(curve: list[dict], title: str) -> plt.Figure:
    rates = [c["missing_rate"] for c in curve]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key in zip(axes, ("MAE", "Non0_acc_2", "Corr")):
        ax.plot(rates, [np.nan if c[key] is None else c[key] for c in curve], marker="o")
        ax.set_xlabel("per-sample missing rate")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def write_reports(out_dir: str | Path, metrics: dict[str, dict[str, float]], title: str,
                  curve: Optional[list[dict]] = None, counts: Optional[dict[str, int]] = None) -> list[Path]:
    """metrics.json (keyed by subset), metrics.md, metrics.png and, with a curve, missing_rate_curve.json/.png.

    ``counts`` (samples scored per subset) adds an N column to the table; it matters when modalities are missing.
    """
    out = Path(out_dir)
    written = [out / "metrics.json", out / "metrics.md", out / "metrics.png"]
    write_json(written[0], metrics)
    write_text(written[1], metrics_markdown(metrics, title, counts))
    fig = metrics_figure(metrics, title)
    save_figure(fig, written[2])
    plt.close(fig)
    if curve is not None:
        written += [out / "missing_rate_curve.json", out / "missing_rate_curve.png"]
        write_json(written[3], curve)
        fig = curve_figure(curve, f"{title}: random missing modalities")
        save_figure(fig, written[4])
        plt.close(fig)
    return written
