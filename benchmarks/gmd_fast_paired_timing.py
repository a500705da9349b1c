"""Paired step times of plain DS, the amortised GMD reuse step and exact GMD, interleaved in one process.

``nnunet-gmd bench gmd`` times each method in its own process, one after the other, which on a shared machine
lets load changes between processes leak into the ratios (its ``paired`` block is the in-process figure for the
default interval). This script runs the same round-robin (:func:`nnunet_gmd.bench_fast.paired_times`) with more
rounds and prints the amortised cost ``(exact + (N - 1) * reuse) / N`` for every ``--interval`` given. ``bare`` is a
bare ``mean(losses).backward()``; ``plain`` is ``gmd_fast.ds_mean_backward``, the DS trainers' step (the same
gradient through the weighted merge), so ``plain_over_bare`` is that path's overhead.

    python benchmarks/gmd_fast_paired_timing.py [--rounds 5] [--interval 8 16 32] [--threads 0 (= torch default)]
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch


def main() -> None:
    from nnunet_gmd.bench_cli import DEFAULTS
    from nnunet_gmd.bench_fast import amortized_cost, paired_times

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--interval", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    times = paired_times(dict(DEFAULTS), args.rounds)
    med = {k: statistics.median(v) for k, v in times.items()}
    amortized = {n: amortized_cost(med["exact"], med["reuse"], n) for n in args.interval}
    print(json.dumps({"threads": torch.get_num_threads(), "rounds": args.rounds,
                      **{f"{k}_s": round(v, 4) for k, v in med.items()},
                      "amortized_s": {n: round(v, 4) for n, v in amortized.items()},
                      "plain_over_bare": round(med["plain"] / med["bare"], 3),
                      "reuse_over_bare": round(med["reuse"] / med["bare"], 3),
                      "amortized_over_bare": {n: round(v / med["bare"], 3) for n, v in amortized.items()},
                      "amortized_over_plain": {n: round(v / med["plain"], 3) for n, v in amortized.items()},
                      "exact_over_bare": round(med["exact"] / med["bare"], 3),
                      "times": {k: [round(t, 3) for t in v] for k, v in times.items()}}))


if __name__ == "__main__":
    main()
