"""Atomic file writes, for every report, figure, record and checkpoint this package writes.

Everything goes to a temporary file beside the target and is then moved into place with one ``os.replace``. A
reader, or a re-run after a kill, never sees half a file, and a failed write leaves no temporary file behind.
JSON is strict: NaN and inf become ``null``, because strict readers (browsers, ``jq``, most JSON libraries)
reject the bare ``NaN`` that Python writes by default.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

TMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path, suffix: str = TMP_SUFFIX) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (``.<name>.<random><suffix>``); on success it replaces ``path``.

    ``suffix`` is for writers that pick the format from the file name (``".tmp.nii.gz"``); leftovers of killed
    runs are found by :func:`leftover_temp_files` only with the default. The finished file gets the usual
    permissions (``mkstemp`` makes 0600 files). On an exception the temporary file is removed and ``path`` is
    left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def leftover_temp_files(folder: str | Path, name_glob: str = "*") -> list[Path]:
    """Temporary files that :func:`atomic_path` leaves only when the process is killed mid-write."""
    return sorted(Path(folder).glob(f".{name_glob}.*{TMP_SUFFIX}"))


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then move it into place."""
    with atomic_path(path) as tmp:
        write(tmp)


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def json_safe(value: Any) -> Any:
    """``value`` with NaN/inf floats (also NumPy scalars) replaced by None, recursively, for strict JSON."""
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(path: str | Path, obj: Any) -> None:
    """Strict JSON (NaN/inf as null), indented, written atomically."""
    write_text(path, json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n")


def save_figure(fig: Any, path: str | Path, **savefig_kwargs: Any) -> None:
    """Save a matplotlib figure atomically (the format is taken from ``path``'s suffix)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", **savefig_kwargs)


def output_folder_problem(path: str | Path, input_folder: str | Path | None = None) -> str | None:
    """Why ``path`` cannot be an output folder (a file, not writable, the input folder itself), or None.

    Checked before any expensive step (loading a model), so a typo costs a second, not a minute.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        return f"{path} is a file, not a folder"
    if input_folder is not None and path.resolve() == Path(input_folder).resolve():
        return f"{path} is the input folder; write the outputs elsewhere (they would be read as input next time)"
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, so {path} cannot be created"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None
