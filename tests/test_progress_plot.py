"""gmd_progress.png stays legible after nnU-Net's progress plot has enlarged every font in the process."""
import numpy as np
import pytest

from nnunet_gmd.nnunet.progress import draw_gmd_progress, plot_gmd_progress

sns = pytest.importorskip("seaborn", reason="seaborn comes with nnunetv2, whose progress plot sets its style")


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_axis_labels_do_not_overlap_after_nnunets_seaborn_font_scale(tmp_path):
    import matplotlib
    import matplotlib.pyplot as plt

    sns.set(font_scale=2.5)  # what nnU-Net's plot_progress_png does
    try:
        conflicts = list(np.linspace(0, 1.2, 40))
        norms = [list(np.full(4, 0.5 + e / 40)) for e in range(40)]
        fig = draw_gmd_progress(conflicts, norms, ["t1", "t1ce", "t2", "flair"])
        top, bottom = fig.axes
        assert top.yaxis.label.get_size() == pytest.approx(matplotlib.rcParamsDefault["font.size"])
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        labels = [ax.yaxis.label.get_window_extent(renderer) for ax in (top, bottom)]
        assert not _overlap(*labels)
        assert all(label.x0 >= 0 for label in labels)  # inside the figure
        plt.close(fig)
        plot_gmd_progress(conflicts, norms, ["t1", "t1ce", "t2", "flair"], str(tmp_path / "gmd_progress.png"))
        assert (tmp_path / "gmd_progress.png").stat().st_size > 1000
    finally:
        sns.reset_orig()
