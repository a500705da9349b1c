"""Peak memory of exact GMD against the literal reference on the feature-fusion DS network (issue 10, point 3).

``nnunet-gmd bench gmd --fusion features`` measures this too, but it runs every method, which takes many minutes
on two cores. This runs only the set-up, plain, exact-GMD and reference workers of :mod:`nnunet_gmd.bench`, one
process each, and prints the peak memory above the set-up (the figure ``bench gmd`` reports as ``peak_extra_mb``)
and exact GMD's ratio to the reference.

    python benchmarks/gmd_ff_memory.py [--steps N] [-o result.json]
"""
from __future__ import annotations

import argparse
import json

from nnunet_gmd.atomic import write_json
from nnunet_gmd.bench import run_in_subprocess
from nnunet_gmd.bench_cli import DEFAULTS
from nnunet_gmd.bench_fast import DEFAULTS as FAST_DEFAULTS

METHODS = ("plain", "gmd", "reference")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1, help="timed steps per method (default 1)")
    parser.add_argument("-o", "--output", help="also write the result to this JSON file")
    args = parser.parse_args()
    cfg = {**DEFAULTS, **FAST_DEFAULTS, "steps": args.steps, "fusion": "features"}
    blob = json.dumps(cfg)
    setup = run_in_subprocess(["--worker", "setup", "--cfg", blob])["rss_mb"]
    result: dict = {"config": cfg, "setup_mb": setup}
    for method in METHODS:
        r = run_in_subprocess(["--worker", method, "--cfg", blob])
        result[f"{method}_s"] = round(r["median_s"], 3)
        result.setdefault("peak_extra_mb", {})[method] = round(max(0.0, r["peak_mb"] - setup), 1)
        print(method, result[f"{method}_s"], "s", result["peak_extra_mb"][method], "MB", flush=True)
    extra = result["peak_extra_mb"]
    result["gmd_peak_over_reference_peak"] = round(extra["gmd"] / max(extra["reference"], 1e-9), 3)
    print(json.dumps(result))
    if args.output:
        write_json(args.output, result)


if __name__ == "__main__":
    main()
