"""``nnunet-gmd demo`` and ``nnunet-gmd benchmark brats``.

Heavy modules (torch, nnU-Net) are imported inside the commands, so ``nnunet-gmd --help`` stays fast.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from nnunet_gmd.demo.presets import PRESETS

# The keys of nnunet_gmd.demo.pipeline.METHODS, spelled out so that --help needs no heavy import (a test checks).
METHOD_KEYS = ("stock", "stock_complete", "dropout", "stock_adamw", "dropout_adamw", "ds", "ds_sgd", "ds_w1",
               "ds_w05", "gmd", "gmd_k5", "ds_ff", "ds_ff_mv", "ds_ff_mv_w1", "ds_ff_w1", "ds_ff_att", "ds_ff_kd",
               "ds_ff_att_kd", "gmd_ff", "gmd_k5_ff", "gmd_k5_ff_mv_w1", "ds_lw", "gmd_lw", "gmd_amortized",
               "gmd_amortized_sub", "gmd_m1", "gmd_amortized_w1")

DEMO_METHODS = ("stock", "gmd_k5_ff")
BENCHMARK_METHODS = ("stock_adamw", "dropout_adamw", "ds_ff", "gmd_k5_ff")


def _device(requested: str | None) -> str:
    if requested:
        return requested
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def _add_common(p: argparse.ArgumentParser, default_out: str, default_methods: tuple[str, ...]) -> None:
    p.add_argument("-o", "--output", default=default_out, help=f"output folder (default {default_out})")
    p.add_argument("--fresh", action="store_true", help="delete the output folder's previous run and start over "
                                                        "(default: reuse finished steps)")
    p.add_argument("--methods", nargs="+", default=list(default_methods),
                   help=f"methods to train and compare (default: {' '.join(default_methods)}; available: "
                        f"{' '.join(METHOD_KEYS)})")
    p.add_argument("--epochs", type=_positive, default=None, help="override the preset's epochs per method")
    p.add_argument("--iterations", type=_positive, default=None,
                   help="override the preset's training iterations per epoch")
    p.add_argument("--val-iterations", type=_positive, default=None,
                   help="override the preset's validation iterations per epoch")
    p.add_argument("-device", "--device", default=None, choices=("cpu", "cuda", "mps"),
                   help="default: cuda when available, else cpu")
    p.add_argument("--seeds", type=_positive, default=1,
                   help="train every method N times, with NNUNET_GMD_SEED=0..N-1 (default 1); tables show mean ± "
                        "sd over seeds. Seed 0 is the single-run layout, so raising N reuses what is finished")


def _preset(args: argparse.Namespace):
    return PRESETS[args.preset].with_budget(args.epochs, args.iterations, args.val_iterations)


def _demo(args: argparse.Namespace) -> int:
    from nnunet_gmd.demo.demo import DemoData, run_demo
    from nnunet_gmd.demo.pipeline import parse_methods

    data = DemoData(n_cases=args.cases, n_test=args.test_cases, size=args.size, seed=args.seed)
    run_demo(Path(args.output), _preset(args), parse_methods(args.methods), data, _device(args.device),
             fresh=args.fresh, seeds=args.seeds)
    return 0


def _benchmark_brats(args: argparse.Namespace) -> int:
    from nnunet_gmd.demo.benchmark import run_benchmark
    from nnunet_gmd.demo.pipeline import parse_methods

    from nnunet_gmd.demo.benchmark import parse_drop_train

    run_benchmark(Path(args.train), Path(args.test), Path(args.output), _preset(args),
                  parse_methods(args.methods), _device(args.device), fresh=args.fresh, seeds=args.seeds,
                  drop_train=parse_drop_train(args.drop_train) if args.drop_train else None)
    return 0


def _benchmark_split(args: argparse.Namespace) -> int:
    from nnunet_gmd.demo.benchmark import split_folder

    train, test = split_folder(Path(args.src), Path(args.output), args.test, args.seed)
    print(f"{args.output}/train: {len(train)} cases; {args.output}/test: {len(test)} cases ({', '.join(test)})")
    print(f"next: nnunet-gmd benchmark brats --train {args.output}/train --test {args.output}/test")
    return 0


def _benchmark_stats(args: argparse.Namespace) -> int:
    from nnunet_gmd.demo.paired import Bootstrap, write_paired_differences
    from nnunet_gmd.demo.pipeline import METHODS

    labels = {key: m.label for key, m in METHODS.items()}
    paths = write_paired_differences(Path(args.run), args.methods, labels,
                                     Path(args.output) if args.output else None, args.seeds,
                                     Bootstrap(args.resamples, 0.95, args.bootstrap_seed))
    print(paths["md"].read_text())
    print(f"written: {', '.join(str(p) for p in paths.values())}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="the whole pipeline on built-in BraTS-like phantoms (about 7 min on a 2-core CPU)",
        description="Generate BraTS-like brain phantoms, convert them to an nnU-Net dataset, plan and preprocess, "
                    "train nnUNetTrainerGMD_k5_FF and stock nnU-Net under the same budget, evaluate both under all 15 "
                    "modality subsets and compare them (tables, heatmaps, plot). Finished steps are reused.")
    _add_common(p, "demo_output", DEMO_METHODS)
    p.add_argument("--preset", default="demo", choices=sorted(PRESETS), help="run settings (default demo)")
    p.add_argument("--cases", type=_positive, default=12, help="phantoms to generate (default 12)")
    p.add_argument("--test-cases", type=_positive, default=3, help="of which held out for testing (default 3)")
    p.add_argument("--size", type=_positive, default=32, help="phantom edge length in voxels at 1 mm (default 32)")
    p.add_argument("--seed", type=int, default=0, help="phantom seed (default 0)")
    p.set_defaults(func=_demo)

    p = sub.add_parser("benchmark", help="benchmarks against baselines (benchmark brats, split, stats)")
    bench = p.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    bench.required = True
    b = bench.add_parser(
        "brats", help="train on one BraTS folder, test on another, all methods under all 15 subsets",
        description="Train stock nnU-Net (zero-filled missing channels) and nnU-Net with random modality dropout "
                    "(both under AdamW 1e-3, the fair baselines at a short budget), the feature-fusion DS network "
                    "and GMD k=5 on it on --train under one budget and evaluate each on --test under all 15 "
                    "modality subsets (whole tumor, tumor core, enhancing tumor). Preset cpu: 3 mm, a narrow "
                    "network, about 70 min for the four default methods on 16 + 6 cases on a 2-core CPU (the sum "
                    "of runs 10-11's step times; the two DS-FF trainers take three quarters of it); preset full: "
                    "nnU-Net's default plans and 1000 epochs (GPU).")
    b.add_argument("--train", required=True, help="folder of BraTS case folders to train on")
    b.add_argument("--test", required=True, help="folder of BraTS case folders to test on (with _seg files)")
    b.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="run settings (default cpu)")
    _add_common(b, "benchmark_output", BENCHMARK_METHODS)
    b.add_argument("--drop-train", default=None, metavar="SEQ=FRACTION,...",
                   help="mark sequences absent in a seeded fraction of the training cases, e.g. "
                        "'t1ce=0.5,t1=0.25' (availability only, no file is touched): DS/GMD skip them, stock "
                        "and ModalityDropout get zeros there, stock_complete leaves those cases out")
    b.set_defaults(func=_benchmark_brats)

    s = bench.add_parser("split", help="split one BraTS folder into train/ and test/ folders of links",
                         description="Link a seeded random selection of SRC's case folders into OUT/test and the "
                                     "rest into OUT/train (symbolic links; nothing is copied).")
    s.add_argument("src", help="folder of BraTS case folders")
    s.add_argument("-o", "--output", required=True, help="folder to create train/ and test/ in")
    s.add_argument("--test", type=_positive, required=True, help="number of test cases")
    s.add_argument("--seed", type=int, default=0, help="selection seed (default 0)")
    s.set_defaults(func=_benchmark_split)

    t = bench.add_parser(
        "stats", help="paired per-case differences between the methods of a finished run, with bootstrap intervals",
        description="Read a finished output folder of 'benchmark brats' or 'demo' (reports/<method>/, "
                    "reports_seed<k>/<method>/) and write paired_differences.{md,csv,json,png}: for each pair of "
                    "methods the per-case difference on the mean over the missing-modality subsets and on the full "
                    "set, its mean, a 95% percentile bootstrap interval over the test cases and how many cases "
                    "favour each side. Trains nothing.")
    t.add_argument("run", help="output folder of nnunet-gmd benchmark brats (or demo)")
    t.add_argument("--methods", nargs="+", default=None,
                   help="method keys (report folder names) in the order to compare; default: every method with a "
                        "report, in the benchmark's order")
    t.add_argument("--seeds", type=_positive, default=None,
                   help="use training seeds 0..N-1 of every method (default: every seed found per method)")
    t.add_argument("-o", "--output", default=None, help="folder to write into (default: the run folder)")
    t.add_argument("--resamples", type=_positive, default=10000, help="bootstrap resamples (default 10000)")
    t.add_argument("--bootstrap-seed", type=int, default=0, help="bootstrap generator seed (default 0)")
    t.set_defaults(func=_benchmark_stats)
