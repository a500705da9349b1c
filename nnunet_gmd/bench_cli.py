"""``nnunet-gmd bench gmd``: the command line of the GMD step benchmark (:mod:`nnunet_gmd.bench`).

Kept apart from the benchmark itself so that building the parser (``nnunet-gmd --help``) imports no torch.
"""
from __future__ import annotations

import argparse
import json

from nnunet_gmd.errors import UserError

DEFAULTS = dict(modalities=4, features=[16, 32, 64, 96, 128], size=32, batch=2, steps=5, warmup=1, seed=0,
                fusion="logits")
FUSION_CHOICES = ("logits", "features")


def _cmd_bench(args: argparse.Namespace) -> int:
    for name in ("steps", "size", "batch"):
        if getattr(args, name) < 1:
            raise UserError(f"bench gmd: --{name} must be a positive integer, got {getattr(args, name)}")
    for name in ("fast_interval", "sub_interval"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"bench gmd: --{name.replace('_', '-')} must be a positive integer, got {value}")
    smallest = 2 ** len(DEFAULTS["features"])   # the bottleneck must keep more than one voxel for instance norm
    if args.size < smallest:
        raise UserError(f"bench gmd: --size must be at least {smallest} (the {len(DEFAULTS['features'])}-stage "
                        f"U-Net halves it {len(DEFAULTS['features']) - 1} times), got {args.size}")
    from nnunet_gmd.bench import run_benchmark   # torch: only once the command runs
    from nnunet_gmd.bench_fast import DEFAULTS as FAST_DEFAULTS   # so the JSON's config names the intervals

    cfg = {**DEFAULTS, **FAST_DEFAULTS, "steps": args.steps, "size": args.size, "batch": args.batch,
           "fusion": args.fusion, "sub_interval": args.sub_interval}
    if args.fast_interval is not None:
        cfg["fast_interval"] = args.fast_interval
    result = run_benchmark(cfg, progress=not args.json)
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=2))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="performance figures")
    kinds = bench.add_subparsers(dest="bench_kind", metavar="KIND")
    kinds.required = True
    p = kinds.add_parser("gmd", help="time and memory of one GMD step against plain, reference and floor")
    p.add_argument("--json", action="store_true", help="print one JSON object only")
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="timed steps per method, median reported (default %(default)s)")
    p.add_argument("--size", type=int, default=DEFAULTS["size"], help="cubic input size in voxels (default %(default)s)")
    p.add_argument("--batch", type=int, default=DEFAULTS["batch"], help="batch size (default %(default)s)")
    p.add_argument("--fusion", choices=FUSION_CHOICES, default=DEFAULTS["fusion"],
                   help="DS network: fused at the logits (DSUNet) or at every skip (DSFeatureFusionUNet); "
                        "default %(default)s")
    p.add_argument("--fast-interval", type=int, default=None,
                   help="amortised GMD: exact weights every N steps (default: nnUNetTrainerGMD_amortized's, 32)")
    p.add_argument("--sub-interval", type=int, default=8,
                   help="amortised GMD with the Gram on one sample: exact weights every N steps (default %(default)s)")
    p.set_defaults(func=_cmd_bench)
