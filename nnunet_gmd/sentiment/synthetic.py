"""Synthetic feature files in the exact MMSA and MulT layouts, for tests and for a demo without the real data.

The label is a learnable function of the features. Each sample has a latent sentiment ``s``; every modality
carries its own noisy view ``z_m = s + sigma_m * noise`` written along a fixed random direction into each of
its valid time steps (text is the least noisy, as in real MOSI). The label is ``1.5 * s`` rounded to thirds
like averaged annotator scores and clipped to [-3, 3]. So each modality alone predicts the label partly, and
more modalities predict it better, which is the regime a missing-modality model is built for.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Optional

import numpy as np

from nnunet_gmd.atomic import atomic_path
from nnunet_gmd.sentiment.data import KNOWN_AUDIO_VISION_DIMS, SPLITS

FORMATS: tuple[str, ...] = ("mmsa-aligned", "mmsa-unaligned", "mult")
VIEW_NOISE = {"text": 0.3, "audio": 0.6, "vision": 0.6}
LABEL_SCALE = 1.5


def make_synthetic(fmt: str = "mmsa-aligned", dataset: str = "mosi", sizes: tuple[int, int, int] = (256, 64, 64),
                   text_len: int = 50, text_dim: Optional[int] = None,
                   unaligned_lengths: tuple[int, int] = (375, 500), signal: float = 1.0,
                   seed: int = 0) -> dict:
    """A dict shaped like the file ``fmt`` names; ``text_dim`` defaults to 768 (BERT, MMSA) or 300 (GloVe, MulT)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if dataset not in KNOWN_AUDIO_VISION_DIMS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(KNOWN_AUDIO_VISION_DIMS)}")
    rng = np.random.default_rng(seed)
    audio_dim, vision_dim = KNOWN_AUDIO_VISION_DIMS[dataset]
    dims = {"text": text_dim or (300 if fmt == "mult" else 768), "audio": audio_dim, "vision": vision_dim}
    steps = {"text": text_len, "audio": text_len, "vision": text_len}
    if fmt == "mmsa-unaligned":
        steps["audio"], steps["vision"] = unaligned_lengths
    directions = {m: _unit(rng.standard_normal(d)) for m, d in dims.items()}
    return {split: _make_split(rng, fmt, split, n, dims, steps, directions, signal)
            for split, n in zip(SPLITS, sizes)}


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _make_split(rng: np.random.Generator, fmt: str, split: str, n: int, dims: dict, steps: dict,
                directions: dict, signal: float) -> dict:
    out: dict = {}
    sentiment = rng.standard_normal(n)
    for m, d in dims.items():
        t = steps[m]
        # Real files pad with zeros after the valid steps; text always has a mask, audio/vision only if unaligned.
        variable = m == "text" and fmt != "mult" or m != "text" and fmt == "mmsa-unaligned"
        lengths = rng.integers(max(1, t // 2), t + 1, size=n) if variable else np.full(n, t)
        z = sentiment + VIEW_NOISE[m] * rng.standard_normal(n)
        x = rng.standard_normal((n, t, d)) * 0.5 + signal * z[:, None, None] * directions[m][None, None, :]
        x[np.arange(t)[None, :] >= lengths[:, None]] = 0.0
        out[m] = x.astype(np.float32)
        if m == "text" and fmt != "mult":
            mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.int64)
            ids = rng.integers(1000, 30000, size=(n, t)) * mask
            out["text_bert"] = np.stack([ids, mask, np.zeros_like(mask)], axis=1).astype(np.float32)
        if m != "text" and fmt == "mmsa-unaligned":
            out[f"{m}_lengths"] = lengths.astype(np.int64).tolist()
    label = np.clip(np.round(LABEL_SCALE * sentiment * 3) / 3, -3, 3).astype(np.float32)
    if fmt == "mult":
        out["labels"] = label.reshape(n, 1, 1)
    else:
        out["regression_labels"] = label
        out["id"] = np.array([f"{split}_video{i // 4}${i % 4}" for i in range(n)], dtype=object)
        out["raw_text"] = np.array([f"synthetic utterance {i}" for i in range(n)], dtype=object)
    return out


def write_synthetic(path: str | Path, **kwargs) -> Path:
    """Write :func:`make_synthetic` output as a pickle, atomically."""
    path = Path(path)
    data = make_synthetic(**kwargs)
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        pickle.dump(data, f, protocol=4)
    return path
