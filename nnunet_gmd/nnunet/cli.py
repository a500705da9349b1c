"""``nnunet-gmd`` sub-commands of the nnU-Net integration.

The heavy modules (torch, nnU-Net) are imported inside each command, so ``nnunet-gmd --help`` stays fast.
Options that ``nnUNetv2_predict`` has keep its spelling (``-step_size``, ``-npp``, ``-device``, ...).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from pathlib import Path
from typing import Iterator

from nnunet_gmd.nnunet import ext_trainer_path

# The trainer the quick start and the demo train: GMD (k=5) on the feature-fusion network, the best DS network
# measured on BraTS (+0.034 / +0.043 Dice over the logit-fusion DS network with a sequence missing / on the full
# set, issue 10 run 10), at the cost of a DS-FF step (run 11). Until 2026-12-07: exact logit-fusion GMD.
DEFAULT_TRAINER = "nnUNetTrainerGMD_k5_FF"


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name) or default)
    except ValueError:
        return default


def _ext_path(args: argparse.Namespace) -> int:
    print(ext_trainer_path())
    return 0


def _fold(value: str) -> int | str:
    return value if value == "all" else int(value)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-d", dest="dataset", required=True, help="dataset name or id")
    p.add_argument("-c", dest="configuration", required=True, help="nnU-Net configuration, e.g. 3d_fullres")
    p.add_argument("-tr", dest="trainer", default=DEFAULT_TRAINER,
                   help=f"trainer the model was trained with (default {DEFAULT_TRAINER}; any trainer works, "
                        "stock nnUNetTrainer included)")
    p.add_argument("-p", dest="plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("-chk", dest="checkpoint", default="checkpoint_final.pth",
                   help="checkpoint file name (default checkpoint_final.pth)")
    p.add_argument("-step_size", type=float, default=0.5, help="sliding-window step as a fraction of the patch "
                                                                "(default 0.5, as nnU-Net)")
    p.add_argument("--disable_tta", action="store_true", help="no mirroring test-time augmentation (faster)")
    p.add_argument("-npp", type=int, default=_env_int("nnUNet_npp", 3),
                   help="preprocessing processes (default 3); -npp 0 -nps 0 runs without worker processes "
                        "(evaluate preprocesses each case once, in-process, and ignores -npp)")
    p.add_argument("-nps", type=int, default=_env_int("nnUNet_nps", 3), help="export processes (default 3)")
    p.add_argument("-device", default=None, choices=("cuda", "cpu", "mps"),
                   help="default: cuda when available, else cpu")


@contextlib.contextmanager
def _plain_warnings(command: str) -> Iterator[None]:
    """Show our UserWarnings (e.g. "channels are zero-filled") as one line, without Python's source echo."""
    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, UserWarning) and not issubclass(category, (DeprecationWarning, FutureWarning)):
            print(f"nnunet-gmd {command}: warning: {message}", file=sys.stderr)
        else:
            original(message, category, filename, lineno, file, line)

    original = warnings.showwarning
    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = original


def _device(args: argparse.Namespace) -> str:
    if args.device:
        return args.device
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------------- predict
def _predict(args: argparse.Namespace) -> int:
    from nnunet_gmd.atomic import output_folder_problem
    from nnunet_gmd.errors import UserError
    from nnunet_gmd.nnunet.model import TrainedModel, model_folder
    from nnunet_gmd.nnunet.cases import find_cases
    from nnunet_gmd.nnunet.predict import predict_cases
    from nnunet_gmd.subsets import parse_subset, subset_name

    problem = output_folder_problem(args.o, input_folder=args.i)
    if problem:
        raise UserError(f"-o: {problem}")
    folder = model_folder(args.dataset, args.trainer, args.plans, args.configuration)
    model = TrainedModel.load(folder, args.folds, args.checkpoint, _device(args), args.step_size,
                              not args.disable_tta, verbose=args.verbose, allow_tqdm=not args.disable_progress_bar)
    names = model.channel_names
    forced = None
    if args.available:
        try:
            forced = parse_subset(args.available, names)
        except ValueError as e:
            raise UserError(f"--available: {e}") from None
    with _plain_warnings("predict"):
        cases = find_cases(Path(args.i), model.predictor.dataset_json["file_ending"], names)
        used = predict_cases(model.predictor, cases, Path(args.o), forced=forced,
                             overwrite=not args.continue_prediction, save_probabilities=args.save_probabilities,
                             num_processes_preprocessing=args.npp, num_processes_segmentation_export=args.nps,
                             progress=not args.disable_progress_bar)
    full = tuple(range(len(names)))
    partial = {c: s for c, s in used.items() if s != full}
    how = "switched off" if model.ds is not None else "zero-filled"
    print(f"predicted {len(used)} case(s) into {args.o}; {len(partial)} with channels {how}"
          + "".join(f"\n  {c}: {subset_name(s, names)}" for c, s in sorted(partial.items())))
    return 0


# ---------------------------------------------------------------------------------------------- evaluate
def _evaluate(args: argparse.Namespace) -> int:
    from nnunet_gmd.nnunet.evaluate import evaluate_missing_modalities
    from nnunet_gmd.nnunet.model import TrainedModel, model_folder, resolve_dataset_name
    from nnunet_gmd.report import to_markdown, write_report

    from nnunet_gmd.atomic import output_folder_problem
    from nnunet_gmd.errors import UserError

    folder = model_folder(args.dataset, args.trainer, args.plans, args.configuration)
    out_dir = Path(args.o) if args.o else folder / f"fold_{args.fold}" / "missing_modality"
    problem = output_folder_problem(out_dir)
    if problem:
        raise UserError(f"-o: {problem}")
    model = TrainedModel.load(folder, [args.fold], args.checkpoint, _device(args), args.step_size,
                              not args.disable_tta, allow_tqdm=False)
    with _plain_warnings("evaluate"):
        report = evaluate_missing_modalities(
            model, resolve_dataset_name(args.dataset), args.configuration, args.fold, out_dir,
            checkpoint=args.checkpoint, with_hd95=not args.no_hd95, num_processes_segmentation_export=args.nps)
    paths = write_report(report, out_dir)
    print(to_markdown(report))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


# ---------------------------------------------------------------------------------------------- compare
def _compare(args: argparse.Namespace) -> int:
    from nnunet_gmd.errors import UserError
    from nnunet_gmd.atomic import write_text
    from nnunet_gmd.report import check_comparable, compare_table, comparison_labels, load_report, plot_comparison

    paths = [Path(p) for p in args.reports]
    reports = [load_report(p) for p in paths]
    check_comparable(reports, paths)
    if args.labels and len(args.labels) != len(reports):
        raise UserError(f"--labels needs one label per report ({len(reports)}), got {len(args.labels)}")
    labels = list(args.labels) if args.labels else comparison_labels(reports, paths)
    if args.region and args.region not in reports[0].regions:
        raise UserError(f"--region {args.region!r} is not one of {', '.join(reports[0].regions)}")
    table = compare_table(reports, labels, args.region)
    print(table)
    out = Path(args.o)
    write_text(out / "missing_modality_comparison.md", table)
    plot_comparison(reports, labels, out / "missing_modality_comparison.png")
    print(f"wrote {out / 'missing_modality_comparison.md'}, {out / 'missing_modality_comparison.png'}")
    return 0


# ---------------------------------------------------------------------------------------------- convert-brats
def _convert_brats(args: argparse.Namespace) -> int:
    from nnunet_gmd.nnunet.convert_brats import convert_brats, summary

    target = convert_brats(Path(args.src), args.dataset_id, args.name,
                           raw_root=Path(args.raw_dir) if args.raw_dir else None, overwrite=args.overwrite,
                           allow_missing=args.allow_missing)
    print(summary(target))
    return 0


# ---------------------------------------------------------------------------------------------- export-bundle
def _export_bundle(args: argparse.Namespace) -> int:
    from nnunet_gmd.nnunet.export_bundle import export_bundle, load_source
    from nnunet_gmd.nnunet.model import model_folder

    folder = model_folder(args.dataset, args.trainer, args.plans, args.configuration)
    source = load_source(folder, args.folds, args.checkpoint, args.configuration)
    out = export_bundle(source, Path(args.o), overwrite=args.overwrite)
    print(f"wrote MONAI bundle {out} ({source.trainer}, {source.configuration}, fold {source.fold}); run it with\n"
          f"  python -m monai.bundle run --config_file {out}/configs/inference.json --bundle_root {out} "
          f"--dataset_dir DIR --output_dir OUT")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ext-path", help="print the folder to put in nnUNet_extTrainer "
                                        "(export nnUNet_extTrainer=$(nnunet-gmd ext-path))")
    p.set_defaults(func=_ext_path)

    p = sub.add_parser(
        "predict", help="nnUNetv2_predict for cases that lack some channel files",
        description="Predict like nnUNetv2_predict (same input layout and output files), but a case may lack "
                    "some CASE_XXXX channel files. A Dynamic Sharing model switches the absent branches off; "
                    "any other model gets them zero-filled, with a warning.")
    p.add_argument("-i", required=True, help="input folder with CASE_XXXX<file_ending> images")
    p.add_argument("-o", required=True, help="output folder")
    p.add_argument("-f", dest="folds", nargs="+", type=_fold, default=[0, 1, 2, 3, 4],
                   help="folds to ensemble (default 0 1 2 3 4)")
    p.add_argument("--available", default=None,
                   help="predict every case from these channels only, e.g. t1ce,flair (dataset.json names)")
    p.add_argument("--save_probabilities", action="store_true", help="also export probabilities (.npz)")
    p.add_argument("--continue_prediction", action="store_true", help="skip cases already predicted")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--disable_progress_bar", action="store_true")
    _add_model_args(p)
    p.set_defaults(func=_predict)

    p = sub.add_parser(
        "evaluate", help="robustness report: Dice/HD95 of a fold's validation cases under every channel subset",
        description="Predict the fold's validation cases (splits_final.json) from every non-empty subset of the "
                    "input channels and score them with nnU-Net's evaluation. Writes "
                    "missing_modality_report.{json,csv,md,png}. Finished subsets are reused on a re-run.")
    p.add_argument("-f", dest="fold", type=int, default=0, help="fold whose validation cases are used (default 0)")
    p.add_argument("-o", default=None, help="output folder (default: <model>/fold_F/missing_modality)")
    p.add_argument("--no-hd95", action="store_true", help="Dice only (HD95 costs ~0.5 s per region and case "
                                                           "at BraTS size)")
    _add_model_args(p)
    p.set_defaults(func=_evaluate)

    p = sub.add_parser(
        "export-bundle", help="trained DS-family model -> MONAI bundle (configs, weights, docs, licence)",
        description="Write a complete MONAI bundle for one fold of a Dynamic Sharing model trained by nnU-Net: "
                    "configs/inference.json (the trainer's network, nnU-Net's preprocessing, sliding window and "
                    "export from the plans), configs/metadata.json, models/model.pt, docs/README.md, LICENSE. "
                    "One fold per bundle; ensembles are refused.")
    p.add_argument("-d", dest="dataset", required=True, help="dataset name or id")
    p.add_argument("-c", dest="configuration", required=True, help="nnU-Net configuration, e.g. 3d_fullres")
    p.add_argument("-f", dest="folds", nargs="+", type=_fold, required=True,
                   help="the fold to export (one; 'all' for a model trained on every case)")
    p.add_argument("-tr", dest="trainer", default=DEFAULT_TRAINER, help=f"trainer (default {DEFAULT_TRAINER})")
    p.add_argument("-p", dest="plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("-chk", dest="checkpoint", default="checkpoint_final.pth",
                   help="checkpoint file name (default checkpoint_final.pth)")
    p.add_argument("-o", required=True, help="bundle folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty bundle folder")
    p.set_defaults(func=_export_bundle)

    p = sub.add_parser("compare", help="compare missing-modality reports side by side",
                       description="Print a subsets x methods Dice table and plot the reports' heatmaps side "
                                   "by side (missing_modality_comparison.{md,png} in -o).")
    p.add_argument("reports", nargs="+", help="missing_modality_report.json files")
    p.add_argument("--labels", nargs="+", default=None, help="one name per report (default: trainer names)")
    p.add_argument("--region", default=None, help="compare one region's Dice (default: mean over regions)")
    p.add_argument("-o", default=".", help="folder for the table and plot (default: current folder)")
    p.set_defaults(func=_compare)

    p = sub.add_parser("convert-brats", help="BraTS folder -> nnU-Net raw dataset with BraTS regions",
                       description="Convert <case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz (or t1n/t1c/t2w/t2f) into "
                                   "nnUNet_raw/DatasetNNN_NAME with the whole tumor / tumor core / enhancing "
                                   "tumor regions of nnU-Net's Dataset137. Cases without seg go to imagesTs.")
    p.add_argument("src", help="folder of BraTS case folders")
    p.add_argument("--dataset-id", type=int, required=True, help="nnU-Net dataset id (1-999)")
    p.add_argument("--name", default="BraTS", help="dataset name (default BraTS)")
    p.add_argument("--raw-dir", default=None, help="nnU-Net raw folder (default: $nnUNet_raw)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset of that id and name")
    p.add_argument("--allow-missing", action="store_true",
                   help="accept labelled cases that lack sequences: each is written as a zero image, and "
                        "modality_availability.json records what was really there (for the DS/GMD trainers)")
    p.set_defaults(func=_convert_brats)
