"""Paired differences between methods of two benchmark runs on the same test cases.

``nnunet-gmd benchmark stats`` pairs methods within one run folder. Some questions pair across runs: a trainer on
incomplete training data (``--drop-train``) against the same trainer on the complete data, trained in another
folder. Both runs' ``paired_differences.json`` already hold every method's per-case scores (mean Dice over the 14
subsets with a missing modality, and on the full set), so this reads those, pairs them by case and bootstraps the
mean difference exactly as ``benchmark stats`` does. It also gives the mean over all 15 subsets per case,
(14 * missing + full) / 15.

    python benchmarks/cross_run_paired.py RUN_A/paired_differences.json "DS-FF" \
        RUN_B/paired_differences.json "DS-FF" [--json out.json]

prints "A minus B" per measure with its 95 % interval and the cases ahead.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from nnunet_gmd.atomic import write_json
from nnunet_gmd.demo.paired import Bootstrap, bootstrap_interval
from nnunet_gmd.errors import UserError

N_MISSING = 14  # subsets with a missing modality, of 15 for four sequences


def per_case(path: Path, label: str) -> dict[str, dict[str, float]]:
    """Measure -> case -> score of method ``label`` in a ``paired_differences.json``, plus the all-15 mean."""
    try:
        data = json.loads(Path(path).read_text())
        scores = data["methods"][label]["per_case"]
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        known = ", ".join(json.loads(Path(path).read_text()).get("methods", {})) if Path(path).is_file() else ""
        raise UserError(f"{path} has no per-case scores for method {label!r} (methods: {known or 'none'})") from None
    missing = {c: float("nan") if v is None else float(v) for c, v in scores["missing"].items()}
    full = {c: float("nan") if v is None else float(v) for c, v in scores["full"].items()}
    every = {c: (N_MISSING * missing[c] + full[c]) / (N_MISSING + 1) for c in missing if c in full}
    return {"missing": missing, "full": full, "all 15": every}


def compare(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]], boot: Bootstrap) -> dict[str, dict]:
    out = {}
    for measure in ("missing", "full", "all 15"):
        cases = [c for c in a[measure] if c in b[measure]
                 and not (math.isnan(a[measure][c]) or math.isnan(b[measure][c]))]
        diff = np.array([a[measure][c] - b[measure][c] for c in cases])
        low, high = bootstrap_interval(diff, boot)
        out[measure] = {"n_cases": len(cases), "a_mean": float(np.mean([a[measure][c] for c in cases])),
                        "b_mean": float(np.mean([b[measure][c] for c in cases])),
                        "mean_difference": float(diff.mean()) if diff.size else math.nan,
                        "ci_low": low, "ci_high": high, "a_ahead": int((diff > 0).sum()),
                        "b_ahead": int((diff < 0).sum()),
                        "per_case": {c: float(d) for c, d in zip(cases, diff)}}
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a_file", type=Path)
    parser.add_argument("a_method")
    parser.add_argument("b_file", type=Path)
    parser.add_argument("b_method")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    try:
        result = compare(per_case(args.a_file, args.a_method), per_case(args.b_file, args.b_method), Bootstrap())
    except UserError as e:
        print(f"cross_run_paired: {e}", file=sys.stderr)
        return 2
    print(f"A = {args.a_method} ({args.a_file.parent.name}), B = {args.b_method} ({args.b_file.parent.name})")
    print("| measure | cases | A | B | A - B [95% bootstrap interval] | A ahead / B ahead |")
    print("|---|---:|---:|---:|---:|---:|")
    for measure, r in result.items():
        print(f"| {measure} | {r['n_cases']} | {r['a_mean']:.3f} | {r['b_mean']:.3f} | "
              f"{r['mean_difference']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] | {r['a_ahead']} / {r['b_ahead']} |")
    if args.json:
        write_json(args.json, {"a": [str(args.a_file), args.a_method], "b": [str(args.b_file), args.b_method],
                               "bootstrap": Bootstrap().describe(), "measures": result})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
