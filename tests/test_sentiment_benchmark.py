"""``sentiment benchmark`` on small tables written by the test: video-level CV, every method, every report file."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from nnunet_gmd.cli import main
from test_sentiment_tables import make_tables

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SUBSETS = ["L", "A", "V", "LA", "LV", "AV", "LAV"]
FAST = ["--epochs", "3", "--hidden", "16", "--batch-size", "16", "--device", "cpu"]


def test_cross_validated_benchmark_writes_every_report(tmp_path, capsys):
    make_tables(tmp_path / "t", videos=8, per_video=6, seed=4, drop={"vision": ["vid0_0", "vid5_3"]})
    out = tmp_path / "bench"
    assert main(["sentiment", "benchmark", "--data", str(tmp_path / "t"), "--cv", "4", "--seeds", "2",
                 "--valid-videos", "1", "--out", str(out), *FAST]) == 0
    printed = capsys.readouterr().out
    assert "4-fold cross-validation over 8 videos" in printed
    result = json.loads((out / "benchmark_results.json").read_text())
    assert list(result["methods"]) == ["gmd", "gmd_k", "ds", "late_full", "early", "early_dropout"]
    folds = result["settings"]["folds"]
    assert sorted(v for f in folds for v in f) == [f"vid{i}" for i in range(8)]  # each video tested once
    assert result["n_test_utterances"] == 48 and result["n_test_videos"] == 8
    for name, r in result["methods"].items():
        assert len(r["per_seed"]) == 2 and list(r["mean"]) == SUBSETS
        assert r["n"]["L"] == 48 and r["n"]["V"] == 46 and r["n"]["LAV"] == 46  # missing vision is not scored
        maes = [r["per_seed"][s]["LAV"]["MAE"] for s in range(2)]
        assert r["mean"]["LAV"]["MAE"] == pytest.approx(np.mean(maes))
        assert r["std"]["LAV"]["MAE"] == pytest.approx(np.std(maes))
    # the label is learnable from every modality, so three epochs already beat predicting the training mean
    assert result["methods"]["gmd"]["mean"]["LAV"]["MAE"] < result["references"]["train mean"]["LAV"]["MAE"]
    d = result["gmd_vs_baselines"]["late_full"]
    assert d["ci95_low"] <= d["difference"] <= d["ci95_high"]
    assert result["dominance"]["gmd"]["epoch"] == [1, 2, 3]
    assert all(v > 0 for v in result["dominance"]["gmd"]["grad_norm_A"])

    table = (out / "benchmark_results.md").read_text()
    assert "nnunet-gmd sentiment benchmark --data" in table and "| GMD (all 7 subsets) |" in table
    assert "GMD minus each baseline" in table
    rows = list(csv.DictReader((out / "benchmark_results.csv").open()))
    assert len([r for r in rows if r["method"] != "reference"]) == 6 * 2 * 7
    for png in ("benchmark_results.png", "dominance.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC


def test_train_test_mode_refuses_shared_videos_and_bad_arguments(tmp_path, capsys):
    make_tables(tmp_path / "a", videos=4, seed=1)
    make_tables(tmp_path / "b", videos=2, seed=2)  # the same video names vid0, vid1
    assert main(["sentiment", "benchmark", "--train", str(tmp_path / "a"), "--test", str(tmp_path / "b"),
                 "--out", str(tmp_path / "o"), *FAST]) == 2
    assert "2 video(s) also in" in capsys.readouterr().err
    assert main(["sentiment", "benchmark", "--data", str(tmp_path / "a"), "--out", str(tmp_path / "o")]) == 2
    assert "--data needs --cv K" in capsys.readouterr().err
    assert main(["sentiment", "benchmark", "--data", str(tmp_path / "a"), "--cv", "2", "--methods", "gmd,magic",
                 "--out", str(tmp_path / "o")]) == 2
    assert "unknown ['magic']" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_train_test_mode_runs_selected_methods(tmp_path):
    make_tables(tmp_path / "a", videos=5, per_video=4, seed=1)
    b = make_tables(tmp_path / "b", videos=2, per_video=4, seed=2, prefix="new")  # unseen videos
    out = tmp_path / "o"
    assert main(["sentiment", "benchmark", "--train", str(tmp_path / "a"), "--test", str(tmp_path / "b"),
                 "--methods", "gmd,early", "--seeds", "1", "--out", str(out), *FAST]) == 0
    result = json.loads((out / "benchmark_results.json").read_text())
    assert list(result["methods"]) == ["gmd", "early"] and result["n_test_utterances"] == len(b["ids"])
    assert result["settings"]["folds"] == [["new0", "new1"]]
