"""Paired differences between the methods of a run, per test case, with bootstrap 95 % intervals.

Every method is scored on the same test cases, so the per-case difference of two methods removes the case
difficulty that dominates the spread of the method means. For each pair this gives the mean difference, a
percentile bootstrap interval over the test cases, and how many cases favour each side, on two measures: the mean
over the subsets with a missing modality and the full set (Dice averaged over the regions, see
:mod:`nnunet_gmd.demo.per_case`).

Training seeds: a method's per-case value is first averaged over its training seeds, then the cases are
resampled. That interval is about which test cases happened to be drawn, for seed-averaged models. The seeds
themselves move a model too (on BraTS at the ``cpu`` preset by 0.07-0.16 Dice, more than most method differences),
so where both methods have at least two seeds a second interval resamples each method's seeds as well as the
cases (:func:`seed_and_case_interval`); the mean difference within each seed is shown beside both.

Reads a finished run folder only (``reports/<method>``, ``reports_seed<k>/<method>``), so ``nnunet-gmd benchmark
stats`` can (re)write the tables without training anything.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from nnunet_gmd.errors import UserError  # noqa: E402
from nnunet_gmd.demo.per_case import CaseScores, case_scores  # noqa: E402
from nnunet_gmd.demo.results import SHORT_REGION  # noqa: E402
from nnunet_gmd.demo.workspace import reports_root  # noqa: E402
from nnunet_gmd.atomic import save_figure, write_json, write_text  # noqa: E402
from nnunet_gmd.report import REPORT_JSON  # noqa: E402

STEM = "paired_differences"
PAIRED_EXTENSIONS = ("md", "csv", "json", "png")   # the files PairedDifferences.write produces
MEASURES = ("missing", "full")
N_RESAMPLES = 10000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Bootstrap:
    """How intervals are computed; stated in every output so a reader can redo them."""

    n_resamples: int = N_RESAMPLES
    confidence: float = CONFIDENCE
    seed: int = 0

    def describe(self) -> str:
        lo, hi = 50 * (1 - self.confidence), 50 * (1 + self.confidence)
        return (f"percentile bootstrap over test cases: {self.n_resamples} resamples of the cases with replacement, "
                f"the {lo:g}th and {hi:g}th percentiles of the resampled mean difference "
                f"(scipy.stats.bootstrap, method='percentile', numpy default_rng seed {self.seed})")


@dataclass
class MethodScores:
    """Per-case scores of one method under each of its training seeds."""

    key: str
    label: str
    seeds: list[int]
    per_seed: list[CaseScores]

    def per_case(self, measure: str) -> dict[str, float]:
        """case -> value averaged over the training seeds (NaN-aware)."""
        out = {}
        for case in self.per_seed[0].cases:
            values = [getattr(s, measure)[case] for s in self.per_seed]
            values = [v for v in values if not math.isnan(v)]
            out[case] = float(np.mean(values)) if values else math.nan
        return out


@dataclass(frozen=True)
class Difference:
    """``method`` minus ``versus`` on one measure, over the cases where both are defined."""

    method: str
    versus: str
    measure: str
    per_case: dict[str, float]
    mean: float
    low: float
    high: float
    method_ahead: int
    versus_ahead: int
    ties: int
    per_seed: list[float] = field(default_factory=list)   # mean difference within each shared seed
    seed_low: float = math.nan    # interval with the seeds resampled too (NaN: a method has a single seed)
    seed_high: float = math.nan

    @property
    def n(self) -> int:
        return len(self.per_case)

    @property
    def excludes_zero(self) -> Optional[bool]:
        return _excludes_zero(self.low, self.high)

    @property
    def seed_interval_excludes_zero(self) -> Optional[bool]:
        return _excludes_zero(self.seed_low, self.seed_high)


def _excludes_zero(low: float, high: float) -> Optional[bool]:
    if math.isnan(low) or math.isnan(high):
        return None
    return low > 0 or high < 0


MIN_CASES = 3   # two cases resample to only three distinct means: no interval worth printing


def bootstrap_interval(diff: np.ndarray, boot: Bootstrap) -> tuple[float, float]:
    """Percentile interval of the mean of ``diff`` (NaN, NaN for fewer than ``MIN_CASES`` values)."""
    diff = np.asarray(diff, dtype=float)
    if diff.size < MIN_CASES:
        return math.nan, math.nan
    from scipy.stats import bootstrap   # scipy comes with nnU-Net; imported here to keep module import light

    result = bootstrap((diff,), np.mean, n_resamples=boot.n_resamples, confidence_level=boot.confidence,
                       method="percentile", vectorized=True, rng=np.random.default_rng(boot.seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def seed_and_case_interval(a: np.ndarray, b: np.ndarray, boot: Bootstrap) -> tuple[float, float]:
    """Percentile interval of the mean over cases of (seed mean of ``a``) − (seed mean of ``b``), resampling both.

    ``a`` and ``b`` are (seeds, cases) arrays on the same cases. Each resample draws the cases with replacement and,
    independently for each method, its seeds with replacement; a drawn seed stands for one whole trained model, so
    it is applied to every case. Seeds are resampled per method because seed k of two methods shares nothing but a
    generator offset: their weights and batches differ. With a handful of seeds this still understates the seed
    spread (the bootstrap variance of a mean of n is (n-1)/n of the usual estimate), so it is a floor on the
    uncertainty, not a full account. NaN, NaN below two seeds per method or ``MIN_CASES`` cases.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected (seeds, cases) arrays on the same cases, got {a.shape} and {b.shape}")
    if min(a.shape[0], b.shape[0]) < 2 or a.shape[1] < MIN_CASES:
        return math.nan, math.nan
    rng = np.random.default_rng(boot.seed)
    n, cases = boot.n_resamples, a.shape[1]
    mean_a = a[rng.integers(0, a.shape[0], size=(n, a.shape[0]))].mean(axis=1)   # (n, cases): one model mix each
    mean_b = b[rng.integers(0, b.shape[0], size=(n, b.shape[0]))].mean(axis=1)
    drawn = rng.integers(0, cases, size=(n, cases))
    means = np.take_along_axis(mean_a - mean_b, drawn, axis=1).mean(axis=1)
    tail = 50 * (1 - boot.confidence)
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def _seed_matrix(scores: MethodScores, measure: str, cases: Sequence[str]) -> np.ndarray:
    """(seeds, cases) array of one measure."""
    return np.array([[getattr(s, measure)[c] for c in cases] for s in scores.per_seed], dtype=float).reshape(
        len(scores.per_seed), len(cases))


def paired_difference(method: MethodScores, versus: MethodScores, measure: str, boot: Bootstrap) -> Difference:
    a, b = method.per_case(measure), versus.per_case(measure)
    per_case = {c: a[c] - b[c] for c in a if not (math.isnan(a[c]) or math.isnan(b[c]))}
    diff = np.array(list(per_case.values()))
    low, high = bootstrap_interval(diff, boot)
    per_seed = []
    for seed in (s for s in method.seeds if s in versus.seeds):
        sa = getattr(method.per_seed[method.seeds.index(seed)], measure)
        sb = getattr(versus.per_seed[versus.seeds.index(seed)], measure)
        d = [sa[c] - sb[c] for c in sa if not (math.isnan(sa[c]) or math.isnan(sb[c]))]
        per_seed.append(float(np.mean(d)) if d else math.nan)
    # The seed-and-case interval needs every seed defined; a case undefined under some seed is left out of it.
    a, b = _seed_matrix(method, measure, list(per_case)), _seed_matrix(versus, measure, list(per_case))
    defined = ~(np.isnan(a).any(axis=0) | np.isnan(b).any(axis=0))
    seed_low, seed_high = seed_and_case_interval(a[:, defined], b[:, defined], boot)
    return Difference(method.label, versus.label, measure, per_case,
                      float(diff.mean()) if diff.size else math.nan, low, high,
                      int((diff > 0).sum()), int((diff < 0).sum()), int((diff == 0).sum()), per_seed,
                      seed_low, seed_high)


# ---------------------------------------------------------------------------------------------- reading a run
def seeds_of(run: Path, key: str) -> list[int]:
    """Training seeds of method ``key`` with a finished report in run folder ``run``, ascending."""
    run = Path(run)
    seeds = [0] if (reports_root(run, 0) / key / REPORT_JSON).is_file() else []
    for folder in run.glob("reports_seed*"):
        suffix = folder.name[len("reports_seed"):]
        if suffix.isdigit() and int(suffix) > 0 and (folder / key / REPORT_JSON).is_file():
            seeds.append(int(suffix))
    return sorted(seeds)


def method_keys(run: Path) -> list[str]:
    """Methods with a seed-0 report in ``run``, in folder-name order."""
    folder = reports_root(Path(run), 0)
    if not folder.is_dir():
        raise UserError(f"{folder} does not exist: {run} is not the output folder of a finished benchmark or demo")
    return sorted(p.name for p in folder.iterdir() if (p / REPORT_JSON).is_file())


def load_methods(run: Path, keys: Sequence[str], labels: dict[str, str],
                 n_seeds: Optional[int] = None) -> list[MethodScores]:
    """Per-case scores of ``keys`` (seeds 0..n_seeds-1, or every seed found), all on the same test cases."""
    run = Path(run)
    methods = []
    for key in keys:
        found = seeds_of(run, key)
        if n_seeds is not None:
            missing = [s for s in range(n_seeds) if s not in found]
            if missing:
                raise UserError(f"{reports_root(run, missing[0]) / key / REPORT_JSON} does not exist (method {key}, "
                                f"training seed {missing[0]} is not finished)")
            found = list(range(n_seeds))
        if not found:
            raise UserError(f"{reports_root(run, 0) / key / REPORT_JSON} does not exist (method {key} has no "
                            f"finished evaluation in {run})")
        scores = [case_scores(reports_root(run, s) / key) for s in found]
        methods.append(MethodScores(key, labels.get(key, key), found, scores))
    reference = methods[0]
    for m in methods:
        for seed, s in zip(m.seeds, m.per_seed):
            if sorted(s.cases) != sorted(reference.per_seed[0].cases):
                raise UserError(f"{reports_root(run, seed) / m.key / REPORT_JSON} is on cases "
                                f"{', '.join(s.cases)}, but {reference.key} is on "
                                f"{', '.join(reference.per_seed[0].cases)}; paired differences need the same cases")
    return methods


# ---------------------------------------------------------------------------------------------- the table
def _fmt(x: float, sign: bool = False) -> str:
    return "n/a" if math.isnan(x) else (f"{x:+.3f}" if sign else f"{x:.3f}")


def _interval(low: float, high: float) -> str:
    """Markdown cells ``[low, high] | excludes 0``."""
    excl = _excludes_zero(low, high)
    if excl is None:
        return "n/a | n/a"
    return f"[{_fmt(low, True)}, {_fmt(high, True)}] | {'**yes**' if excl else 'no'}"


class PairedDifferences:
    """Every pair (later method minus earlier one, in the order given) on both measures."""

    def __init__(self, methods: Sequence[MethodScores], boot: Bootstrap = Bootstrap()) -> None:
        if len(methods) < 2:
            raise UserError("paired differences need at least two methods")
        self.methods = list(methods)
        self.boot = boot
        self.cases = list(methods[0].per_seed[0].cases)
        self.n_missing = methods[0].per_seed[0].n_missing
        self.regions = methods[0].per_seed[0].regions
        self.pairs = [(later, earlier) for j, later in enumerate(self.methods) for earlier in self.methods[:j]]
        self.differences = {measure: [paired_difference(a, b, measure, boot) for a, b in self.pairs]
                            for measure in MEASURES}

    def measure_title(self, measure: str) -> str:
        regions = "/".join(SHORT_REGION.get(r, r) for r in self.regions)
        return (f"mean over the {self.n_missing} subsets with a missing modality ({regions} averaged)"
                if measure == "missing" else f"full set, every modality present ({regions} averaged)")

    def _seeds_line(self) -> str:
        return "training seeds per method: " + ", ".join(f"{m.label} {len(m.seeds)}" for m in self.methods)

    def method_lines(self) -> list[str]:
        return [f"{len(self.cases)} test cases; {self._seeds_line()}",
                "per case: Dice of the later method minus the earlier one (each first averaged over its training "
                "seeds); \"ahead\" counts the cases where that method's Dice is higher",
                f"interval: {self.boot.describe()}",
                "with under about 10 cases the percentile interval is too narrow (it undercovers) and moves with "
                f"single cases; read an interval that excludes 0 as a pointer, not a proof (none below {MIN_CASES} "
                "cases)"] + ([
                "seeds and cases: a second interval resamples each method's training seeds (whole models, "
                "independently per method) as well as the cases, so it also holds the seed-to-seed spread; with "
                "few seeds it is still too narrow; n/a where a method has a single seed"]
                if any(len(m.seeds) > 1 for m in self.methods) else [])

    def to_markdown(self, title: str = "Paired differences between methods, per test case") -> str:
        lines = [f"# {title}", ""] + [f"- {line}" for line in self.method_lines()] + [""]
        multi_seed = any(len(m.seeds) > 1 for m in self.methods)
        for measure in MEASURES:
            lines += [f"## {self.measure_title(measure)}", "",
                      f"| difference | mean | {100 * self.boot.confidence:g}% interval | excludes 0 |"
                      + (" interval, seeds and cases resampled | excludes 0 |" if multi_seed else "")
                      + " cases ahead (first / second / tie) |" + (" mean per seed |" if multi_seed else ""),
                      "|---|---:|---|---|" + ("---|---|" if multi_seed else "") + "---|"
                      + ("---|" if multi_seed else "")]
            for d in self.differences[measure]:
                row = f"| {d.method} − {d.versus} | {_fmt(d.mean, True)} | {_interval(d.low, d.high)} |"
                if multi_seed:
                    row += f" {_interval(d.seed_low, d.seed_high)} |"
                row += f" {d.method_ahead} / {d.versus_ahead} / {d.ties} of {d.n} |"
                if multi_seed:
                    row += " " + (", ".join(_fmt(x, True) for x in d.per_seed) or "n/a") + " |"
                lines.append(row)
            lines.append("")
        lines += ["## Per case (missing-modality mean / full set)", "",
                  "| case | " + " | ".join(m.label for m in self.methods) + " |",
                  "|---|" + "---:|" * len(self.methods)]
        values = {m.key: (m.per_case("missing"), m.per_case("full")) for m in self.methods}
        for case in self.cases:
            lines.append(f"| {case} | " + " | ".join(f"{_fmt(values[m.key][0][case])} / {_fmt(values[m.key][1][case])}"
                                                     for m in self.methods) + " |")
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["measure", "method", "versus", "n_cases", "mean_difference", "ci_low", "ci_high",
                    "method_ahead", "versus_ahead", "ties", "mean_difference_per_seed", "ci_seeds_low",
                    "ci_seeds_high"])
        for measure in MEASURES:
            for d in self.differences[measure]:
                w.writerow([measure, d.method, d.versus, d.n] + ["" if math.isnan(x) else f"{x:.6f}"
                                                               for x in (d.mean, d.low, d.high)]
                           + [d.method_ahead, d.versus_ahead, d.ties, " ".join(f"{x:.6f}" for x in d.per_seed)]
                           + ["" if math.isnan(x) else f"{x:.6f}" for x in (d.seed_low, d.seed_high)])
        return buf.getvalue()

    def to_json(self) -> dict:
        def clean(x: float):
            return None if math.isnan(x) else round(float(x), 6)
        return {
            "method": self.method_lines(),
            "bootstrap": {"n_resamples": self.boot.n_resamples, "confidence": self.boot.confidence,
                          "seed": self.boot.seed, "kind": "percentile", "resampled": "test cases",
                          "seeds": "per-case values averaged over each method's training seeds before resampling",
                          "seed_interval": "ci_seeds_low/high: each method's seeds (whole models) resampled too, "
                                           "independently per method; null below two seeds per method"},
            "test_cases": self.cases,
            "measures": {m: self.measure_title(m) for m in MEASURES},
            "methods": {m.label: {"key": m.key, "seeds": m.seeds,
                                  "per_case": {measure: {c: clean(v) for c, v in m.per_case(measure).items()}
                                               for measure in MEASURES}} for m in self.methods},
            "differences": {measure: [{"method": d.method, "versus": d.versus, "n_cases": d.n,
                                       "mean": clean(d.mean), "ci_low": clean(d.low), "ci_high": clean(d.high),
                                       "excludes_zero": d.excludes_zero, "ci_seeds_low": clean(d.seed_low),
                                       "ci_seeds_high": clean(d.seed_high),
                                       "seed_interval_excludes_zero": d.seed_interval_excludes_zero,
                                       "method_ahead": d.method_ahead,
                                       "versus_ahead": d.versus_ahead, "ties": d.ties,
                                       "per_case": {c: clean(v) for c, v in d.per_case.items()},
                                       "mean_per_seed": [clean(x) for x in d.per_seed]}
                                      for d in self.differences[measure]] for measure in MEASURES},
        }

    def plot(self, path: Path) -> None:
        """Forest plot: one row per pair, the mean difference and its interval, one panel per measure."""
        n = len(self.pairs)
        fig, axes = plt.subplots(1, len(MEASURES), figsize=(12, 0.45 * n + 1.8), sharey=True, squeeze=False)
        y = np.arange(n)[::-1]
        for ax, measure in zip(axes[0], MEASURES):
            diffs = self.differences[measure]
            for yi, d in zip(y, diffs):
                colour = {True: "tab:green" if d.mean > 0 else "tab:red", False: "tab:gray", None: "tab:gray"}[
                    d.excludes_zero]
                if not math.isnan(d.low):
                    ax.plot([d.low, d.high], [yi, yi], color=colour, lw=2)
                if not math.isnan(d.seed_low):      # seeds resampled too: thin, just below the case interval
                    ax.plot([d.seed_low, d.seed_high], [yi - 0.22] * 2, color=colour, lw=1, alpha=0.7)
                ax.plot([d.mean], [yi], "o", color=colour)
                ax.plot(list(d.per_case.values()), [yi] * d.n, "|", color="black", alpha=0.35, ms=8)
                ax.annotate(f"{d.method_ahead}/{d.versus_ahead}", (1.0, yi), xycoords=("axes fraction", "data"),
                            xytext=(4, -3), textcoords="offset points", fontsize=7)
            ax.axvline(0, color="black", lw=0.8)
            ax.set_yticks(y, [f"{d.method} − {d.versus}" for d in diffs])
            ax.set_xlabel("Dice difference (per case: ticks; mean: dot; line: interval; thin line below: seeds "
                          "resampled too)")
            ax.set_title(self.measure_title(measure), fontsize=9)
            ax.grid(axis="x", alpha=0.3)
        fig.suptitle(f"Paired differences over {len(self.cases)} test cases, {100 * self.boot.confidence:g}% "
                     f"percentile bootstrap ({self.boot.n_resamples} resamples); right: cases ahead (first/second)",
                     fontsize=9)
        fig.tight_layout()
        save_figure(fig, path, dpi=110)
        plt.close(fig)

    def write(self, out_dir: Path, stem: str = STEM) -> dict[str, Path]:
        """Write ``stem``.md/.csv/.json/.png into ``out_dir`` (atomically) and return their paths."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {ext: out_dir / f"{stem}.{ext}" for ext in PAIRED_EXTENSIONS}
        write_text(paths["md"], self.to_markdown())
        write_text(paths["csv"], self.to_csv())
        write_json(paths["json"], self.to_json())
        self.plot(paths["png"])
        return paths


def remove_stale_paired_differences(run: Path) -> list[Path]:
    """Delete ``run``'s paired-difference files and return them.

    A run folder is reused across invocations; one that compares a single method writes no pairs, and an earlier
    invocation's table left beside the new results would be read as this run's.
    """
    stale = [Path(run) / f"{STEM}.{ext}" for ext in PAIRED_EXTENSIONS if (Path(run) / f"{STEM}.{ext}").is_file()]
    for path in stale:
        path.unlink()
    return stale


def write_paired_differences(run: Path, keys: Optional[Sequence[str]], labels: dict[str, str],
                             out_dir: Optional[Path] = None, n_seeds: Optional[int] = None,
                             boot: Bootstrap = Bootstrap()) -> dict[str, Path]:
    """Read run folder ``run`` and write its paired-difference table (into ``run`` unless ``out_dir``)."""
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"{run} is not a folder")
    if keys is None:
        found = method_keys(run)
        order = list(labels)
        keys = sorted(found, key=lambda k: (order.index(k) if k in order else len(order), k))
    if len(set(keys)) != len(keys):
        raise UserError(f"a method is listed twice: {' '.join(keys)}")
    if len(keys) < 2:
        raise UserError(f"paired differences need at least two methods with reports in {reports_root(run, 0)}; "
                        f"found {', '.join(keys) or 'none'}")
    table = PairedDifferences(load_methods(run, keys, labels, n_seeds), boot)
    return table.write(out_dir if out_dir is not None else run)
