"""The subsets x regions x methods results of a run: Markdown, CSV, JSON and a plot.

Reads the reports of ``nnunet-gmd evaluate``. Besides the mean over all 15 subsets (the paper's headline) it
gives the mean over the 14 subsets with at least one missing modality, which is what missing-modality methods
are for, and the full-modality row on its own. It also averages by how many sequences are available (1 to 4),
because late-fusion and early-fusion models trade places there: one can win every single-sequence subset and lose
every three-sequence one with the same missing-modality mean.

A method may come with one report per training seed: its Dice is then the mean over the seeds, and the means
table adds the standard deviation over seeds of each seed's mean (``mean ± sd``).
"""
from __future__ import annotations

import csv
import io
import math
import warnings
from pathlib import Path
from typing import Sequence, Union

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from nnunet_gmd.atomic import save_figure, write_json, write_text  # noqa: E402
from nnunet_gmd.report import comparison_rows, load_report  # noqa: E402

SHORT_REGION = {"whole tumor": "WT", "tumor core": "TC", "enhancing tumor": "ET"}
MEAN_KINDS = ("all subsets", "missing modalities", "full set")
ReportPaths = Union[Path, str, Sequence[Union[Path, str]]]   # one report, or one per training seed


def _fmt(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.3f}"


def _short(region: str) -> str:
    return SHORT_REGION.get(region, region)


class Results:
    """Dice per (subset, region, method), from one report per method, or one per method and training seed."""

    def __init__(self, report_paths: Sequence[ReportPaths], labels: Sequence[str]) -> None:
        self.labels = list(labels)
        groups = [[p] if isinstance(p, (str, Path)) else list(p) for p in report_paths]
        if any(not g for g in groups):
            raise ValueError("every method needs at least one report")
        self.n_seeds = [len(g) for g in groups]
        self.reports = [load_report(p) for g in groups for p in g]      # method-major, seeds within
        self.owner = np.repeat(np.arange(len(groups)), self.n_seeds)    # method of each report
        self.regions = list(self.reports[0].regions)
        self.channels = list(self.reports[0].channels)
        self.cases = list(self.reports[0].cases)
        tables = {region: comparison_rows(self.reports, region) for region in self.regions}
        self.subsets = tables[self.regions[0]][0]
        self.dice_per_report = np.stack([tables[r][1] for r in self.regions], axis=1)  # subsets x regions x reports
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)     # a value undefined under every seed stays NaN
            self.dice = np.stack([np.nanmean(self.dice_per_report[..., self.owner == j], axis=-1)
                                  for j in range(len(groups))], axis=-1)     # subsets x regions x methods
        full = "+".join(self.channels)
        self.is_full = np.array([s == full for s in self.subsets])
        self.n_available = np.array([s.count("+") + 1 for s in self.subsets])   # sequences in each subset

    @property
    def multi_seed(self) -> bool:
        return max(self.n_seeds) > 1

    def _means_of(self, dice: np.ndarray) -> dict[str, np.ndarray]:
        rows = {"all subsets": np.ones_like(self.is_full), "missing modalities": ~self.is_full,
                "full set": self.is_full}
        out = {}
        for kind, keep in rows.items():
            with np.errstate(all="ignore"):
                sel = dice[keep]
                out[kind] = np.nanmean(sel, axis=0) if sel.size and not np.all(np.isnan(sel)) else \
                    np.full(dice.shape[1:], np.nan)
        return out

    def means(self) -> dict[str, np.ndarray]:
        """kind -> regions x methods mean Dice (NaN-aware) over all / missing-modality / full subsets."""
        return self._means_of(self.dice)

    def seed_means(self) -> dict[str, np.ndarray]:
        """kind -> (regions + 1) x reports: each report's (= each seed's) means, the mean over regions last."""
        means = self._means_of(self.dice_per_report)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return {k: np.vstack([v, np.nanmean(v, axis=0, keepdims=True)]) for k, v in means.items()}

    def seed_sd(self) -> dict[str, np.ndarray]:
        """kind -> (regions + 1) x methods: standard deviation (ddof 1) over seeds of the seed means; NaN for 1 seed."""
        out = {}
        for kind, values in self.seed_means().items():
            sd = np.full((values.shape[0], len(self.labels)), np.nan)
            for j in range(len(self.labels)):
                if self.n_seeds[j] > 1:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", RuntimeWarning)
                        sd[:, j] = np.nanstd(values[:, self.owner == j], axis=1, ddof=1)
            out[kind] = sd
        return out

    def by_count(self) -> tuple[list[int], np.ndarray, np.ndarray]:
        """Region- and subset-averaged Dice per number of available sequences.

        Returns the counts, a counts x methods array of means (of the seed-averaged Dice) and a counts x methods
        array of the standard deviation over seeds of each seed's mean (NaN for one seed).
        """
        counts = sorted(set(int(k) for k in self.n_available))
        mean = np.full((len(counts), len(self.labels)), np.nan)
        sd = np.full_like(mean, np.nan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)     # a method undefined on every value stays NaN
            for i, k in enumerate(counts):
                mean[i] = np.nanmean(self.dice[self.n_available == k], axis=(0, 1))
                per_report = np.nanmean(self.dice_per_report[self.n_available == k], axis=(0, 1))
                for j in range(len(self.labels)):
                    if self.n_seeds[j] > 1:
                        sd[i, j] = np.nanstd(per_report[self.owner == j], ddof=1)
        return counts, mean, sd

    def _cell(self, mean: float, sd: float) -> str:
        return _fmt(mean) if not self.multi_seed or math.isnan(sd) else f"{_fmt(mean)} ± {sd:.3f}"

    # ------------------------------------------------------------------------------------------ text forms
    def to_markdown(self, title: str, details: Sequence[str] = ()) -> str:
        lines = [f"# {title}", ""] + [f"- {d}" for d in details] + ([""] if details else [])
        lines += ["## Mean Dice per method", "",
                  "| method | " + " | ".join(f"{_short(r)} ({k})" for k in MEAN_KINDS[:2] for r in self.regions)
                  + " | mean (all) | mean (missing) | mean (full set) |",
                  "|---|" + "---:|" * (2 * len(self.regions) + 3)]
        means, sd = self.means(), self.seed_sd()
        n_r = len(self.regions)
        for j, label in enumerate(self.labels):
            cells = [self._cell(means[k][i, j], sd[k][i, j]) for k in MEAN_KINDS[:2] for i in range(n_r)]
            cells += [self._cell(float(np.nanmean(means[k][:, j])), sd[k][n_r, j]) for k in MEAN_KINDS]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        if self.multi_seed:
            lines += ["", "Training seeds per method: " + ", ".join(f"{m} {n}" for m, n in zip(self.labels,
                                                                                        self.n_seeds))
                      + ". Each value is the mean over the seeds; ± is the standard deviation over seeds of each "
                        "seed's mean (ddof 1). The subset table below shows seed means."]
        counts, by_count, by_count_sd = self.by_count()
        n_subsets = [int((self.n_available == k).sum()) for k in counts]
        lines += ["", "## Mean Dice by number of available sequences", "",
                  "| method | " + " | ".join(f"{k} of {len(self.channels)} ({n} subsets)"
                                            for k, n in zip(counts, n_subsets))
                  + " |",
                  "|---|" + "---:|" * len(counts)]
        for j, label in enumerate(self.labels):
            lines.append(f"| {label} | " + " | ".join(self._cell(by_count[i, j], by_count_sd[i, j])
                                                      for i in range(len(counts))) + " |")
        lines += ["", f"## Dice per available subset ({len(self.subsets)} subsets x {len(self.regions)} regions x "
                      f"{len(self.labels)} methods)", "",
                  "| available | " + " | ".join(f"{_short(r)} {m}" for r in self.regions for m in self.labels) + " |",
                  "|---|" + "---:|" * (len(self.regions) * len(self.labels))]
        for s, name in enumerate(self.subsets):
            cells = []
            for i in range(len(self.regions)):
                row = self.dice[s, i]
                best = np.nanmax(row) if not np.all(np.isnan(row)) else np.nan
                cells += [f"**{_fmt(v)}**" if len(self.labels) > 1 and v == best else _fmt(v) for v in row]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append("WT whole tumor, TC tumor core, ET enhancing tumor; bold: best method per subset and region. "
                     "\"missing\" averages the subsets with at least one absent modality.")
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        # Several seeds add two columns; a single-seed run keeps the one-seed format.
        w.writerow(["available", "n_available", "region", "method", "dice"]
                   + (["seeds", "dice_sd_over_seeds"] if self.multi_seed else []))
        for s, name in enumerate(self.subsets):
            for i, region in enumerate(self.regions):
                for j, label in enumerate(self.labels):
                    v = self.dice[s, i, j]
                    row = [name, int(self.n_available[s]), region, label, "" if math.isnan(v) else f"{v:.6f}"]
                    if self.multi_seed:
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore", RuntimeWarning)   # undefined under every seed
                            sd = (np.nanstd(self.dice_per_report[s, i, self.owner == j], ddof=1)
                                  if self.n_seeds[j] > 1 else math.nan)
                        row += [self.n_seeds[j], "" if math.isnan(sd) else f"{sd:.6f}"]
                    w.writerow(row)
        return buf.getvalue()

    def to_json(self) -> dict:
        def clean(x: float):
            return None if math.isnan(x) else round(float(x), 6)
        means, sd, per_seed = self.means(), self.seed_sd(), self.seed_means()
        counts, by_count, by_count_sd = self.by_count()
        names = [*self.regions, "mean"]
        return {
            "methods": self.labels, "regions": self.regions, "channels": self.channels, "test_cases": self.cases,
            "dice": {name: {r: {m: clean(self.dice[s, i, j]) for j, m in enumerate(self.labels)}
                            for i, r in enumerate(self.regions)} for s, name in enumerate(self.subsets)},
            "mean_dice": {k: {m: {**{r: clean(means[k][i, j]) for i, r in enumerate(self.regions)},
                                  "mean": clean(float(np.nanmean(means[k][:, j])))}
                              for j, m in enumerate(self.labels)} for k in MEAN_KINDS},
            "mean_dice_by_available_count": {
                str(k): {m: {"mean": clean(by_count[i, j]), "sd_over_seeds": clean(by_count_sd[i, j])}
                         for j, m in enumerate(self.labels)} for i, k in enumerate(counts)},
            "seeds": dict(zip(self.labels, self.n_seeds)),
            "mean_dice_sd_over_seeds": {k: {m: {r: clean(sd[k][i, j]) for i, r in enumerate(names)}
                                            for j, m in enumerate(self.labels)} for k in MEAN_KINDS},
            "mean_dice_per_seed": {k: {m: {r: [clean(v) for v in per_seed[k][i, self.owner == j]]
                                           for i, r in enumerate(names)}
                                       for j, m in enumerate(self.labels)} for k in MEAN_KINDS},
        }

    # ------------------------------------------------------------------------------------------ plot
    def plot(self, path: Path, title: str) -> None:
        """Per region: Dice of every method on every subset (left), and the mean bars (right); in the last row, the
        mean Dice by number of available sequences, where late and early fusion part ways."""
        n_r = len(self.regions)
        fig = plt.figure(figsize=(15, 3.2 * (n_r + 1)))
        grid = fig.add_gridspec(n_r + 1, 2, width_ratios=[3.2, 1])
        axes = np.array([[fig.add_subplot(grid[i, 0]), fig.add_subplot(grid[i, 1])] for i in range(n_r)])
        x = np.arange(len(self.subsets))
        means, sd = self.means(), self.seed_sd()
        width = 0.8 / max(1, len(self.labels))
        for i, region in enumerate(self.regions):
            ax = axes[i, 0]
            for j, label in enumerate(self.labels):
                ax.plot(x, self.dice[:, i, j], marker="o", ms=4, lw=1.2, label=label)
            ax.set_xticks(x, self.subsets if i == n_r - 1 else [""] * len(x), rotation=60, ha="right", fontsize=8)
            ax.set_ylim(0, 1)
            ax.set_ylabel(f"{region}\nDice")
            ax.grid(alpha=0.3)
            bars = axes[i, 1]
            kinds = MEAN_KINDS[:2]
            for j, label in enumerate(self.labels):
                bars.bar(np.arange(len(kinds)) + (j - (len(self.labels) - 1) / 2) * width,
                         [means[k][i, j] for k in kinds], width, label=label,
                         yerr=[sd[k][i, j] for k in kinds] if self.multi_seed else None, capsize=2)
            bars.set_xticks(np.arange(len(kinds)), ["15 subsets", "missing only"])
            bars.set_ylim(0, 1)
            bars.set_title(f"mean {_short(region)} Dice", fontsize=9)
            bars.grid(axis="y", alpha=0.3)
        axes[0, 0].legend(loc="lower right", fontsize=8, ncol=len(self.labels))
        self._plot_by_count(fig.add_subplot(grid[n_r, :]))
        fig.suptitle(title)
        fig.tight_layout()
        try:
            save_figure(fig, path, dpi=110)
        finally:
            plt.close(fig)

    def _plot_by_count(self, ax) -> None:
        counts, mean, sd = self.by_count()
        for j, label in enumerate(self.labels):
            ax.errorbar(np.array(counts) + (j - (len(self.labels) - 1) / 2) * 0.04, mean[:, j],
                        yerr=sd[:, j] if self.multi_seed else None, marker="o", ms=4, capsize=3, label=label)
        ax.set_xticks(counts, [f"{k} of {max(counts)}" for k in counts])
        ax.set_xlabel("available sequences")
        ax.set_ylabel("mean Dice\n(regions, subsets)")
        ax.set_title("mean Dice by number of available sequences" + (" (± sd over seeds)" if self.multi_seed else ""),
                     fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8, ncol=len(self.labels))

    def write(self, out_dir: Path, stem: str, title: str, details: Sequence[str] = (), extra: dict | None = None
              ) -> dict[str, Path]:
        """Write ``stem``.md/.csv/.json/.png into ``out_dir`` (atomically) and return their paths."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {ext: out_dir / f"{stem}.{ext}" for ext in ("md", "csv", "json", "png")}
        write_text(paths["md"], self.to_markdown(title, details))
        write_text(paths["csv"], self.to_csv())
        write_json(paths["json"], {**self.to_json(), **(extra or {})})
        self.plot(paths["png"], title)
        return paths
