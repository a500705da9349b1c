"""Training the DS sentiment model with GMD, plain DS (mean of subset losses) or the full-modality baseline.

* ``gmd``: one forward of all branches, one L1 loss per subset on the fused prediction of its branches, then
  the core's :func:`nnunet_gmd.gmd.gmd_backward` (PCGrad-style decoupling, merge) and an optimizer step.
* ``ds``: the same subset losses, averaged, one backward (no decoupling).
* ``full``: one loss with all modalities: the usual baseline, which collapses when a modality is missing.

Model selection uses the ``valid`` split: the mean MAE over the subsets the method trains on (all subsets for
``gmd``/``ds``, the full set for ``full``). ``last.pt`` (everything needed to resume, RNG states included) and
``best.pt`` are written atomically after every epoch, together with ``history.json`` and ``training_curve.png``.
"""
from __future__ import annotations

import time
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

from nnunet_gmd.gmd import REDUCTIONS, gmd_backward  # noqa: E402
from nnunet_gmd.sentiment import MODALITIES  # noqa: E402
from nnunet_gmd.sentiment.atomic import save_figure, write_json  # noqa: E402
from nnunet_gmd.sentiment.batching import SplitTensors, feature_statistics  # noqa: E402
from nnunet_gmd.sentiment.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from nnunet_gmd.sentiment.data import SentimentData  # noqa: E402
from nnunet_gmd.sentiment.evaluate import SUBSETS, evaluate_subsets, subset_label  # noqa: E402
from nnunet_gmd.sentiment.model import DSSentimentModel, ModelConfig  # noqa: E402
from nnunet_gmd.subsets import SubsetSampler  # noqa: E402

METHODS: tuple[str, ...] = ("gmd", "ds", "full")
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

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise TrainingError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.method not in METHODS:
            raise TrainingError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.subsets_per_step is not None and not 1 <= self.subsets_per_step <= len(SUBSETS):
            raise TrainingError(f"--subsets must be 'all' or an integer in [1, {len(SUBSETS)}], "
                                f"got {self.subsets_per_step}")
        if self.method == "full" and self.subsets_per_step is not None:
            raise TrainingError("--subsets applies to --method gmd and ds; 'full' always trains on all modalities")
        if self.gmd_reduction not in REDUCTIONS:
            raise TrainingError(f"gmd reduction must be one of {REDUCTIONS}, got {self.gmd_reduction!r}")
        for name in ("epochs", "batch_size", "hidden", "layers", "heads"):
            if getattr(self, name) < 1:
                raise TrainingError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden % self.heads:
            raise TrainingError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise TrainingError(f"dropout must be in [0, 1), got {self.dropout}")

    def model_config(self, feature_dims: dict[str, int]) -> ModelConfig:
        return ModelConfig(tuple(feature_dims[m] for m in MODALITIES), self.hidden, self.layers, self.heads,
                           self.dropout)

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


def _selection_subsets(method: str) -> list[tuple[int, ...]]:
    return [FULL_SET] if method == "full" else list(SUBSETS)


def _train_step(model: DSSentimentModel, optimizer: torch.optim.Optimizer, batch, labels: torch.Tensor,
                config: TrainConfig, sampler: SubsetSampler, gmd_generator: torch.Generator,
                params: list[torch.Tensor]) -> dict[str, float]:
    optimizer.zero_grad(set_to_none=True)
    if config.method == "full":
        loss = F.l1_loss(model(batch), labels)
        loss.backward()
        optimizer.step()
        return {"loss": float(loss.detach())}
    subsets = sampler.sample()
    pooled = model.forward_branches(batch)
    losses = [F.l1_loss(model.predict_subset(pooled, s), labels) for s in subsets]
    conflicts = 0
    if config.method == "gmd":
        conflicts = gmd_backward(losses, params, reduction=config.gmd_reduction, generator=gmd_generator).num_conflicts
    else:
        torch.stack(losses).mean().backward()
    optimizer.step()
    return {"loss": float(torch.stack(losses).detach().mean()), "conflicts": float(conflicts)}


def _validate(model: DSSentimentModel, valid: SplitTensors, method: str, batch_size: int,
              device: torch.device) -> tuple[float, dict[str, float]]:
    maes = {name: m["MAE"] for name, m in
            evaluate_subsets(model, valid, _selection_subsets(method), batch_size, device).items()}
    return float(np.mean(list(maes.values()))), maes


def _rng_state(shuffle: torch.Generator, gmd: torch.Generator, sampler: SubsetSampler) -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "shuffle": shuffle.get_state(), "gmd": gmd.get_state(),
            "sampler": sampler.state_dict()["generator"]}


def _restore_rng(state: dict[str, Any], shuffle: torch.Generator, gmd: torch.Generator,
                 sampler: SubsetSampler) -> None:
    torch.set_rng_state(state["torch"])
    shuffle.set_state(state["shuffle"])
    gmd.set_state(state["gmd"])
    sampler.load_state_dict({"generator": state["sampler"]})


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


def train(data: SentimentData, config: TrainConfig, out_dir: str | Path, resume: bool = False,
          device: torch.device | str = "cpu", progress: bool = True) -> TrainResult:
    """Train (or resume) and write ``last.pt``, ``best.pt``, ``history.json``, ``training_curve.png`` in ``out_dir``."""
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

    torch.manual_seed(config.seed)
    model = DSSentimentModel(config.model_config(data.feature_dims))
    train_set, valid_set = SplitTensors(data.splits["train"]), SplitTensors(data.splits["valid"])
    for encoder, (mean, std) in zip(model.encoders, feature_statistics(train_set)):
        encoder.set_statistics(mean, std)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    shuffle = torch.Generator().manual_seed(config.seed)
    gmd_generator = torch.Generator().manual_seed(config.seed + 1)
    sampler = SubsetSampler(len(MODALITIES), k=config.subsets_per_step, seed=config.seed + 2)
    history: list[dict] = []
    best_epoch, best_score, start_epoch = 0, float("inf"), 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        _restore_rng(state["rng"], shuffle, gmd_generator, sampler)
        history = list(state["history"])
        best_epoch, best_score, start_epoch = state["best_epoch"], state["best_score"], state["epoch"]

    steps_per_epoch = train_set.num_batches(config.batch_size)
    bar = tqdm(total=config.epochs * steps_per_epoch, initial=start_epoch * steps_per_epoch, disable=not progress,
               desc=f"sentiment {config.method}", unit="step", dynamic_ncols=True)
    common = {"train_config": asdict(config), "model_config": model.config.to_dict(),
              "data": {"path": str(data.path), "format": data.format, "aligned": data.aligned}}
    try:
        for epoch in range(start_epoch + 1, config.epochs + 1):
            started = time.time()
            model.train()
            logs = []
            for batch, labels in train_set.batches(config.batch_size, shuffle):
                logs.append(_train_step(model, optimizer, batch.to(device), labels.to(device), config, sampler,
                                        gmd_generator, params))
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{logs[-1]['loss']:.3f}")
            score, maes = _validate(model, valid_set, config.method, 2 * config.batch_size, device)
            entry = {"epoch": epoch, "train_loss": float(np.mean([x["loss"] for x in logs])),
                     "valid_score": score, "valid_mae": maes, "seconds": time.time() - started}
            if config.method == "gmd":
                entry["mean_conflicts"] = float(np.mean([x["conflicts"] for x in logs]))
            history.append(entry)
            comparable = score if np.isfinite(score) else float("inf")  # a diverged epoch never wins
            if comparable < best_score or best_epoch == 0:
                best_epoch, best_score = epoch, comparable
                save_checkpoint(best_path, {**common, "model": model.state_dict(), "epoch": epoch,
                                            "valid_score": score, "valid_mae": maes})
            bar.set_postfix(epoch=epoch, valid_mae=f"{score:.3f}", best=best_epoch)
            save_checkpoint(last_path, {**common, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                        "rng": _rng_state(shuffle, gmd_generator, sampler), "epoch": epoch,
                                        "history": history, "best_epoch": best_epoch, "best_score": best_score})
            _write_history(out, history, config)
    finally:
        bar.close()
    return TrainResult(best_epoch, best_score, history, best_path, max(0, config.epochs - start_epoch))


def _write_history(out: Path, history: list[dict], config: TrainConfig) -> None:
    write_json(out / "history.json", history)
    selection = _selection_subsets(config.method)
    on = "all 7 subsets" if len(selection) == len(SUBSETS) else "+".join(subset_label(s) for s in selection)
    fig = training_curve_figure(history, f"{config.dataset.upper()} {config.method}: model selection on valid "
                                         f"MAE, mean over {on}")
    save_figure(fig, out / "training_curve.png")
    plt.close(fig)
