"""``nnunet-gmd sentiment {train,evaluate,benchmark,synthetic}``: the MOSI/MOSEI companion on the command line."""
from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from nnunet_gmd.errors import UserError
from nnunet_gmd.sentiment import MODALITIES
from nnunet_gmd.sentiment.data import SPLITS, SentimentData, SentimentDataError, dataset_mismatch_hint, \
    load_sentiment_file
from nnunet_gmd.sentiment.synthetic import FORMATS
from nnunet_gmd.sentiment.tables import (DEFAULT_VALID_FRACTION, UtteranceTable, default_valid_videos,
                                         is_table_folder, load_table_folder, pick_valid_videos, split_by_videos,
                                         whole_folder)

if TYPE_CHECKING:
    import torch


@contextmanager
def _user_errors() -> Iterator[None]:
    """Expected failures of our own modules become one-line user errors."""
    from nnunet_gmd.sentiment.checkpoint import CheckpointError
    from nnunet_gmd.sentiment.train import TrainingError
    try:
        yield
    except (SentimentDataError, CheckpointError, TrainingError) as e:
        raise UserError(str(e)) from None


def _device(name: str) -> torch.device:
    import torch   # here, not at the top: building the parser (``nnunet-gmd --help``) must not import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device torch knows (use cpu, cuda, cuda:N or auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} was requested, but no CUDA device is available")
    return device


def _subsets_per_step(text: str) -> int | None:
    if text == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'all' or an integer, got {text!r}") from None


def _load(path: str, fix_nonfinite: bool) -> SentimentData:
    if Path(path).is_dir():
        raise UserError(f"{path}: a folder, but not a table folder (no labels.csv); see docs/sentiment.md")
    with _user_errors():
        data = load_sentiment_file(path, fix_nonfinite=fix_nonfinite)
    print(data.describe())
    for where, count in data.nonfinite_fixed.items():
        print(f"note: set {count} NaN/inf value(s) in {where} to 0 (--fix-nonfinite)")
    return data


def load_table(path: str) -> UtteranceTable:
    with _user_errors():
        table = load_table_folder(path)
    print(table.describe())
    return table


def _load_for_training(args: argparse.Namespace) -> tuple[SentimentData, bool]:
    """A pickle with its own splits, or a table folder split by whole videos (``--valid-videos``, seeded)."""
    if not is_table_folder(args.data):
        if args.valid_videos is not None:
            raise UserError(f"--valid-videos applies to table folders; {args.data} has its own valid split")
        return _load(args.data, args.fix_nonfinite), False
    table = load_table(args.data)
    k = args.valid_videos if args.valid_videos is not None else default_valid_videos(table)
    with _user_errors():
        videos = pick_valid_videos(table, k, args.seed)
    print(f"validation: {k} of {len(table.videos)} videos held out (seed {args.seed}): {', '.join(videos)}")
    return split_by_videos(table, videos), True


def _number(parse: type, valid, what: str):
    """An argparse ``type=``: ``parse`` the value, refuse it unless ``valid`` (one line, no traceback)."""
    def convert(value: str):
        try:
            x = parse(value)
        except ValueError:
            x = None
        if x is None or x != x or not valid(x):   # x != x: NaN
            raise argparse.ArgumentTypeError(f"must be {what}, got {value!r}")
        return x
    return convert


_positive_int = _number(int, lambda n: n >= 1, "a positive integer")
_positive_float = _number(float, lambda x: 0 < x < float("inf"), "a positive number")
_fraction = _number(float, lambda x: 0 <= x < 1, "a number in [0, 1)")
_nonnegative_float = _number(float, lambda x: 0 <= x < float("inf"), "a non-negative number")


def _output_folder(value: str) -> str:
    """``--out``: refused at once when it is a file or cannot be created (before any data is read)."""
    from nnunet_gmd.atomic import output_folder_problem

    problem = output_folder_problem(value)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return value


def _backbone(choice: str, is_table: bool) -> str:
    """``auto``: an MLP for utterance-level features (one step each), the Transformer for sequences."""
    return ("mlp" if is_table else "transformer") if choice == "auto" else choice


def cmd_train(args: argparse.Namespace) -> int:
    from nnunet_gmd.sentiment.train import TrainConfig, train

    device = _device(args.device)
    data, is_table = _load_for_training(args)
    hint = None if is_table else dataset_mismatch_hint(data, args.dataset)
    if hint:
        print(f"warning: {hint}", file=sys.stderr)
    with _user_errors():
        config = TrainConfig(dataset=args.dataset, method=args.method, subsets_per_step=args.subsets,
                             epochs=args.epochs, seed=args.seed, batch_size=args.batch_size, lr=args.lr,
                             weight_decay=args.weight_decay, gmd_reduction=args.gmd_reduction, hidden=args.hidden,
                             layers=args.layers, heads=args.heads, dropout=args.dropout,
                             backbone=_backbone(args.backbone, is_table), modality_dropout=args.modality_dropout,
                             valid_videos=len(set(data.splits["valid"].video_ids)) if is_table else None)
        result = train(data, config, args.out, resume=args.resume, device=device)
    if result.epochs_run == 0:
        print(f"nothing to train: the run in {args.out} already has {len(result.history)} epoch(s); raise --epochs")
    print(f"best epoch {result.best_epoch} (valid MAE {result.best_score:.4f}); checkpoint: {result.checkpoint}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from nnunet_gmd.sentiment.batching import SplitTensors
    from nnunet_gmd.sentiment.checkpoint import load_checkpoint, model_from_checkpoint
    from nnunet_gmd.sentiment.evaluate import evaluate_subsets, missing_rate_curve, subset_counts, write_reports

    device = _device(args.device)
    with _user_errors():
        state = load_checkpoint(args.checkpoint)
    is_table = is_table_folder(args.data)
    if is_table:
        if args.split is not None:
            raise UserError(f"--split applies to pickles; the table folder {args.data} is scored whole (all of "
                            f"its videos)")
        data, split = whole_folder(load_table(args.data)), "test"
    else:
        data, split = _load(args.data, args.fix_nonfinite), args.split or "test"
    trained = list(state["model_config"]["feature_dims"])
    have = [data.feature_dims[m] for m in MODALITIES]
    if trained != have:
        raise UserError(f"{args.data}: feature sizes {have} ({', '.join(MODALITIES)}) do not match the "
                        f"checkpoint's {trained} ({args.checkpoint})")
    model = model_from_checkpoint(state).to(device)
    tensors = SplitTensors(data.splits[split])
    metrics = evaluate_subsets(model, tensors, batch_size=args.batch_size, device=device)
    counts = subset_counts(tensors)
    curve = (missing_rate_curve(model, tensors, seed=args.seed, batch_size=args.batch_size, device=device)
             if args.missing_rate_curve else None)
    cfg = state["train_config"]
    where = f"all {len(tensors)} utterances" if is_table else split
    title = f"{cfg['dataset'].upper()} {cfg['method']} ({where}, {Path(args.data).name})"
    written = write_reports(args.out, metrics, title, curve, counts if is_table else None)
    for name, row in metrics.items():
        print(f"{name:>4}  N {counts[name]:>5}  MAE {row['MAE']:.4f}  Corr {row['Corr']:.4f}  "
              f"Non0_acc_2 {row['Non0_acc_2']:.4f}  Mult_acc_7 {row['Mult_acc_7']:.4f}")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _benchmark_folds(args: argparse.Namespace) -> tuple[list, str]:
    """``--train``/``--test`` folders, or ``--cv K`` video-level folds over one ``--data`` folder; and a title."""
    from nnunet_gmd.sentiment.benchmark import Fold
    from nnunet_gmd.sentiment.tables import video_folds

    if args.data is not None:
        if args.train is not None or args.test is not None:
            raise UserError("give either --data with --cv, or --train and --test")
        if args.cv is None:
            raise UserError("--data needs --cv K (video-level K-fold cross-validation over that folder)")
        if not is_table_folder(args.data):
            raise UserError(f"{args.data}: not a table folder (no labels.csv); the benchmark needs utterance tables")
        table = load_table(args.data)
        with _user_errors():
            groups = video_folds(table, args.cv, args.cv_seed)
        print(f"{args.cv}-fold cross-validation over {len(table.videos)} videos (fold seed {args.cv_seed}): "
              + ", ".join(str(len(g)) for g in groups) + " test videos per fold")
        folds = [Fold(train=table.select_videos([v for g in groups if g is not group for v in g]),
                      test=table.select_videos(group)) for group in groups]
        return folds, f"{args.cv}-fold video CV on {Path(args.data).name}"
    if args.train is None or args.test is None:
        raise UserError("give --train and --test folders, or --data FOLDER --cv K")
    if args.cv is not None:
        raise UserError("--cv applies to a single --data folder")
    for path in (args.train, args.test):
        if not is_table_folder(path):
            raise UserError(f"{path}: not a table folder (no labels.csv); the benchmark needs utterance tables")
    train, test = load_table(args.train), load_table(args.test)
    shared = sorted(set(train.videos) & set(test.videos))
    if shared:
        raise UserError(f"{args.test}: {len(shared)} video(s) also in {args.train} (e.g. {shared[0]}); test videos "
                        f"must be unseen")
    if train.feature_dims != test.feature_dims:
        raise UserError(f"{args.test}: feature sizes {train.feature_dims} in {args.train} but {test.feature_dims} here")
    return [Fold(train=train, test=test)], f"{Path(args.train).name} -> {Path(args.test).name}"


def _benchmark_command(args: argparse.Namespace) -> str:
    """The full command with every setting spelled out, so a results file says exactly how to reproduce it."""
    where = (["--data", args.data, "--cv", args.cv, "--cv-seed", args.cv_seed] if args.data is not None
             else ["--train", args.train, "--test", args.test])
    opts = ["--seeds", args.seeds, "--methods", args.methods, "--gmd-k", args.gmd_k, "--epochs", args.epochs,
            "--batch-size", args.batch_size, "--lr", args.lr, "--hidden", args.hidden, "--layers", args.layers,
            "--dropout", args.dropout, "--backbone", args.backbone, "--modality-dropout", args.modality_dropout]
    if args.valid_videos is not None:
        opts += ["--valid-videos", args.valid_videos]
    if args.weight_decay:
        opts += ["--weight-decay", args.weight_decay]
    return " ".join(["nnunet-gmd sentiment benchmark", *map(str, where), *map(str, opts), "--out", args.out])


def cmd_benchmark(args: argparse.Namespace) -> int:
    from nnunet_gmd.sentiment.benchmark import METHODS, BenchmarkConfig, run_benchmark, summarize, write_benchmark
    from nnunet_gmd.sentiment.train import TrainConfig

    device = _device(args.device)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UserError(f"--methods: unknown {unknown or 'empty list'}; choose from {', '.join(METHODS)}")
    if args.seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {args.seeds}")
    folds, where = _benchmark_folds(args)
    with _user_errors():
        base = TrainConfig(dataset=args.dataset, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                           weight_decay=args.weight_decay, hidden=args.hidden, layers=args.layers,
                           dropout=args.dropout, backbone=_backbone(args.backbone, True),
                           modality_dropout=args.modality_dropout, gmd_reduction=args.gmd_reduction)
        if not 1 <= args.gmd_k <= 7:
            raise UserError(f"--gmd-k must be in [1, 7], got {args.gmd_k}")
        config = BenchmarkConfig(base=base, seeds=args.seeds, methods=methods, gmd_k=args.gmd_k,
                                 valid_videos=args.valid_videos)
        for fold in folds:
            if config.valid_videos is not None and not 1 <= config.valid_videos < len(fold.train.videos):
                raise UserError(f"--valid-videos must be in [1, {len(fold.train.videos) - 1}] (videos in a training "
                                f"part), got {config.valid_videos}")
        result = run_benchmark(folds, config, device)
    summary = summarize(result)
    labels = {m: config.label(m) for m in methods}
    command = _benchmark_command(args)
    title = f"{args.dataset.upper()} sentiment benchmark: {where}"
    paths = write_benchmark(args.out, summary, labels, title, command)
    for name in methods:
        r = summary["methods"][name]
        print(f"{labels[name]:<34} mean MAE over 7 subsets {r['mean_mae_7']['mean']:.3f} ± "
              f"{r['mean_mae_7']['std']:.3f}; LAV MAE {r['mean']['LAV']['MAE']:.3f}, "
              f"Non0_acc_2 {r['mean']['LAV']['Non0_acc_2']:.3f}")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def cmd_synthetic(args: argparse.Namespace) -> int:
    from nnunet_gmd.sentiment.synthetic import write_synthetic

    path = write_synthetic(args.out, fmt=args.format, dataset=args.dataset,
                           sizes=(args.train, args.valid, args.test), text_dim=args.text_dim, seed=args.seed)
    print(f"wrote {path} (synthetic {args.format} {args.dataset.upper()}-shaped features; not real data)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("sentiment", help="CMU-MOSI / CMU-MOSEI with the DS + GMD core",
                                   description="Multimodal sentiment regression (text, audio, vision) with a "
                                               "Dynamic Sharing network trained by GMD. See docs/sentiment.md.")
    sub = parser.add_subparsers(dest="sentiment_command", metavar="SUBCOMMAND")
    sub.required = True

    data_help = ("MMSA aligned_50.pkl / unaligned_50.pkl, MulT mosi_data.pkl / mosei_senti_data.pkl, or a folder of "
                 "utterance tables (labels.csv, text/audio/vision .csv or .npz)")
    valid_help = (f"table folders: whole videos held out for model selection, drawn with --seed (default: "
                  f"{DEFAULT_VALID_FRACTION * 100:.0f}%% of the videos)")
    backbone_help = "DS backbone; auto: mlp for utterance tables (one vector per utterance), transformer otherwise"
    nonfinite_help = "set NaN/inf features to 0 instead of refusing the file (MOSEI's audio has known -inf values)"
    device_help = "cpu, cuda or auto (cuda when available)"

    t = sub.add_parser("train", help="train on the train split, select on valid")
    t.add_argument("--data", required=True, help=data_help)
    t.add_argument("--dataset", required=True, choices=("mosi", "mosei"))
    t.add_argument("--out", type=_output_folder, required=True, help="run folder: last.pt, best.pt, history.json, training_curve.png")
    t.add_argument("--method", default="gmd", choices=("gmd", "ds", "full", "early", "early_dropout"),
                   help="gmd: decoupled subset gradients (default); ds: mean of subset losses; full: all "
                        "modalities only; early: early-fusion MLP, missing modalities zero-filled; early_dropout: "
                        "the same with random modality dropout")
    t.add_argument("--valid-videos", type=int, default=None, metavar="K", help=valid_help)
    t.add_argument("--backbone", default="auto", choices=("auto", "transformer", "mlp"), help=backbone_help)
    t.add_argument("--modality-dropout", type=float, default=0.5,
                   help="early_dropout: chance that each modality of a sample is dropped in training")
    t.add_argument("--subsets", type=_subsets_per_step, default=None, metavar="all|k",
                   help="subsets per step: all 7 (default) or k drawn at random")
    t.add_argument("--epochs", type=_positive_int, default=30, help="training epochs (default %(default)s)")
    t.add_argument("--seed", type=int, default=0, help="training seed (default %(default)s)")
    t.add_argument("--batch-size", type=_positive_int, default=32, help="utterances per step (default %(default)s)")
    t.add_argument("--lr", type=_positive_float, default=1e-3, help="Adam learning rate (default %(default)s)")
    t.add_argument("--weight-decay", type=_nonnegative_float, default=0.0, help="(default %(default)s)")
    t.add_argument("--hidden", type=_positive_int, default=64, help="common width of all modalities")
    t.add_argument("--layers", type=_positive_int, default=2, help="shared backbone blocks (early fusion: hidden layers)")
    t.add_argument("--heads", type=_positive_int, default=4, help="Transformer heads (default %(default)s)")
    t.add_argument("--dropout", type=_fraction, default=0.1, help="dropout in [0, 1) (default %(default)s)")
    t.add_argument("--gmd-reduction", default="mean", choices=("mean", "sum"),
                   help="mean: official code (default); sum: paper Eq. 9")
    t.add_argument("--fix-nonfinite", action="store_true", help=nonfinite_help)
    t.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    t.add_argument("--device", default="auto", help=device_help)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="MMSA metrics for all 7 modality subsets")
    e.add_argument("--checkpoint", required=True, help="best.pt or last.pt from 'sentiment train'")
    e.add_argument("--data", required=True, help=data_help)
    e.add_argument("--out", type=_output_folder, required=True, help="folder for metrics.json, metrics.md, metrics.png")
    e.add_argument("--split", default=None, choices=SPLITS,
                   help="pickles: which split (default test); a table folder is always scored whole")
    e.add_argument("--missing-rate-curve", action="store_true",
                   help="also evaluate random per-sample missing modalities at rates 0.0 to 0.7")
    e.add_argument("--seed", type=int, default=0, help="seed of the random missing-rate draws")
    e.add_argument("--batch-size", type=_positive_int, default=64, help="(default %(default)s)")
    e.add_argument("--fix-nonfinite", action="store_true", help=nonfinite_help)
    e.add_argument("--device", default="auto", help=device_help)
    e.set_defaults(func=cmd_evaluate)

    b = sub.add_parser("benchmark", help="GMD vs its baselines on unseen videos, all 7 subsets, over seeds",
                       description="Trains GMD, GMD k-sampled, DS, late-fusion DS (full set), early fusion and early "
                                   "fusion with modality dropout under one budget, selects each on validation videos "
                                   "of the training part, and scores unseen videos with MMSA's metrics.")
    b.add_argument("--train", help="table folder to train on")
    b.add_argument("--test", help="table folder of other videos to score")
    b.add_argument("--data", help="one table folder, with --cv K: video-level K-fold cross-validation")
    b.add_argument("--cv", type=int, default=None, metavar="K", help="number of video folds for --data")
    b.add_argument("--cv-seed", type=int, default=0, help="seed of the video-to-fold assignment")
    b.add_argument("--out", type=_output_folder, required=True, help="folder for benchmark_results.{md,csv,json,png} and dominance.png")
    b.add_argument("--seeds", type=_positive_int, default=3, help="seeds per method (and fold)")
    b.add_argument("--methods", default="gmd,gmd_k,ds,late_full,early,early_dropout",
                   help="comma-separated subset of gmd, gmd_k, ds, late_full, early, early_dropout")
    b.add_argument("--gmd-k", type=int, default=3, help="subsets drawn per step by gmd_k")
    b.add_argument("--dataset", default="mosi", choices=("mosi", "mosei"), help="name used in titles")
    b.add_argument("--valid-videos", type=int, default=None, metavar="K",
                   help="validation videos drawn from each training part (default 15%% of its videos)")
    b.add_argument("--epochs", type=_positive_int, default=10, help="epochs per training (default %(default)s)")
    b.add_argument("--batch-size", type=_positive_int, default=32, help="(default %(default)s)")
    b.add_argument("--lr", type=_positive_float, default=1e-3, help="(default %(default)s)")
    b.add_argument("--weight-decay", type=_nonnegative_float, default=0.0, help="(default %(default)s)")
    b.add_argument("--hidden", type=_positive_int, default=128, help="width (chosen on validation videos, docs/sentiment.md)")
    b.add_argument("--layers", type=_positive_int, default=1, help="DS backbone blocks / early-fusion hidden layers")
    b.add_argument("--dropout", type=_fraction, default=0.1, help="(default %(default)s)")
    b.add_argument("--backbone", default="auto", choices=("auto", "transformer", "mlp"), help=backbone_help)
    b.add_argument("--modality-dropout", type=float, default=0.5, help="early_dropout's drop rate (default %(default)s)")
    b.add_argument("--gmd-reduction", default="mean", choices=("mean", "sum"), help="(default %(default)s)")
    b.add_argument("--device", default="auto", help=device_help)
    b.set_defaults(func=cmd_benchmark)

    s = sub.add_parser("synthetic", help="write a synthetic feature file in the MMSA or MulT layout (demo, tests)")
    s.add_argument("--out", type=_output_folder, required=True, help="pickle file to write")
    s.add_argument("--format", default="mmsa-aligned", choices=FORMATS, help="(default %(default)s)")
    s.add_argument("--dataset", default="mosi", choices=("mosi", "mosei"),
                   help="which dataset's audio/vision feature sizes to use")
    s.add_argument("--train", type=int, default=256, help="training utterances (default %(default)s)")
    s.add_argument("--valid", type=int, default=64, help="(default %(default)s)")
    s.add_argument("--test", type=int, default=64, help="(default %(default)s)")
    s.add_argument("--text-dim", type=int, default=None, help="default: 768 (MMSA, BERT) or 300 (MulT, GloVe)")
    s.add_argument("--seed", type=int, default=0, help="(default %(default)s)")
    s.set_defaults(func=cmd_synthetic)
