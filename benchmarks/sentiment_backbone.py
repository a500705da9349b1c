"""Which DS backbone for utterance-level features? A short measurement on validation videos only.

Takes the training part of fold 0 of the benchmark's video-level cross-validation (the fold's test videos are
never loaded into a model here), holds out validation videos from it (seeded) and trains GMD with each
candidate for the same number of epochs. Reports the best validation mean MAE over the 7 subsets, the
validation LAV MAE at that epoch and the wall-clock seconds per epoch. Usage:

    python benchmarks/sentiment_backbone.py DATA_FOLDER [--epochs 12] [--out benchmarks/mosi/backbone.json]
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from nnunet_gmd.atomic import write_json
from nnunet_gmd.sentiment.benchmark import fit
from nnunet_gmd.sentiment.tables import (default_valid_videos, load_table_folder, pick_valid_videos,
                                         split_by_videos, video_folds)
from nnunet_gmd.sentiment.train import TrainConfig

CANDIDATES = {
    "transformer, 1 block (attention over 1 step)": dict(backbone="transformer", layers=1),
    "MLP, 1 block": dict(backbone="mlp", layers=1),
    "MLP, 2 blocks": dict(backbone="mlp", layers=2),
    "MLP, 1 block, width 128": dict(backbone="mlp", layers=1, hidden=128),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--cv", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    table = load_table_folder(args.data)
    test_videos = set(video_folds(table, args.cv, 0)[0])
    train = table.select_videos([v for v in table.videos if v not in test_videos])
    data = split_by_videos(train, pick_valid_videos(train, default_valid_videos(train), 0))
    base = TrainConfig(dataset="mosi", method="gmd", epochs=args.epochs, batch_size=args.batch_size, hidden=64,
                       heads=4, dropout=0.1)
    rows = {}
    for name, overrides in CANDIDATES.items():
        started = time.time()
        _, history, best = fit(data, replace(base, **overrides), torch.device("cpu"))
        seconds = (time.time() - started) / args.epochs
        entry = history[best - 1]
        rows[name] = {"best_epoch": best, "valid_mean_mae_7": entry["valid_score"],
                      "valid_lav_mae": entry["valid_mae"]["LAV"], "seconds_per_epoch": seconds,
                      "valid_curve": [h["valid_score"] for h in history]}
        print(f"{name:<46} valid mean MAE (7 subsets) {entry['valid_score']:.3f} at epoch {best}, "
              f"LAV {entry['valid_mae']['LAV']:.3f}, {seconds:.2f} s/epoch", flush=True)
    if args.out:
        write_json(args.out, {"protocol": __doc__.split("\n\n")[1], "train_videos": len(train.videos),
                              "valid_videos": len(set(data.splits["valid"].video_ids)),
                              "epochs": args.epochs, "batch_size": args.batch_size, "candidates": rows})


if __name__ == "__main__":
    main()
