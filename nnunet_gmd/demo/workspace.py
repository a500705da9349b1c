"""One output folder per run: nnU-Net's three folders, logs, reports and "step finished" markers.

Re-running a command with the same output folder reuses every finished step. The settings a folder was made
with are stored in it; asking for different settings in the same folder is refused (``--fresh`` starts over),
so a reused step can never silently belong to another configuration.

Training repeats (``--seeds``) are not settings: seed 0 lives where a single run always lived (``nnUNet_results``,
``reports/<method>``, steps ``train_<method>``), seed k > 0 beside it (``nnUNet_results_seed<k>``,
``reports_seed<k>/<method>``, steps ``train_<method>_seed<k>``), so more seeds only add steps to a folder.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

from nnunet_gmd.atomic import write_json
from nnunet_gmd.errors import UserError
from nnunet_gmd.nnunet import ext_trainer_path

SETTINGS_FILE = "settings.json"


def seed_suffix(seed: int) -> str:
    """What seed ``seed`` appends to folder and step names: nothing for seed 0 (the single-run layout)."""
    if seed < 0:
        raise ValueError(f"seeds are non-negative, got {seed}")
    return "" if seed == 0 else f"_seed{seed}"


def reports_root(root: Path, seed: int = 0) -> Path:
    """Folder of the per-method evaluation reports of training seed ``seed`` in run folder ``root``."""
    return Path(root) / f"reports{seed_suffix(seed)}"


def results_root(root: Path, seed: int = 0) -> Path:
    """``nnUNet_results`` of training seed ``seed`` (each seed trains into its own tree; nnU-Net has no seed)."""
    return Path(root) / f"nnUNet_results{seed_suffix(seed)}"


class Workspace:
    """Folders of one run below ``root``, and the bookkeeping of which steps are done."""

    def __init__(self, root: Path, settings: dict, fresh: bool = False) -> None:
        self.root = Path(root).resolve()
        if fresh and self.root.exists():
            if not (self.root / SETTINGS_FILE).is_file() and any(self.root.iterdir()):
                raise UserError(f"{self.root} exists and was not made by nnunet-gmd; refusing to delete it "
                                f"(pick another output folder)")
            shutil.rmtree(self.root)
        settings_file = self.root / SETTINGS_FILE
        if settings_file.is_file():
            previous = json.loads(settings_file.read_text())
            if previous != json.loads(json.dumps(settings)):
                changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
                raise UserError(f"{self.root} holds a run with other settings ({', '.join(changed)} differ); "
                                f"pass --fresh to start over there, or choose another output folder")
        elif self.root.exists() and any(p.name != "logs" for p in self.root.iterdir()):
            raise UserError(f"{self.root} is not empty and holds no nnunet-gmd run; choose another output folder")
        self.root.mkdir(parents=True, exist_ok=True)
        write_json(settings_file, settings)
        self.raw = self.root / "nnUNet_raw"
        self.preprocessed = self.root / "nnUNet_preprocessed"
        self.results = results_root(self.root)
        self.logs = self.root / "logs"
        self.reports = reports_root(self.root)
        self._steps = self.root / "steps"
        for folder in (self.raw, self.preprocessed, self.results, self.logs, self.reports, self._steps):
            folder.mkdir(parents=True, exist_ok=True)
        self.timings: dict[str, float] = {}

    def env(self, extra: Optional[dict[str, str]] = None) -> dict[str, str]:
        """Environment for nnU-Net tools: this run's folders and our trainers (``nnUNet_extTrainer``)."""
        env = dict(os.environ)
        env.update({"nnUNet_raw": str(self.raw), "nnUNet_preprocessed": str(self.preprocessed),
                    "nnUNet_results": str(self.results), "nnUNet_extTrainer": str(ext_trainer_path()),
                    "PYTHONUNBUFFERED": "1"})
        env.update(extra or {})
        return env

    def is_done(self, step: str) -> bool:
        return (self._steps / f"{step}.done").is_file()

    def run_step(self, step: str, title: str, fn: Callable[[], object]) -> bool:
        """Run ``fn`` unless ``step`` finished before; returns whether it ran. Timings land in ``timings``."""
        if self.is_done(step):
            print(f"- {title}: done before, reused")
            return False
        print(f"- {title} ...", flush=True)
        start = time.monotonic()
        fn()
        elapsed = time.monotonic() - start
        self.timings[step] = round(elapsed, 1)
        write_json(self._steps / f"{step}.done", {"seconds": round(elapsed, 1), "finished": time.time()})
        print(f"  {title}: {elapsed:.0f} s", flush=True)
        return True

    def step_seconds(self) -> dict[str, float]:
        """Wall-clock seconds of every finished step, including those of earlier invocations."""
        out = {}
        for marker in sorted(self._steps.glob("*.done")):
            out[marker.stem] = json.loads(marker.read_text()).get("seconds", float("nan"))
        return out
