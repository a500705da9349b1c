"""``gmd_progress.png``: GMD's per-epoch statistics, drawn beside nnU-Net's ``progress.png``."""
from __future__ import annotations

from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from nnunet_gmd.atomic import save_figure  # noqa: E402


def draw_gmd_progress(conflicts: Sequence[float], modality_grad_norms: Sequence[Sequence[float]],
                      modality_names: Sequence[str]) -> plt.Figure:
    """Conflicting subset pairs per step and unimodal gradient norms (the paper's dominance indicator), per epoch.

    Drawn in matplotlib's default style: nnU-Net's own progress plot sets seaborn's ``font_scale=2.5`` for the
    whole process, at which these axis labels overlap.
    """
    epochs = np.arange(len(conflicts))
    with plt.style.context("default"):
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
        top.plot(epochs, conflicts, marker="o", color="tab:red")
        top.set_ylabel("conflicting subset\npairs per step")
        top.set_title("GMD gradient statistics")
        top.grid(alpha=0.3)
        norms = np.array([list(n) if len(n) else [np.nan] * len(modality_names) for n in modality_grad_norms],
                         dtype=float)
        for m, name in enumerate(modality_names):
            if norms.size:
                bottom.plot(epochs, norms[:, m], marker="o", label=name)
        bottom.set_ylabel("unimodal-subset\ngradient norm")
        bottom.set_xlabel("epoch")
        bottom.grid(alpha=0.3)
        bottom.legend()
        fig.tight_layout()
    return fig


def plot_gmd_progress(conflicts: Sequence[float], modality_grad_norms: Sequence[Sequence[float]],
                      modality_names: Sequence[str], path: str) -> None:
    """:func:`draw_gmd_progress`, written atomically to ``path`` (a PNG)."""
    fig = draw_gmd_progress(conflicts, modality_grad_norms, modality_names)
    try:
        save_figure(fig, path)
    finally:
        plt.close(fig)
