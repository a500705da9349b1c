"""Loading and validating the MOSI/MOSEI feature pickles people actually download.

Two layouts are supported, told apart by their label key:

* MMSA (``aligned_50.pkl`` / ``unaligned_50.pkl``): ``text`` (BERT features), ``text_bert`` (token ids, mask,
  segment ids), ``audio``, ``vision``, ``regression_labels``, ``id`` and, in unaligned files,
  ``audio_lengths`` / ``vision_lengths``.
* MulT (``mosi_data.pkl`` / ``mosei_senti_data.pkl``): GloVe ``text``, ``audio``, ``vision``, ``labels`` (N, 1, 1).

Feature sizes are read from the file. Every problem is reported with the file, split, key and sample index,
because a silently wrong feature file costs a whole training run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from nnunet_gmd.sentiment import MODALITIES
from nnunet_gmd.sentiment.safe_pickle import safe_load

SPLITS: tuple[str, ...] = ("train", "valid", "test")
LABEL_RANGE: tuple[float, float] = (-3.0, 3.0)
MMSA_LABEL_KEY = "regression_labels"
MULT_LABEL_KEY = "labels"
# Only used to hint that --dataset and the file disagree; the model always takes its sizes from the file.
KNOWN_AUDIO_VISION_DIMS = {"mosi": (5, 20), "mosei": (74, 35)}


class SentimentDataError(ValueError):
    """A feature file that cannot be used as is; the message names file, split, key and index."""


@dataclass
class SentimentSplit:
    """One split as float32 arrays; ``lengths[m]`` is None when every time step of modality m is valid.

    ``available`` (N, M) marks which modalities each sample really has (None: all of them, as in the pickles);
    ``video_ids`` is known for utterance tables, where splits must never cut a video.
    """

    features: dict[str, np.ndarray]
    lengths: dict[str, Optional[np.ndarray]]
    labels: np.ndarray
    ids: list[str]
    available: Optional[np.ndarray] = None
    video_ids: Optional[list[str]] = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class SentimentData:
    path: Path
    format: str  # "mmsa", "mult" or "table"
    aligned: bool
    splits: dict[str, SentimentSplit]
    nonfinite_fixed: dict[str, int] = field(default_factory=dict)  # "split/key" -> values set to 0

    @property
    def feature_dims(self) -> dict[str, int]:
        first = next(iter(self.splits.values()))  # a table folder being evaluated has only "test"
        return {m: int(first.features[m].shape[2]) for m in MODALITIES}

    def describe(self) -> str:
        n = ", ".join(f"{s} {len(self.splits[s])}" for s in SPLITS if s in self.splits)
        dims = ", ".join(f"{m} {d}" for m, d in self.feature_dims.items())
        kind = "aligned" if self.aligned else "unaligned"
        return f"{self.path.name}: {self.format.upper()} {kind}; samples: {n}; feature sizes: {dims}"


def load_sentiment_file(path: str | Path, fix_nonfinite: bool = False) -> SentimentData:
    """Load an MMSA or MulT pickle safely and validate it.

    NaN/inf features are an error unless ``fix_nonfinite`` is set, in which case they become 0 (what MMSA and
    MulT do for MOSEI's known ``-inf`` audio values) and the counts are kept in ``nonfinite_fixed``.
    """
    path = Path(path)
    try:
        raw = safe_load(path)
    except FileNotFoundError as e:
        raise SentimentDataError(str(e)) from None
    except Exception as e:  # UnsafePickleError and unreadable pickles already name the file
        raise SentimentDataError(str(e)) from None
    return parse_sentiment_dict(raw, path, fix_nonfinite)


def parse_sentiment_dict(raw: Any, path: Path, fix_nonfinite: bool = False) -> SentimentData:
    """Validate an already unpickled file (exposed so tests can check the rules without writing files)."""
    if not isinstance(raw, dict):
        raise SentimentDataError(f"{path}: expected a dict with keys {list(SPLITS)}, got {type(raw).__name__}")
    missing = [s for s in SPLITS if s not in raw]
    if missing:
        raise SentimentDataError(f"{path}: missing split(s) {missing}; found keys {sorted(map(str, raw))}")
    train = raw["train"]
    if not isinstance(train, dict):
        raise SentimentDataError(f"{path}: split 'train' must be a dict, got {type(train).__name__}")
    if MMSA_LABEL_KEY in train:
        fmt, label_key = "mmsa", MMSA_LABEL_KEY
    elif MULT_LABEL_KEY in train:
        fmt, label_key = "mult", MULT_LABEL_KEY
    else:
        raise SentimentDataError(
            f"{path}: split 'train' has neither '{MMSA_LABEL_KEY}' (MMSA) nor '{MULT_LABEL_KEY}' (MulT); "
            f"found keys {sorted(map(str, train))}")
    fixed: dict[str, int] = {}
    splits = {s: _parse_split(raw[s], path, s, fmt, label_key, fix_nonfinite, fixed) for s in SPLITS}
    _check_consistent(splits, path)
    aligned = all(v is None for s in splits.values() for k, v in s.lengths.items() if k != "text")
    return SentimentData(path=path, format=fmt, aligned=aligned, splits=splits, nonfinite_fixed=fixed)


def _where(path: Path, split: str, key: str) -> str:
    return f"{path}: split '{split}', key '{key}'"


def _parse_split(raw: Any, path: Path, split: str, fmt: str, label_key: str, fix_nonfinite: bool,
                 fixed: dict[str, int]) -> SentimentSplit:
    if not isinstance(raw, dict):
        raise SentimentDataError(f"{path}: split '{split}' must be a dict, got {type(raw).__name__}")
    required = list(MODALITIES) + [label_key]
    missing = [k for k in required if k not in raw]
    if missing:
        raise SentimentDataError(f"{path}: split '{split}' is missing key(s) {missing} needed for the "
                                 f"{fmt.upper()} format; found keys {sorted(map(str, raw))}")
    labels = _labels(raw[label_key], path, split, label_key)
    n = labels.shape[0]
    features = {m: _features(raw[m], path, split, m, n, fix_nonfinite, fixed) for m in MODALITIES}
    lengths: dict[str, Optional[np.ndarray]] = {m: None for m in MODALITIES}
    for m in ("audio", "vision"):
        key = f"{m}_lengths"
        if key in raw:
            lengths[m] = _lengths(raw[key], path, split, key, n, features[m].shape[1])
    if "text_bert" in raw:  # its second row is the BERT attention mask: it says which text steps are real
        lengths["text"] = _text_lengths(raw["text_bert"], path, split, n, features["text"].shape[1])
    ids = _ids(raw.get("id"), path, split, n)
    return SentimentSplit(features=features, lengths=lengths, labels=labels, ids=ids)


def _as_array(value: Any, path: Path, split: str, key: str) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, (list, tuple)):
        try:
            return np.asarray(value)
        except ValueError as e:
            raise SentimentDataError(f"{_where(path, split, key)}: cannot be read as an array ({e})") from None
    raise SentimentDataError(f"{_where(path, split, key)}: expected a numpy array, got {type(value).__name__}")


def _labels(value: Any, path: Path, split: str, key: str) -> np.ndarray:
    arr = _as_array(value, path, split, key)
    if arr.ndim == 0 or arr.shape[0] == 0:
        raise SentimentDataError(f"{_where(path, split, key)}: expected one label per sample, got shape "
                                 f"{list(arr.shape)}")
    if int(np.prod(arr.shape[1:])) != 1:
        raise SentimentDataError(f"{_where(path, split, key)}: expected shape (N,), (N, 1) or (N, 1, 1), got "
                                 f"{list(arr.shape)}")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise SentimentDataError(f"{_where(path, split, key)}: labels must be real numbers, got dtype {arr.dtype}")
    labels = arr.reshape(-1).astype(np.float32)
    lo, hi = LABEL_RANGE
    bad = np.flatnonzero(~((labels >= lo) & (labels <= hi)))  # also catches NaN
    if bad.size:
        i = int(bad[0])
        raise SentimentDataError(f"{_where(path, split, key)}, index {i}: label {float(labels[i]):g} is outside "
                                 f"[{lo:g}, {hi:g}] ({bad.size} such label(s))")
    return labels


def _features(value: Any, path: Path, split: str, key: str, n: int, fix_nonfinite: bool,
              fixed: dict[str, int]) -> np.ndarray:
    arr = _as_array(value, path, split, key)
    if arr.ndim != 3 or arr.shape[0] != n or arr.shape[1] == 0 or arr.shape[2] == 0:
        raise SentimentDataError(f"{_where(path, split, key)}: expected shape (N={n}, time, features), got "
                                 f"{list(arr.shape)}")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise SentimentDataError(f"{_where(path, split, key)}: features must be real numbers, got {arr.dtype}")
    feats = arr.astype(np.float32, copy=True)
    finite = np.isfinite(feats)
    if not finite.all():
        n_nan = int(np.isnan(feats).sum())
        n_inf = int(feats.size - finite.sum()) - n_nan
        if not fix_nonfinite:
            first = int(np.flatnonzero(~finite.reshape(n, -1).all(1))[0])
            raise SentimentDataError(
                f"{_where(path, split, key)}, index {first}: {n_nan} NaN and {n_inf} inf value(s) in this split's "
                f"features; pass --fix-nonfinite to set them to 0 (MOSEI's audio has known -inf values)")
        feats[~finite] = 0.0
        fixed[f"{split}/{key}"] = n_nan + n_inf
    return feats


def _lengths(value: Any, path: Path, split: str, key: str, n: int, max_len: int) -> np.ndarray:
    arr = _as_array(value, path, split, key).reshape(-1)
    if arr.shape[0] != n:
        raise SentimentDataError(f"{_where(path, split, key)}: expected {n} lengths, got {arr.shape[0]}")
    if not np.issubdtype(arr.dtype, np.number):
        raise SentimentDataError(f"{_where(path, split, key)}: lengths must be integers, got dtype {arr.dtype}")
    bad = np.flatnonzero((arr < 0) | (arr > max_len) | (arr != np.round(arr)))
    if bad.size:
        i = int(bad[0])
        raise SentimentDataError(f"{_where(path, split, key)}, index {i}: length {arr[i].item()!r} is not an "
                                 f"integer in [0, {max_len}] (the sequence length)")
    return arr.astype(np.int64)


def _text_lengths(value: Any, path: Path, split: str, n: int, max_len: int) -> np.ndarray:
    arr = _as_array(value, path, split, "text_bert")
    if arr.ndim != 3 or arr.shape[0] != n or arr.shape[1] != 3 or arr.shape[2] != max_len:
        raise SentimentDataError(f"{_where(path, split, 'text_bert')}: expected shape (N={n}, 3, {max_len}) "
                                 f"(token ids, mask, segment ids), got {list(arr.shape)}")
    mask = arr[:, 1, :]
    bad = np.flatnonzero(~np.isin(mask, (0, 1)).all(1))
    if bad.size:
        raise SentimentDataError(f"{_where(path, split, 'text_bert')}, index {int(bad[0])}: the attention mask "
                                 f"(row 1) must hold only 0 and 1")
    return mask.sum(1).astype(np.int64)


def _ids(value: Any, path: Path, split: str, n: int) -> list[str]:
    if value is None:
        return [f"{split}_{i}" for i in range(n)]
    arr = np.asarray(value, dtype=object)
    if arr.ndim == 0 or arr.shape[0] != n:
        raise SentimentDataError(f"{_where(path, split, 'id')}: expected {n} ids, got shape {list(arr.shape)}")
    return ["_".join(map(str, np.atleast_1d(v).tolist())) if arr.ndim > 1 else str(v) for v in arr]


def _check_consistent(splits: dict[str, SentimentSplit], path: Path) -> None:
    """Feature sizes must agree across splits: the model built on train has to read valid and test."""
    ref = {m: splits["train"].features[m].shape[2] for m in MODALITIES}
    for s in SPLITS[1:]:
        for m in MODALITIES:
            d = splits[s].features[m].shape[2]
            if d != ref[m]:
                raise SentimentDataError(f"{_where(path, s, m)}: {d} features per step, but split 'train' has "
                                         f"{ref[m]}")


def dataset_mismatch_hint(data: SentimentData, dataset: str) -> Optional[str]:
    """A warning when the audio/vision sizes look like the other dataset's (e.g. --dataset mosi on a MOSEI file)."""
    dims = data.feature_dims
    got = (dims["audio"], dims["vision"])
    for name, known in KNOWN_AUDIO_VISION_DIMS.items():
        if name != dataset and got == known:
            return (f"audio/vision feature sizes {got} are those of {name.upper()}, but --dataset {dataset} was "
                    f"given; the sizes from the file are used either way")
    return None
