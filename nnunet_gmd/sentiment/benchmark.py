"""``sentiment benchmark``: GMD against its baselines under one budget, scored on unseen videos for all 7 subsets.

Either one ``--train`` / ``--test`` pair of table folders, or video-level K-fold cross-validation over one folder
(``--cv K``; every video is tested exactly once, by a model that never saw it). For every seed, method and
fold, the model is selected on whole validation videos drawn (seeded) from the training part only; the test
videos are never looked at before the final prediction. Out-of-fold predictions are pooled over the folds,
so each seed gives one set of MMSA metrics per subset; the tables show mean and spread over seeds, and the
GMD-vs-baseline differences a 95% bootstrap interval over videos.

References without training noise are reported beside the methods: predicting the training mean, and a ridge
regression on each single modality (penalty chosen on the same validation videos).
"""
from __future__ import annotations

import copy
import csv
import io
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.linear_model import Ridge  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from nnunet_gmd.sentiment import MODALITIES, SHORT_NAMES  # noqa: E402
from nnunet_gmd.atomic import save_figure, write_json, write_text  # noqa: E402
from nnunet_gmd.sentiment.batching import SplitTensors  # noqa: E402
from nnunet_gmd.sentiment.evaluate import SUBSETS, predict_subsets, subset_label  # noqa: E402
from nnunet_gmd.sentiment.metrics import METRIC_NAMES, mmsa_regression_metrics  # noqa: E402
from nnunet_gmd.sentiment.model import SentimentModel  # noqa: E402
from nnunet_gmd.sentiment.tables import (UtteranceTable, default_valid_videos, pick_valid_videos,  # noqa: E402
                                         split_by_videos)
from nnunet_gmd.sentiment.train import Trainer, TrainConfig, make_model  # noqa: E402

SUBSET_NAMES: list[str] = [subset_label(s) for s in SUBSETS]
# name -> (TrainConfig overrides, label in reports); gmd_k's k is filled in from BenchmarkConfig.gmd_k
METHODS: dict[str, tuple[dict[str, Any], str]] = {
    "gmd": ({"method": "gmd"}, "GMD (all 7 subsets)"),
    "gmd_k": ({"method": "gmd"}, "GMD, k subsets per step"),
    "ds": ({"method": "ds"}, "DS (mean of subset losses)"),
    "late_full": ({"method": "full"}, "late-fusion DS, full set only"),
    "early": ({"method": "early"}, "early fusion, zero-filled"),
    "early_dropout": ({"method": "early_dropout"}, "early fusion + modality dropout"),
}
RIDGE_ALPHAS: tuple[float, ...] = (0.1, 1.0, 10.0, 100.0, 1000.0)
BOOTSTRAP_SAMPLES = 2000


@dataclass(frozen=True)
class BenchmarkConfig:
    base: TrainConfig  # epochs, batch size, lr, width... shared by every method (one budget)
    seeds: int = 3
    methods: tuple[str, ...] = tuple(METHODS)
    gmd_k: int = 3
    valid_videos: Optional[int] = None  # None: 15% of the training videos

    def method_config(self, name: str, seed: int) -> TrainConfig:
        overrides = dict(METHODS[name][0])
        if name == "gmd_k":
            overrides["subsets_per_step"] = self.gmd_k
        return replace(self.base, seed=seed, **overrides)

    def label(self, name: str) -> str:
        return METHODS[name][1].replace("k subsets", f"k={self.gmd_k} subsets")


@dataclass
class Fold:
    train: UtteranceTable
    test: UtteranceTable


@dataclass
class BenchmarkResult:
    settings: dict[str, Any]
    truth: np.ndarray  # (N,) labels of all test utterances, folds concatenated
    available: np.ndarray  # (N, M)
    videos: list[str]  # (N,) video of each test utterance
    predictions: dict[str, list[dict[str, np.ndarray]]]  # method -> per seed -> subset -> (N,) (NaN: not scored)
    references: dict[str, dict[str, np.ndarray]]  # reference -> subset -> (N,)
    histories: dict[str, list[list[dict]]] = field(default_factory=dict)  # method -> per run -> history
    seconds: dict[str, float] = field(default_factory=dict)


def fit(data, config: TrainConfig, device: torch.device, on_epoch=None) -> tuple[SentimentModel, list[dict], int]:
    """Train ``config.epochs`` epochs and return the model at its best validation epoch (kept in memory)."""
    model = make_model(config, data.feature_dims)
    trainer = Trainer(model, SplitTensors(data.splits["train"]), SplitTensors(data.splits["valid"]), config, device)
    history: list[dict] = []
    best_epoch, best_score, best_state = 0, float("inf"), None
    for epoch in range(1, config.epochs + 1):
        entry = trainer.epoch(epoch)
        history.append(entry)
        if best_state is None or entry["valid_score"] < best_score:
            best_epoch, best_score = epoch, entry["valid_score"]
            best_state = copy.deepcopy(model.state_dict())
        if on_epoch is not None:
            on_epoch(entry)
    model.load_state_dict(best_state)
    return model, history, best_epoch


def run_benchmark(folds: Sequence[Fold], config: BenchmarkConfig, device: torch.device | str = "cpu",
                  progress: bool = True) -> BenchmarkResult:
    device = torch.device(device)
    offsets = np.cumsum([0] + [len(f.test) for f in folds])
    truth = np.concatenate([f.test.labels for f in folds]).astype(np.float64)
    available = np.concatenate([f.test.available for f in folds])
    videos = [v for f in folds for v in f.test.video_ids]
    n = len(truth)
    valid_k = [config.valid_videos or default_valid_videos(f.train) for f in folds]
    runs = config.seeds * len(config.methods) * len(folds)
    bar = tqdm(total=runs * config.base.epochs, disable=not progress, desc="sentiment benchmark", unit="epoch",
               dynamic_ncols=True)
    predictions: dict[str, list[dict[str, np.ndarray]]] = {m: [] for m in config.methods}
    histories: dict[str, list[list[dict]]] = {m: [] for m in config.methods}
    seconds: dict[str, float] = {m: 0.0 for m in config.methods}
    try:
        for seed in range(config.seeds):
            for name in config.methods:
                pooled = {s: np.full(n, np.nan) for s in SUBSET_NAMES}
                for f, fold in enumerate(folds):
                    bar.set_postfix(seed=seed, method=name, fold=f)
                    started = time.time()
                    data = split_by_videos(fold.train, pick_valid_videos(fold.train, valid_k[f], seed))
                    model, history, _ = fit(data, config.method_config(name, seed), device,
                                            on_epoch=lambda _entry: bar.update(1))
                    tensors = SplitTensors(fold.test.to_split())
                    for subset, (rows, preds) in predict_subsets(model, tensors, device=device).items():
                        pooled[subset][offsets[f] + rows.numpy()] = preds
                    seconds[name] += time.time() - started
                    histories[name].append(history)
                predictions[name].append(pooled)
    finally:
        bar.close()
    references = _references(folds, valid_k, n, offsets)
    settings = {"train_config": {k: v for k, v in asdict(config.base).items() if k not in ("method", "seed")},
                "seeds": config.seeds, "methods": list(config.methods), "gmd_k": config.gmd_k,
                "valid_videos_per_fold": valid_k, "folds": [sorted(set(f.test.video_ids)) for f in folds],
                "train_videos_per_fold": [len(f.train.videos) for f in folds]}
    return BenchmarkResult(settings, truth, available, videos, predictions, references, histories, seconds)


# ---------------------------------------------------------------------------- references without training noise
def _references(folds: Sequence[Fold], valid_k: list[int], n: int, offsets: np.ndarray) -> dict[str, dict]:
    """Training-mean prediction (all subsets) and per-modality ridge (alpha picked on seed-0 validation videos)."""
    mean_pred = np.full(n, np.nan)
    ridge = {m: np.full(n, np.nan) for m in SHORT_NAMES}
    for f, fold in enumerate(folds):
        rows = slice(offsets[f], offsets[f + 1])
        mean_pred[rows] = float(np.mean(fold.train.labels))
        valid = set(pick_valid_videos(fold.train, valid_k[f], 0))
        is_valid = np.array([v in valid for v in fold.train.video_ids])
        for mi, (m, short) in enumerate(zip(MODALITIES, SHORT_NAMES)):
            have = fold.train.available[:, mi]
            fit_rows, val_rows = have & ~is_valid, have & is_valid
            x = fold.train.features[m].astype(np.float64)
            mu, sd = x[fit_rows].mean(0), x[fit_rows].std(0)
            sd[sd < 1e-6] = 1.0
            z = (x - mu) / sd
            scores = []
            for alpha in RIDGE_ALPHAS:
                r = Ridge(alpha=alpha).fit(z[fit_rows], fold.train.labels[fit_rows])
                scores.append(np.mean(np.abs(r.predict(z[val_rows]) - fold.train.labels[val_rows])))
            best = Ridge(alpha=RIDGE_ALPHAS[int(np.argmin(scores))]).fit(z[fit_rows], fold.train.labels[fit_rows])
            test_have = fold.test.available[:, mi]
            out = np.full(len(fold.test), np.nan)
            if test_have.any():
                out[test_have] = best.predict((fold.test.features[m][test_have] - mu) / sd)
            ridge[short][rows] = out
    refs = {"train mean": {s: mean_pred.copy() for s in SUBSET_NAMES}}
    for short in SHORT_NAMES:
        refs[f"ridge on {short} alone"] = {short: ridge[short]}
    return refs


# ---------------------------------------------------------------------------- scoring
def _metrics(preds: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    scored = np.isfinite(preds)
    if not scored.any():
        return {k: float("nan") for k in METRIC_NAMES}
    return mmsa_regression_metrics(preds[scored], truth[scored])


def summarize(result: BenchmarkResult) -> dict[str, Any]:
    """Per method: metrics per seed and subset, their mean and std over seeds, and the mean MAE over 7 subsets."""
    methods = {}
    for name, per_seed in result.predictions.items():
        seeds = [{s: _metrics(p[s], result.truth) for s in SUBSET_NAMES} for p in per_seed]
        mean = {s: {k: float(np.mean([r[s][k] for r in seeds])) for k in METRIC_NAMES} for s in SUBSET_NAMES}
        std = {s: {k: float(np.std([r[s][k] for r in seeds])) for k in METRIC_NAMES} for s in SUBSET_NAMES}
        mean7 = [float(np.mean([r[s]["MAE"] for s in SUBSET_NAMES])) for r in seeds]
        methods[name] = {"per_seed": seeds, "mean": mean, "std": std,
                         "mean_mae_7": {"mean": float(np.mean(mean7)), "std": float(np.std(mean7)),
                                        "per_seed": mean7},
                         "n": {s: int(np.isfinite(per_seed[0][s]).sum()) for s in SUBSET_NAMES}}
    refs = {name: {s: _metrics(p, result.truth) for s, p in by_subset.items()}
            for name, by_subset in result.references.items()}
    out: dict[str, Any] = {"settings": result.settings, "methods": methods, "references": refs,
                           "seconds": result.seconds, "n_test_utterances": int(len(result.truth)),
                           "n_test_videos": len(set(result.videos))}
    if "gmd" in result.predictions:
        out["gmd_vs_baselines"] = {name: _bootstrap_difference(result, "gmd", name)
                                   for name in result.predictions if name != "gmd"}
    out["dominance"] = {name: _mean_dominance(h) for name, h in result.histories.items()
                        if h and "unimodal_grad_norms" in h[0][0]}
    return out


def _errors(result: BenchmarkResult, name: str) -> np.ndarray:
    """(N, 7) absolute error of the seed-averaged prediction per utterance and subset (NaN where not scored)."""
    stacked = np.stack([[p[s] for s in SUBSET_NAMES] for p in result.predictions[name]])  # (seeds, 7, N)
    return np.abs(stacked.mean(0) - result.truth[None, :]).T


def _bootstrap_difference(result: BenchmarkResult, a: str, b: str, seed: int = 0) -> dict[str, float]:
    """Mean-over-7-subsets MAE of ``a`` minus ``b`` (seed-averaged predictions), with a video bootstrap interval."""
    return video_bootstrap_difference(_errors(result, a), _errors(result, b), result.videos, seed)


def video_bootstrap_difference(errors_a: np.ndarray, errors_b: np.ndarray, video_ids: Sequence[str],
                               seed: int = 0) -> dict[str, float]:
    """Mean error of ``a`` minus ``b``, with a 95% interval from resampling whole test videos (utterances of one
    video are not independent). Errors are (N, K): averaged over rows per column (NaN where not scored), then over
    the K columns."""
    videos = np.array(video_ids)
    groups = [np.flatnonzero(videos == v) for v in dict.fromkeys(video_ids)]

    def stat(rows: np.ndarray) -> float:
        with np.errstate(all="ignore"):
            return float(np.nanmean(np.nanmean(errors_a[rows], 0)) - np.nanmean(np.nanmean(errors_b[rows], 0)))

    rng = np.random.default_rng(seed)
    draws = [stat(np.concatenate([groups[i] for i in rng.integers(len(groups), size=len(groups))]))
             for _ in range(BOOTSTRAP_SAMPLES)]
    lo, hi = np.nanpercentile(draws, [2.5, 97.5])
    return {"difference": stat(np.arange(len(videos))), "ci95_low": float(lo), "ci95_high": float(hi)}


def _mean_dominance(histories: list[list[dict]]) -> dict[str, list[float]]:
    """Per epoch, the mean over runs of the unimodal gradient norms and of the conflicting pairs per step."""
    epochs = min(len(h) for h in histories)
    out: dict[str, list[float]] = {"epoch": list(range(1, epochs + 1))}
    out["conflicts"] = [float(np.mean([h[e]["mean_conflicts"] for h in histories])) for e in range(epochs)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # k-sampled GMD may never draw a unimodal subset
        for short in SHORT_NAMES:
            out[f"grad_norm_{short}"] = [float(np.nanmean([h[e]["unimodal_grad_norms"][short] for h in histories]))
                                         for e in range(epochs)]
    return out


# ---------------------------------------------------------------------------- reports
def _pm(mean: float, std: float, digits: int = 3) -> str:
    if not np.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def results_markdown(summary: dict[str, Any], labels: dict[str, str], title: str, command: str) -> str:
    methods = summary["methods"]
    seeds = summary["settings"]["seeds"]
    lines = [f"# {title}", "", f"Command: `{command}`", "",
             f"{summary['n_test_utterances']} test utterances from {summary['n_test_videos']} videos; every number "
             f"is on videos the model never saw. Mean ± std over {seeds} seed(s); L = text, A = audio, V = vision.",
             ""]
    for metric, better in (("MAE", "lower is better"), ("Non0_acc_2", "higher is better")):
        lines += [f"## {metric} ({better})", "",
                  "| method | " + " | ".join(SUBSET_NAMES) + (" | mean of 7 |" if metric == "MAE" else " |"),
                  "|---|" + "---:|" * (len(SUBSET_NAMES) + (metric == "MAE"))]
        for name, r in methods.items():
            cells = [_pm(r["mean"][s][metric], r["std"][s][metric]) for s in SUBSET_NAMES]
            if metric == "MAE":
                cells.append(f"**{_pm(r['mean_mae_7']['mean'], r['mean_mae_7']['std'])}**")
            lines.append(f"| {labels[name]} | " + " | ".join(cells) + " |")
        for name, r in summary["references"].items():
            cells = [f"{r[s][metric]:.3f}" if s in r and np.isfinite(r[s][metric]) else "" for s in SUBSET_NAMES]
            extra = ""
            if metric == "MAE":
                finite = [r[s]["MAE"] for s in SUBSET_NAMES if s in r]
                extra = f" {np.mean(finite):.3f} |" if len(finite) == len(SUBSET_NAMES) else " |"
            lines.append(f"| *{name}* | " + " | ".join(cells) + " |" + extra)
        lines.append("")
    lines += ["## Full set (LAV), all MMSA metrics", "", "| method | " + " | ".join(METRIC_NAMES) + " |",
              "|---|" + "---:|" * len(METRIC_NAMES)]
    for name, r in methods.items():
        lines.append(f"| {labels[name]} | " + " | ".join(_pm(r["mean"]["LAV"][k], r["std"]["LAV"][k])
                                                       for k in METRIC_NAMES) + " |")
    lines.append("")
    if "gmd_vs_baselines" in summary:
        lines += ["## GMD minus each baseline: mean MAE over the 7 subsets", "",
                  "Seed-averaged predictions; 95% interval from resampling whole test videos. Negative = GMD better.",
                  "", "| baseline | difference | 95% interval |", "|---|---:|---:|"]
        for name, d in summary["gmd_vs_baselines"].items():
            lines.append(f"| {labels[name]} | {d['difference']:+.3f} | [{d['ci95_low']:+.3f}, {d['ci95_high']:+.3f}] |")
        lines.append("")
    for name, dom in summary["dominance"].items():
        first, last = 0, len(dom["epoch"]) - 1
        norms = lambda e: ", ".join(f"{s} {dom[f'grad_norm_{s}'][e]:.3g}" for s in SHORT_NAMES)  # noqa: E731
        lines += [f"## Dominance ({labels[name]})", "",
                  f"Unimodal-subset gradient norms, epoch 1: {norms(first)}; epoch {last + 1}: {norms(last)}. "
                  f"Conflicting subset pairs per step (of 21 when all 7 subsets are drawn): "
                  f"{dom['conflicts'][first]:.2f} -> {dom['conflicts'][last]:.2f}. Mean over folds and seeds; see "
                  f"dominance.png.", ""]
    secs = ", ".join(f"{labels[k]} {v:.0f} s" for k, v in summary["seconds"].items())
    lines += [f"Training time (all folds and seeds, wall clock): {secs}.", ""]
    return "\n".join(lines)


def results_csv(summary: dict[str, Any], labels: dict[str, str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["method", "label", "seed", "subset", "n", *METRIC_NAMES])
    for name, r in summary["methods"].items():
        for seed, per_subset in enumerate(r["per_seed"]):
            for s in SUBSET_NAMES:
                w.writerow([name, labels[name], seed, s, r["n"][s], *(f"{per_subset[s][k]:.6f}" for k in METRIC_NAMES)])
    for name, r in summary["references"].items():
        for s, m in r.items():
            w.writerow(["reference", name, "", s, "", *(f"{m[k]:.6f}" for k in METRIC_NAMES)])
    return buf.getvalue()


def results_figure(summary: dict[str, Any], labels: dict[str, str], title: str) -> plt.Figure:
    """MAE and Non0 Acc-2 per subset (and MAE's mean over the 7), one bar per method, error bars = seed std."""
    methods = list(summary["methods"])
    fig, axes = plt.subplots(2, 1, figsize=(13, 8.5))
    width = 0.8 / len(methods)
    colors = plt.get_cmap("tab10").colors
    for ax, metric in zip(axes, ("MAE", "Non0_acc_2")):
        groups = SUBSET_NAMES + (["mean of 7"] if metric == "MAE" else [])
        x = np.arange(len(groups))
        for i, name in enumerate(methods):
            r = summary["methods"][name]
            means = [r["mean"][s][metric] for s in SUBSET_NAMES]
            stds = [r["std"][s][metric] for s in SUBSET_NAMES]
            if metric == "MAE":
                means.append(r["mean_mae_7"]["mean"])
                stds.append(r["mean_mae_7"]["std"])
            ax.bar(x - 0.4 + (i + 0.5) * width, means, width, yerr=stds, capsize=2, label=labels[name],
                   color=colors[i % len(colors)])
        ref = summary["references"].get("train mean")
        if ref is not None:
            ax.axhline(ref["LAV"][metric], color="black", ls="--", lw=1, label="predict the training mean")
        ax.set_xticks(x)
        ax.set_xticklabels(groups)
        ax.set_ylabel(metric + (" (lower is better)" if metric == "MAE" else " (higher is better)"))
        ax.grid(axis="y", alpha=0.3)
        if metric == "Non0_acc_2":
            ax.set_ylim(0.4, 1.0)
    axes[0].legend(ncol=3, fontsize=8)
    axes[0].set_title(title)
    fig.tight_layout()
    return fig


def dominance_summary_figure(summary: dict[str, Any], labels: dict[str, str]) -> Optional[plt.Figure]:
    if not summary["dominance"]:
        return None
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    styles = ["-", "--", ":"]
    for j, (name, dom) in enumerate(summary["dominance"].items()):
        for i, short in enumerate(SHORT_NAMES):
            top.plot(dom["epoch"], dom[f"grad_norm_{short}"], ls=styles[j % 3], color=f"C{i}", marker="o", ms=3,
                     label=f"{short} ({MODALITIES[i]}) alone, {labels[name]}")
        bottom.plot(dom["epoch"], dom["conflicts"], ls=styles[j % 3], marker="o", ms=3, color="tab:red",
                    label=labels[name])
    top.set_yscale("log")
    top.set_ylabel("unimodal-subset gradient norm")
    top.grid(alpha=0.3, which="both")
    top.legend(fontsize=8)
    top.set_title("Modality dominance during GMD training (mean over folds and seeds)")
    bottom.set_ylabel("conflicting subset pairs / step")
    bottom.set_xlabel("epoch")
    bottom.grid(alpha=0.3)
    bottom.legend(fontsize=8)
    fig.tight_layout()
    return fig


def write_benchmark(out_dir: str | Path, summary: dict[str, Any], labels: dict[str, str], title: str,
                    command: str) -> list[Path]:
    """benchmark_results.{md,csv,json,png} and, when GMD ran, dominance.png."""
    out = Path(out_dir)
    paths = [out / f"benchmark_results.{ext}" for ext in ("md", "csv", "json", "png")]
    write_text(paths[0], results_markdown(summary, labels, title, command))
    write_text(paths[1], results_csv(summary, labels))
    write_json(paths[2], {"title": title, "command": command, "labels": labels, **summary})
    fig = results_figure(summary, labels, title)
    save_figure(fig, paths[3])
    plt.close(fig)
    fig = dominance_summary_figure(summary, labels)
    if fig is not None:
        paths.append(out / "dominance.png")
        save_figure(fig, paths[-1])
        plt.close(fig)
    return paths
