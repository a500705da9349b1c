"""Paired step times of plain DS, the amortised GMD reuse step and exact GMD, interleaved in one process.

``nnunet-gmd bench gmd`` times each method in its own process, one after the other, which on a shared machine
lets load changes between processes leak into the ratios. Here the three steps run round-robin on bench's network
and batch, so a load change hits all of them alike; the amortised cost per step for an interval N is
``(exact + (N - 1) * reuse) / N``, printed for every ``--interval`` given. ``plain`` is a bare
``mean(losses).backward()``; ``ds_mean`` is ``gmd_fast.ds_mean_backward``, the DS trainers' step (the same gradient
through the weighted merge), so ``ds_mean_over_plain`` is that path's overhead.

    python benchmarks/gmd_fast_paired_timing.py [--rounds 5] [--interval 8 16 32] [--threads 0 (= torch default)]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    from nnunet_gmd import gmd
    from nnunet_gmd.bench import build
    from nnunet_gmd.bench_cli import DEFAULTS
    from nnunet_gmd.gmd_fast import ds_mean_backward, weighted_ds_backward
    from nnunet_gmd.subsets import all_subsets

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--interval", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    net, x, loss = build(DEFAULTS)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    subsets = all_subsets(DEFAULTS["modalities"])
    generator = torch.Generator().manual_seed(0)
    weights = gmd.ds_gmd_backward(net, x, subsets, loss, generator=generator).weights

    def plain():
        torch.stack(gmd.ds_subset_losses(net, x, subsets, loss)).mean().backward()

    steps = {"plain": plain,
             "ds_mean": lambda: ds_mean_backward(net, x, subsets, loss),
             "reuse": lambda: weighted_ds_backward(net, x, subsets, loss, weights),
             "exact": lambda: gmd.ds_gmd_backward(net, x, subsets, loss, generator=generator)}
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(args.rounds + 1):  # round 0 is the warm-up
        for name, fn in steps.items():
            opt.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            fn()
            opt.step()
            if r:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    amortized = {n: (med["exact"] + (n - 1) * med["reuse"]) / n for n in args.interval}
    print(json.dumps({"threads": torch.get_num_threads(), "rounds": args.rounds,
                      **{f"{k}_s": round(v, 4) for k, v in med.items()},
                      "amortized_s": {n: round(v, 4) for n, v in amortized.items()},
                      "ds_mean_over_plain": round(med["ds_mean"] / med["plain"], 3),
                      "reuse_over_plain": round(med["reuse"] / med["plain"], 3),
                      "amortized_over_plain": {n: round(v / med["plain"], 3) for n, v in amortized.items()},
                      "exact_over_plain": round(med["exact"] / med["plain"], 3),
                      "times": {k: [round(t, 3) for t in v] for k, v in times.items()}}))


if __name__ == "__main__":
    main()
