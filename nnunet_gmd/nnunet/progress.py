"""``gmd_progress.png``: GMD's per-epoch statistics, drawn beside nnU-Net's ``progress.png``."""
from __future__ import annotations

from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from nnunet_gmd.atomic import save_figure  # noqa: E402


def plot_gmd_progress(conflicts: Sequence[float], modality_grad_norms: Sequence[Sequence[float]],
                      modality_names: Sequence[str], path: str) -> None:
    """Conflicting subset pairs per step and unimodal gradient norms (the paper's dominance indicator), per epoch."""
    epochs = np.arange(len(conflicts))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 8), sharex=True)
    top.plot(epochs, conflicts, marker="o", color="tab:red")
    top.set_ylabel("conflicting subset pairs / step")
    top.set_title("GMD gradient statistics")
    norms = np.array([list(n) if len(n) else [np.nan] * len(modality_names) for n in modality_grad_norms], dtype=float)
    for m, name in enumerate(modality_names):
        if norms.size:
            bottom.plot(epochs, norms[:, m], marker="o", label=name)
    bottom.set_ylabel("unimodal-subset gradient norm")
    bottom.set_xlabel("epoch")
    bottom.legend()
    fig.tight_layout()
    try:
        save_figure(fig, path)
    finally:
        plt.close(fig)
