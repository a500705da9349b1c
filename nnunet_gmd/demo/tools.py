"""Run nnU-Net's command-line tools (and our own) as child processes, with a log file and a progress bar.

Child processes get this run's ``nnUNet_*`` folders in their environment; nnU-Net reads those once at import,
so they cannot be switched inside one Python process. The full output goes to a log file; the console shows a
tqdm bar (epochs while training) and, on failure, the log's last lines.
"""
from __future__ import annotations

import re
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Optional, Sequence

from tqdm import tqdm

from nnunet_gmd.errors import UserError

_EPOCH = re.compile(r"\bEpoch (\d+)\s*$")
_PSEUDO_DICE = re.compile(r"Pseudo dice \[(.*)\]")
_EPOCH_TIME = re.compile(r"Epoch time: ([\d.]+) s")
_TQDM_COUNT = re.compile(r"(\d+)/(\d+) \[")


def tool(name: str) -> str:
    """Path of a console script installed next to this Python (nnUNetv2_*), so no PATH setup is needed."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def nnunet_gmd_command(*args: str) -> list[str]:
    """``nnunet-gmd ARGS`` through the current interpreter, so no PATH set-up is needed."""
    return [sys.executable, "-m", "nnunet_gmd", *args]


def _short(line: str, width: int = 60) -> str:
    line = re.sub(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: ", "", line.strip())
    return line if len(line) <= width else line[: width - 3] + "..."


def run_tool(command: Sequence[str], env: dict[str, str], log_path: Path, desc: str,
             total_epochs: Optional[int] = None, cwd: Optional[Path] = None) -> None:
    """Run ``command``; its output goes to ``log_path``. Raises :class:`UserError` naming the log on failure.

    With ``total_epochs`` the bar counts nnU-Net's "Epoch N" lines and shows the latest pseudo Dice;
    otherwise it follows tqdm counters printed by the tool, or shows the latest output line.
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    tail: deque[str] = deque(maxlen=25)
    # Off a terminal (CI logs) refresh rarely, so the log gets a few progress lines rather than thousands.
    bar = tqdm(total=total_epochs, desc=desc, unit="epoch" if total_epochs else "it", leave=True,
               dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30,
               bar_format=None if total_epochs else "{desc}: {elapsed} {postfix}")
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        try:
            proc = subprocess.Popen(list(command), env=env, cwd=cwd, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, bufsize=1, errors="replace")
        except FileNotFoundError:
            bar.close()
            raise UserError(f"cannot run {command[0]}: not installed (is nnU-Net v2 installed in this "
                            f"environment?)") from None
        assert proc.stdout is not None
        try:
            for raw in proc.stdout:
                log.write(raw)
                for line in raw.replace("\r", "\n").splitlines():
                    if not line.strip():
                        continue
                    tail.append(line)
                    _update_bar(bar, line, total_epochs)
            proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
            raise
        finally:
            bar.close()
    if proc.returncode != 0:
        last = "\n    ".join(tail)
        raise UserError(f"{desc} failed (exit code {proc.returncode}); full log: {log_path}\n  last lines:\n    {last}")


def _update_bar(bar: tqdm, line: str, total_epochs: Optional[int]) -> None:
    if total_epochs:
        if m := _EPOCH.search(line):
            if int(m.group(1)) != bar.n:   # resumed (--c): jump to the epoch nnU-Net continues from
                bar.n = int(m.group(1))
                bar.refresh()
        elif m := _PSEUDO_DICE.search(line):
            values = re.findall(r"[-\d.]+(?=\)|,|$)", m.group(1).replace("np.float32(", ""))
            bar.set_postfix_str("pseudo Dice " + " ".join(v[:5] for v in values), refresh=False)
        elif _EPOCH_TIME.search(line):
            bar.update(1)   # the epoch just finished
        return
    if m := _TQDM_COUNT.search(line):
        bar.set_postfix_str(f"{line.split(':')[0][:40]} {m.group(1)}/{m.group(2)}", refresh=False)
    else:
        bar.set_postfix_str(_short(line), refresh=False)
    bar.update(0)   # redraws at most every mininterval
