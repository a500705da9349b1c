"""Training the sentiment models: GMD, plain DS (mean of subset losses), the full-modality DS baseline and two
early-fusion baselines.

* ``gmd``: one forward of all branches, one L1 loss per subset on the fused prediction of its branches, then
  the core's :func:`nnunet_gmd.gmd.gmd_backward` (PCGrad-style decoupling, merge) and an optimizer step.
* ``ds``: the same subset losses, averaged, one backward (no decoupling).
* ``full``: one loss with all (available) modalities: late fusion without per-subset losses.
* ``early``: :class:`~nnunet_gmd.sentiment.model.EarlyFusionMLP` on concatenated features, missing ones
  zero-filled; ``early_dropout``: the same with random modality dropout (``modality_dropout``) in training.

A sample that lacks a modality (utterance tables) enters a subset's loss only if it has all of the subset's
modalities, as in the DS trainers. Model selection uses the ``valid`` split: the mean MAE over the subsets the
method is meant to serve (all 7 for ``gmd``/``ds``/``early_dropout``, the full set for ``full``/``early``).
``last.pt`` (everything needed to resume, RNG states included) and ``best.pt`` are written atomically after
every epoch, together with ``history.json``, ``training_curve.png`` and, for GMD, ``dominance.png``: the
per-epoch unimodal gradient norms and conflicting subset pairs (the paper's dominance indicator).
"""
from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from nnunet_gmd.gmd import REDUCTIONS, GMDStats, gmd_backward  # noqa: E402
from nnunet_gmd.sentiment import MODALITIES, SHORT_NAMES  # noqa: E402
from nnunet_gmd.atomic import leftover_temp_files, save_figure, write_json  # noqa: E402
from nnunet_gmd.sentiment.batching import SplitTensors, feature_statistics  # noqa: E402
from nnunet_gmd.sentiment.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from nnunet_gmd.sentiment.data import SentimentData  # noqa: E402
from nnunet_gmd.sentiment.evaluate import SUBSETS, drop_within, evaluate_subsets, subset_label  # noqa: E402
from nnunet_gmd.sentiment.model import BACKBONES, ModelConfig, SentimentModel, build_model  # noqa: E402
from nnunet_gmd.subsets import SubsetSampler  # noqa: E402

METHODS: tuple[str, ...] = ("gmd", "ds", "full", "early", "early_dropout")
SUBSET_METHODS: tuple[str, ...] = ("gmd", "ds")  # one loss per modality subset
EARLY_METHODS: tuple[str, ...] = ("early", "early_dropout")
DATASETS: tuple[str, ...] = ("mosi", "mosei")
FULL_SET = SUBSETS[-1]


class TrainingError(ValueError):
    """A training request that cannot be carried out as asked (e.g. resuming with other settings)."""


@dataclass(frozen=True)
class TrainConfig:
    dataset: str
    method: str = "gmd"
    subsets_per_step: Optional[int] = None  # None: all 7 subsets every step
    epochs: int = 30
    seed: int = 0
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    gmd_reduction: str = "mean"
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    dropout: float = 0.1
    backbone: str = "transformer"  # DS backbone; "mlp" for utterance-level (length-1) features
    modality_dropout: float = 0.5  # early_dropout: chance that each available modality is dropped per sample
    valid_videos: Optional[int] = None  # utterance tables: whole videos held out for model selection

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise TrainingError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.method not in METHODS:
            raise TrainingError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.subsets_per_step is not None and not 1 <= self.subsets_per_step <= len(SUBSETS):
            raise TrainingError(f"--subsets must be 'all' or an integer in [1, {len(SUBSETS)}], "
                                f"got {self.subsets_per_step}")
        if self.method not in SUBSET_METHODS and self.subsets_per_step is not None:
            raise TrainingError(f"--subsets applies to --method gmd and ds; '{self.method}' has no subset losses")
        if self.backbone not in BACKBONES:
            raise TrainingError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if not 0.0 <= self.modality_dropout < 1.0:
            raise TrainingError(f"modality dropout must be in [0, 1), got {self.modality_dropout}")
        if self.gmd_reduction not in REDUCTIONS:
            raise TrainingError(f"gmd reduction must be one of {REDUCTIONS}, got {self.gmd_reduction!r}")
        for name in ("epochs", "batch_size", "hidden", "layers", "heads"):
            if getattr(self, name) < 1:
                raise TrainingError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.backbone == "transformer" and self.method not in EARLY_METHODS and self.hidden % self.heads:
            raise TrainingError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise TrainingError(f"dropout must be in [0, 1), got {self.dropout}")

    def model_config(self, feature_dims: dict[str, int]) -> ModelConfig:
        return ModelConfig(tuple(feature_dims[m] for m in MODALITIES), self.hidden, self.layers, self.heads,
                           self.dropout, backbone=self.backbone,
                           fusion="early" if self.method in EARLY_METHODS else "late")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


@dataclass
class TrainResult:
    best_epoch: int
    best_score: float
    history: list[dict]
    checkpoint: Path
    epochs_run: int  # in this call; 0 when a resumed run already had all requested epochs


def selection_subsets(method: str) -> list[tuple[int, ...]]:
    """The subsets whose mean valid MAE selects the epoch: those the method is meant to serve."""
    return [FULL_SET] if method in ("full", "early") else list(SUBSETS)


def unimodal_grad_norms(stats: GMDStats, subsets: list[tuple[int, ...]]) -> list[float]:
    """Gradient norm of each single-modality subset's loss this step (NaN when not drawn or no sample had it)."""
    norms = [float("nan")] * len(MODALITIES)
    for subset, norm in zip(subsets, stats.grad_norms.tolist()):
        if len(subset) == 1:
            norms[subset[0]] = norm
    return norms


class Trainer:
    """One training run's moving parts (model, optimizer, generators) and its epoch loop, without any files:
    :func:`train` adds checkpoints and plots, the benchmark keeps the best state in memory."""

    def __init__(self, model: SentimentModel, train_set: SplitTensors, valid_set: SplitTensors,
                 config: TrainConfig, device: torch.device) -> None:
        self.model, self.train_set, self.valid_set = model, train_set, valid_set
        self.config, self.device = config, device
        for encoder, (mean, std) in zip(model.encoders, feature_statistics(train_set)):
            encoder.set_statistics(mean, std)
        model.to(device)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.shuffle = torch.Generator().manual_seed(config.seed)
        self.gmd_generator = torch.Generator().manual_seed(config.seed + 1)
        self.sampler = SubsetSampler(len(MODALITIES), k=config.subsets_per_step, seed=config.seed + 2)
        self.dropout_generator = torch.Generator().manual_seed(config.seed + 3)

    @property
    def steps_per_epoch(self) -> int:
        return self.train_set.num_batches(self.config.batch_size)

    def rng_state(self) -> dict[str, Any]:
        return {"torch": torch.get_rng_state(), "shuffle": self.shuffle.get_state(),
                "gmd": self.gmd_generator.get_state(), "sampler": self.sampler.state_dict()["generator"],
                "dropout": self.dropout_generator.get_state()}

    def restore_rng(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        self.shuffle.set_state(state["shuffle"])
        self.gmd_generator.set_state(state["gmd"])
        self.sampler.load_state_dict({"generator": state["sampler"]})
        if "dropout" in state:
            self.dropout_generator.set_state(state["dropout"])

    def step(self, batch, labels: torch.Tensor, available: torch.Tensor) -> dict[str, Any]:
        config, model = self.config, self.model
        self.optimizer.zero_grad(set_to_none=True)
        if config.method not in SUBSET_METHODS:
            mask = available
            if config.method == "early_dropout":
                mask = drop_within(available.cpu(), config.modality_dropout, self.dropout_generator).to(self.device)
            loss = F.l1_loss(model(batch, mask), labels)
            loss.backward()
            self.optimizer.step()
            return {"loss": float(loss.detach())}
        pooled = model.forward_branches(batch)
        losses, used = [], []
        for s in self.sampler.sample():
            rows = available[:, list(s)].all(1)
            if not bool(rows.any()):
                continue  # nobody in this batch has the subset: it has no loss this step
            pred = model.predict_subset(pooled, s)
            losses.append(F.l1_loss(pred, labels) if bool(rows.all()) else F.l1_loss(pred[rows], labels[rows]))
            used.append(s)
        out: dict[str, Any] = {"loss": float(torch.stack(losses).detach().mean())}
        if config.method == "gmd":
            stats = gmd_backward(losses, self.params, reduction=config.gmd_reduction, generator=self.gmd_generator)
            out["conflicts"] = float(stats.num_conflicts)
            out["grad_norms"] = unimodal_grad_norms(stats, used)
        else:
            torch.stack(losses).mean().backward()
        self.optimizer.step()
        return out

    def validate(self) -> tuple[float, dict[str, float]]:
        maes = {name: m["MAE"] for name, m in evaluate_subsets(
            self.model, self.valid_set, selection_subsets(self.config.method), 2 * self.config.batch_size,
            self.device).items()}
        finite = [v for v in maes.values() if np.isfinite(v)]  # a subset no valid sample has is skipped
        return (float(np.mean(finite)) if finite else float("inf")), maes

    def epoch(self, epoch: int, bar: Optional[tqdm] = None) -> dict[str, Any]:
        """Train one epoch, validate, and return the history entry."""
        started = time.time()
        self.model.train()
        logs = []
        for batch, labels, available in self.train_set.batches(self.config.batch_size, self.shuffle):
            logs.append(self.step(batch.to(self.device), labels.to(self.device), available.to(self.device)))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{logs[-1]['loss']:.3f}")
        score, maes = self.validate()
        entry = {"epoch": epoch, "train_loss": float(np.mean([x["loss"] for x in logs])),
                 "valid_score": score, "valid_mae": maes, "seconds": time.time() - started}
        if self.config.method == "gmd":
            entry["mean_conflicts"] = float(np.mean([x["conflicts"] for x in logs]))
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a modality no batch had: NaN, on purpose
                norms = np.nanmean(np.array([x["grad_norms"] for x in logs], dtype=float), axis=0)
            entry["unimodal_grad_norms"] = {n: float(v) for n, v in zip(SHORT_NAMES, norms)}
        return entry


def make_model(config: TrainConfig, feature_dims: dict[str, int]) -> SentimentModel:
    torch.manual_seed(config.seed)
    return build_model(config.model_config(feature_dims))


def _check_resumable(state: dict[str, Any], config: TrainConfig, data: SentimentData, path: Path) -> None:
    saved = TrainConfig.from_dict(state["train_config"])
    diffs = [f"{f.name}: checkpoint {getattr(saved, f.name)!r}, now {getattr(config, f.name)!r}"
             for f in fields(TrainConfig) if f.name != "epochs" and getattr(saved, f.name) != getattr(config, f.name)]
    if diffs:
        raise TrainingError(f"{path}: cannot resume with different settings ({'; '.join(diffs)})")
    dims = [data.feature_dims[m] for m in MODALITIES]
    if list(state["model_config"]["feature_dims"]) != dims:
        raise TrainingError(f"{path}: checkpoint was trained on feature sizes {state['model_config']['feature_dims']}"
                            f" ({', '.join(MODALITIES)}), but {data.path} has {dims}")


def training_curve_figure(history: list[dict], title: str) -> plt.Figure:
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train L1 (mean over subsets)")
    ax.plot(epochs, [h["valid_score"] for h in history], marker="o", label="valid MAE (selection score)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("L1 / MAE")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    return fig


def dominance_figure(history: list[dict], title: str) -> plt.Figure:
    """Unimodal gradient norms (log scale: a dominant modality is often orders of magnitude ahead) and
    conflicting subset pairs per step, per epoch; ``history`` entries of a GMD run."""
    epochs = [h["epoch"] for h in history]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for i, name in enumerate(SHORT_NAMES):
        top.plot(epochs, [h["unimodal_grad_norms"][name] for h in history], marker="o",
                 label=f"{name} ({MODALITIES[i]}) alone")
    top.set_yscale("log")
    top.set_ylabel("gradient norm of the\nunimodal subset loss")
    top.grid(alpha=0.3, which="both")
    top.legend()
    top.set_title(title)
    bottom.plot(epochs, [h["mean_conflicts"] for h in history], marker="o", color="tab:red")
    bottom.set_ylabel(f"conflicting subset pairs / step\n(of {len(SUBSETS) * (len(SUBSETS) - 1) // 2})")
    bottom.set_xlabel("epoch")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def train(data: SentimentData, config: TrainConfig, out_dir: str | Path, resume: bool = False,
          device: torch.device | str = "cpu", progress: bool = True) -> TrainResult:
    """Train (or resume) and write ``last.pt``, ``best.pt``, ``history.json``, ``training_curve.png`` (and, for GMD,
    ``dominance.png``) in ``out_dir``."""
    out = Path(out_dir)
    device = torch.device(device)
    last_path, best_path = out / "last.pt", out / "best.pt"
    state: Optional[dict[str, Any]] = None
    if resume:
        if not last_path.is_file():
            raise TrainingError(f"{last_path}: nothing to resume from")
        state = load_checkpoint(last_path)
        _check_resumable(state, config, data, last_path)
    elif last_path.exists():
        raise TrainingError(f"{out} already holds a training run (last.pt); pass --resume to continue it or "
                            f"choose another --out")
    if out.is_dir():
        for leftover in leftover_temp_files(out):   # a run killed mid-write (a checkpoint, the curve PNG)
            leftover.unlink()

    model = make_model(config, data.feature_dims)
    trainer = Trainer(model, SplitTensors(data.splits["train"]), SplitTensors(data.splits["valid"]), config, device)
    history: list[dict] = []
    best_epoch, best_score, start_epoch = 0, float("inf"), 0
    if state is not None:
        model.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.restore_rng(state["rng"])
        history = list(state["history"])
        best_epoch, best_score, start_epoch = state["best_epoch"], state["best_score"], state["epoch"]

    steps = trainer.steps_per_epoch
    bar = tqdm(total=config.epochs * steps, initial=start_epoch * steps, disable=not progress,
               desc=f"sentiment {config.method}", unit="step", dynamic_ncols=True)
    data_info: dict[str, Any] = {"path": str(data.path), "format": data.format, "aligned": data.aligned}
    if data.splits["valid"].video_ids is not None:
        data_info["valid_videos"] = sorted(set(data.splits["valid"].video_ids))
    common = {"train_config": asdict(config), "model_config": model.config.to_dict(), "data": data_info}
    try:
        for epoch in range(start_epoch + 1, config.epochs + 1):
            entry = trainer.epoch(epoch, bar)
            history.append(entry)
            score, maes = entry["valid_score"], entry["valid_mae"]
            comparable = score if np.isfinite(score) else float("inf")  # a diverged epoch never wins
            if comparable < best_score or best_epoch == 0:
                best_epoch, best_score = epoch, comparable
                save_checkpoint(best_path, {**common, "model": model.state_dict(), "epoch": epoch,
                                            "valid_score": score, "valid_mae": maes})
            bar.set_postfix(epoch=epoch, valid_mae=f"{score:.3f}", best=best_epoch)
            save_checkpoint(last_path, {**common, "model": model.state_dict(),
                                        "optimizer": trainer.optimizer.state_dict(), "rng": trainer.rng_state(),
                                        "epoch": epoch, "history": history, "best_epoch": best_epoch,
                                        "best_score": best_score})
            _write_history(out, history, config)
    finally:
        bar.close()
    return TrainResult(best_epoch, best_score, history, best_path, max(0, config.epochs - start_epoch))


def _write_history(out: Path, history: list[dict], config: TrainConfig) -> None:
    write_json(out / "history.json", history)
    selection = selection_subsets(config.method)
    on = "all 7 subsets" if len(selection) == len(SUBSETS) else "+".join(subset_label(s) for s in selection)
    fig = training_curve_figure(history, f"{config.dataset.upper()} {config.method}: model selection on valid "
                                         f"MAE, mean over {on}")
    save_figure(fig, out / "training_curve.png")
    plt.close(fig)
    if config.method == "gmd":
        fig = dominance_figure(history, f"{config.dataset.upper()} GMD: modality dominance per epoch")
        save_figure(fig, out / "dominance.png")
        plt.close(fig)
