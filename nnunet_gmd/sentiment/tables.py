"""Utterance-level feature tables: one table per modality plus ``labels.csv``, joined by ``utterance_id``.

A folder is recognised by its layout (``labels.csv`` beside ``text``/``audio``/``vision`` as ``.csv`` or
``.npz``). An utterance that has no row in a modality's table is genuinely missing that modality; it is never
imputed. Every bad input names the file, the row and the id, because a silently misjoined table would
corrupt a whole benchmark without any visible symptom.

* ``<modality>.csv``: header ``utterance_id, f0, f1, ...``; one row per utterance that has the modality.
* ``<modality>.npz``: arrays ``utterance_id`` (N,) and ``features`` (N, d).
* ``labels.csv``: ``utterance_id, video_id, sentiment`` (in [-3, 3]) and optionally ``transcript``.

CSV rows are counted as a spreadsheet shows them (the header is row 1); ``.npz`` entries by their index.
"""
from __future__ import annotations

import csv
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from nnunet_gmd.sentiment import MODALITIES
from nnunet_gmd.sentiment.data import LABEL_RANGE, SentimentData, SentimentDataError, SentimentSplit

LABELS_FILE = "labels.csv"
LABEL_COLUMNS: tuple[str, ...] = ("utterance_id", "video_id", "sentiment")
ID_COLUMN = "utterance_id"
TABLE_SUFFIXES: tuple[str, ...] = (".csv", ".npz")


def is_table_folder(path: str | Path) -> bool:
    """True for a folder holding ``labels.csv``: the layout is what tells tables from pickles."""
    path = Path(path)
    return path.is_dir() and (path / LABELS_FILE).is_file()


@dataclass
class UtteranceTable:
    """All utterances of a folder; ``features[m]`` is (N, d_m) with zeros where ``available[:, m]`` is False."""

    path: Path
    ids: list[str]
    video_ids: list[str]
    labels: np.ndarray  # (N,) float32
    features: dict[str, np.ndarray]
    available: np.ndarray  # (N, M) bool, MODALITIES order
    transcripts: Optional[list[str]] = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def videos(self) -> list[str]:
        """Video ids in order of first appearance."""
        return list(dict.fromkeys(self.video_ids))

    @property
    def feature_dims(self) -> dict[str, int]:
        return {m: int(self.features[m].shape[1]) for m in MODALITIES}

    def select(self, index: Sequence[int] | np.ndarray) -> "UtteranceTable":
        index = np.asarray(index, dtype=np.int64)
        return UtteranceTable(self.path, [self.ids[i] for i in index], [self.video_ids[i] for i in index],
                              self.labels[index], {m: f[index] for m, f in self.features.items()},
                              self.available[index],
                              None if self.transcripts is None else [self.transcripts[i] for i in index])

    def select_videos(self, videos: Sequence[str]) -> "UtteranceTable":
        wanted = set(videos)
        return self.select([i for i, v in enumerate(self.video_ids) if v in wanted])

    def to_split(self) -> SentimentSplit:
        """The length-1 sequences the trainers read: (N, 1, d) per modality and the availability mask."""
        return SentimentSplit(features={m: self.features[m][:, None, :] for m in MODALITIES},
                              lengths={m: None for m in MODALITIES}, labels=self.labels, ids=list(self.ids),
                              available=self.available.copy(), video_ids=list(self.video_ids))

    def describe(self) -> str:
        have = ", ".join(f"{m} {int(self.available[:, i].sum())}" for i, m in enumerate(MODALITIES))
        dims = ", ".join(f"{m} {d}" for m, d in self.feature_dims.items())
        return (f"{self.path.name}: utterance tables; {len(self)} utterances from {len(self.videos)} videos; "
                f"utterances with each modality: {have}; feature sizes: {dims}")


# ---------------------------------------------------------------------------- splitting by video
DEFAULT_VALID_FRACTION = 0.15  # of a training folder's videos, when --valid-videos is not given


def default_valid_videos(table: UtteranceTable) -> int:
    return max(1, round(DEFAULT_VALID_FRACTION * len(table.videos)))


def pick_valid_videos(table: UtteranceTable, k: int, seed: int) -> list[str]:
    """``k`` whole videos drawn with ``seed``: utterances of one speaker never straddle train and valid."""
    videos = table.videos
    if not 1 <= k < len(videos):
        raise SentimentDataError(f"{table.path}: --valid-videos must be in [1, {len(videos) - 1}] (the folder has "
                                 f"{len(videos)} videos), got {k}")
    order = np.random.default_rng(seed).permutation(len(videos))
    return sorted(videos[i] for i in order[:k])


def video_folds(table: UtteranceTable, k: int, seed: int = 0) -> list[list[str]]:
    """``k`` disjoint groups of whole videos (seeded shuffle, then near-equal numbers of videos per fold)."""
    videos = table.videos
    if not 2 <= k <= len(videos):
        raise SentimentDataError(f"{table.path}: --cv must be in [2, {len(videos)}] (one video per fold at most), "
                                 f"got {k}")
    order = np.random.default_rng(seed).permutation(len(videos))
    return [sorted(videos[i] for i in part) for part in np.array_split(order, k)]


def split_by_videos(table: UtteranceTable, valid_videos: Sequence[str]) -> SentimentData:
    """Train on every other video, select the model on ``valid_videos``."""
    valid = set(valid_videos)
    train_rows = [i for i, v in enumerate(table.video_ids) if v not in valid]
    valid_rows = [i for i, v in enumerate(table.video_ids) if v in valid]
    splits = {"train": table.select(train_rows).to_split(), "valid": table.select(valid_rows).to_split()}
    return SentimentData(path=table.path, format="table", aligned=True, splits=splits)


def whole_folder(table: UtteranceTable) -> SentimentData:
    """Every utterance as one ``test`` split: what ``sentiment evaluate --data FOLDER`` scores."""
    return SentimentData(path=table.path, format="table", aligned=True, splits={"test": table.to_split()})


# ---------------------------------------------------------------------------- loading
def load_table_folder(path: str | Path) -> UtteranceTable:
    """Read and join ``labels.csv`` and the three modality tables of ``path``; see the module docstring."""
    folder = Path(path)
    if not folder.is_dir():
        raise SentimentDataError(f"{folder}: no such folder")
    if not (folder / LABELS_FILE).is_file():
        raise SentimentDataError(f"{folder}: no {LABELS_FILE}; a table folder needs {LABELS_FILE} and "
                                 f"{', '.join(m + '.csv|.npz' for m in MODALITIES)}")
    ids, video_ids, labels, transcripts = _read_labels(folder / LABELS_FILE)
    row_of = {u: i for i, u in enumerate(ids)}
    features, available, sources = {}, np.zeros((len(ids), len(MODALITIES)), dtype=bool), []
    for mi, m in enumerate(MODALITIES):
        file = _modality_file(folder, m)
        sources.append(file.name)
        table_ids, rows, values = _read_modality(file)
        out = np.zeros((len(ids), values.shape[1]), dtype=np.float32)
        for t_id, row, vec in zip(table_ids, rows, values):
            if t_id not in row_of:
                raise SentimentDataError(f"{file}, {row} (utterance_id {t_id!r}): no such utterance in "
                                         f"{LABELS_FILE}")
            out[row_of[t_id]] = vec
            available[row_of[t_id], mi] = True
        features[m] = out
    empty = np.flatnonzero(~available.any(1))
    if empty.size:
        i = int(empty[0])
        raise SentimentDataError(f"{folder / LABELS_FILE}, row {i + 2} (utterance_id {ids[i]!r}): no row in any of "
                                 f"{', '.join(sources)} ({empty.size} such utterance(s)); an utterance needs at "
                                 f"least one modality")
    return UtteranceTable(folder, ids, video_ids, labels, features, available, transcripts)


def _modality_file(folder: Path, modality: str) -> Path:
    found = [folder / f"{modality}{s}" for s in TABLE_SUFFIXES if (folder / f"{modality}{s}").is_file()]
    if not found:
        raise SentimentDataError(f"{folder}: no {modality}.csv or {modality}.npz (a modality that some utterances "
                                 f"lack still needs its table; leave those utterances' rows out)")
    if len(found) > 1:
        raise SentimentDataError(f"{folder}: both {modality}.csv and {modality}.npz exist; keep one")
    return found[0]


def _csv_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheet exports start with a BOM
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise SentimentDataError(f"{path}: not a readable CSV file ({type(e).__name__}: {e})") from None
    if not rows:
        raise SentimentDataError(f"{path}: empty file (expected a header row)")
    header = [h.strip() for h in rows[0]]
    body = rows[1:]
    for r, row in enumerate(body, start=2):
        if len(row) != len(header):
            first = row[0] if row else ""
            raise SentimentDataError(f"{path}, row {r} (utterance_id {first!r}): {len(row)} cell(s), but the "
                                     f"header has {len(header)}")
    return header, body


def _check_ids(path: Path, ids: Sequence[str], where: Sequence[str]) -> None:
    """Ids must be non-empty and unique; ``where[i]`` names entry i as ``row 5`` or ``index 3``."""
    seen: dict[str, str] = {}
    for u, w in zip(ids, where):
        if not u:
            raise SentimentDataError(f"{path}, {w}: empty utterance_id")
        if u in seen:
            raise SentimentDataError(f"{path}, {w} (utterance_id {u!r}): duplicate id (first at {seen[u]})")
        seen[u] = w


def _read_labels(path: Path) -> tuple[list[str], list[str], np.ndarray, Optional[list[str]]]:
    header, body = _csv_rows(path)
    missing = [c for c in LABEL_COLUMNS if c not in header]
    if missing:
        raise SentimentDataError(f"{path}: missing column(s) {missing}; found {header}")
    if not body:
        raise SentimentDataError(f"{path}: no utterances (only a header row)")
    col = {c: header.index(c) for c in header}
    ids = [row[col[ID_COLUMN]].strip() for row in body]
    where = [f"row {r}" for r in range(2, len(body) + 2)]
    _check_ids(path, ids, where)
    lo, hi = LABEL_RANGE
    labels = np.empty(len(body), dtype=np.float32)
    video_ids = []
    for i, row in enumerate(body):
        video = row[col["video_id"]].strip()
        if not video:
            raise SentimentDataError(f"{path}, {where[i]} (utterance_id {ids[i]!r}): empty video_id")
        video_ids.append(video)
        cell = row[col["sentiment"]].strip()
        try:
            value = float(cell)
        except ValueError:
            raise SentimentDataError(f"{path}, {where[i]} (utterance_id {ids[i]!r}): sentiment {cell!r} is not a "
                                     f"number") from None
        if not lo <= value <= hi:  # also refuses NaN
            raise SentimentDataError(f"{path}, {where[i]} (utterance_id {ids[i]!r}): sentiment {value:g} is "
                                     f"outside [{lo:g}, {hi:g}]")
        labels[i] = value
    transcripts = [row[col["transcript"]] for row in body] if "transcript" in col else None
    return ids, video_ids, labels, transcripts


def _read_modality(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """Ids, their row names and the (n, d) float32 features of one modality table."""
    if path.suffix == ".npz":
        return _read_npz(path)
    header, body = _csv_rows(path)
    if not header or header[0] != ID_COLUMN:
        raise SentimentDataError(f"{path}: the first column must be '{ID_COLUMN}', found "
                                 f"{header[0] if header else 'nothing'!r}")
    if len(header) < 2:
        raise SentimentDataError(f"{path}: no feature columns after '{ID_COLUMN}'")
    ids = [row[0].strip() for row in body]
    where = [f"row {r}" for r in range(2, len(body) + 2)]
    _check_ids(path, ids, where)
    cells = [row[1:] for row in body]
    try:
        values = np.array(cells, dtype=np.float64).reshape(len(body), len(header) - 1)
    except ValueError:
        for i, row in enumerate(cells):
            for c, cell in enumerate(row):
                try:
                    float(cell)
                except ValueError:
                    raise SentimentDataError(f"{path}, {where[i]} (utterance_id {ids[i]!r}), column "
                                             f"{header[c + 1]!r}: {cell!r} is not a number") from None
        raise SentimentDataError(f"{path}: the feature cells cannot be read as numbers") from None
    _check_finite(path, values, ids, where, header[1:])
    return ids, where, values.astype(np.float32)


def _read_npz(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise SentimentDataError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    for key in (ID_COLUMN, "features"):
        if key not in arrays:
            raise SentimentDataError(f"{path}: missing array '{key}'; found {sorted(arrays)} (expected "
                                     f"'{ID_COLUMN}' (N,) and 'features' (N, d))")
    raw_ids, feats = arrays[ID_COLUMN], arrays["features"]
    if raw_ids.ndim != 1 or feats.ndim != 2 or feats.shape[0] != raw_ids.shape[0] or feats.shape[1] == 0:
        raise SentimentDataError(f"{path}: expected '{ID_COLUMN}' (N,) and 'features' (N, d), got shapes "
                                 f"{list(raw_ids.shape)} and {list(feats.shape)}")
    ids = [str(u).strip() for u in raw_ids.tolist()]
    where = [f"index {i}" for i in range(len(ids))]
    _check_ids(path, ids, where)
    if not np.issubdtype(feats.dtype, np.number) or np.issubdtype(feats.dtype, np.complexfloating):
        raise SentimentDataError(f"{path}: 'features' must hold real numbers, got dtype {feats.dtype}")
    values = feats.astype(np.float64)
    _check_finite(path, values, ids, where, [f"{j}" for j in range(values.shape[1])])
    return ids, where, values.astype(np.float32)


def _check_finite(path: Path, values: np.ndarray, ids: Sequence[str], where: Sequence[str],
                  columns: Sequence[str]) -> None:
    bad = np.argwhere(~np.isfinite(values))
    if bad.size:
        i, c = (int(x) for x in bad[0])
        raise SentimentDataError(f"{path}, {where[i]} (utterance_id {ids[i]!r}), column {columns[c]!r}: "
                                 f"{float(values[i, c])!r} is not finite ({len(bad)} such value(s)); leave an "
                                 f"utterance's row out to mark the modality missing")
