"""Training and evaluation on synthetic files: learnability, exact resume, and the CLI round trip."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nnunet_gmd.cli import main
from nnunet_gmd.sentiment.batching import SplitTensors
from nnunet_gmd.sentiment.checkpoint import load_checkpoint, model_from_checkpoint
from nnunet_gmd.sentiment.data import load_sentiment_file
from nnunet_gmd.sentiment.evaluate import evaluate_subsets
from nnunet_gmd.sentiment.metrics import METRIC_NAMES
from nnunet_gmd.sentiment.synthetic import write_synthetic
from nnunet_gmd.sentiment.train import TrainConfig, TrainingError, train

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

SUBSET_NAMES = ["L", "A", "V", "LA", "LV", "AV", "LAV"]
TINY_MODEL = ["--hidden", "16", "--layers", "1", "--heads", "2", "--device", "cpu"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"



def test_gmd_training_learns_the_synthetic_label(tmp_path):
    path = write_synthetic(tmp_path / "aligned_50.pkl", fmt="mmsa-aligned", sizes=(384, 96, 96), text_dim=32,
                           text_len=20, seed=1)
    data = load_sentiment_file(path)
    config = TrainConfig(dataset="mosi", method="gmd", epochs=8, hidden=32, layers=1, heads=2, dropout=0.0, lr=3e-3)
    result = train(data, config, tmp_path / "run", progress=False)
    model = model_from_checkpoint(load_checkpoint(result.checkpoint))
    metrics = evaluate_subsets(model, SplitTensors(data.splits["test"]))

    test_labels = data.splits["test"].labels
    mean_baseline = float(np.mean(np.abs(test_labels - data.splits["train"].labels.mean())))
    maes = {name: round(m["MAE"], 3) for name, m in metrics.items()}
    print(f"\ntest MAE, predicting the train mean: {mean_baseline:.3f}; GMD model: {maes}")
    assert maes["LAV"] < 0.5 * mean_baseline
    assert all(mae < 0.75 * mean_baseline for mae in maes.values())
    assert maes["LAV"] < maes["A"] and maes["LAV"] < maes["V"]  # more modalities help
    assert metrics["LAV"]["Corr"] > 0.8
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert "mean_conflicts" in result.history[0]


def _tiny_file(tmp_path, fmt="mmsa-unaligned"):
    return write_synthetic(tmp_path / f"{fmt}.pkl", fmt=fmt, sizes=(48, 16, 16), text_dim=8, text_len=10,
                           unaligned_lengths=(14, 12), seed=2)


def test_resume_continues_exactly_where_it_stopped(tmp_path):
    data = load_sentiment_file(_tiny_file(tmp_path))
    common = dict(dataset="mosi", method="gmd", subsets_per_step=3, hidden=16, layers=1, heads=2, batch_size=16)
    straight = train(data, TrainConfig(epochs=3, **common), tmp_path / "straight", progress=False)
    train(data, TrainConfig(epochs=1, **common), tmp_path / "split", progress=False)
    killed = tmp_path / "split" / ".training_curve.png.x1y2z3.tmp"   # what a kill during a save leaves
    killed.write_bytes(b"half a png")
    resumed = train(data, TrainConfig(epochs=3, **common), tmp_path / "split", resume=True, progress=False)
    assert not killed.exists() and not list((tmp_path / "split").glob(".*.tmp"))

    a, b = load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(tmp_path / "split" / "last.pt")
    assert a["epoch"] == b["epoch"] == 3 and len(resumed.history) == 3
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=0, msg=key)
    assert [h["valid_score"] for h in resumed.history] == [h["valid_score"] for h in straight.history]

    with pytest.raises(TrainingError, match="already holds a training run"):
        train(data, TrainConfig(epochs=3, **common), tmp_path / "split", progress=False)
    with pytest.raises(TrainingError, match="method: checkpoint 'gmd', now 'ds'"):
        train(data, TrainConfig(epochs=4, **{**common, "method": "ds"}), tmp_path / "split", resume=True,
              progress=False)


@pytest.mark.parametrize("method", ["ds", "full"])
def test_other_trainers_run_and_select_on_their_subsets(tmp_path, method):
    data = load_sentiment_file(_tiny_file(tmp_path, "mult"))
    result = train(data, TrainConfig(dataset="mosei", method=method, epochs=1, hidden=16, layers=1, heads=2),
                   tmp_path / "run", progress=False)
    expected = ["LAV"] if method == "full" else SUBSET_NAMES
    if method == "full":
        with pytest.raises(TrainingError, match="--subsets applies to --method gmd and ds"):
            TrainConfig(dataset="mosi", method="full", subsets_per_step=3)
    assert list(result.history[0]["valid_mae"]) == expected
    assert result.checkpoint.is_file()


def test_cli_train_then_evaluate_round_trip(tmp_path, capsys):
    data, run, report = _tiny_file(tmp_path), tmp_path / "run", tmp_path / "report"
    def argv(epochs: int) -> list[str]:
        return ["sentiment", "train", "--data", str(data), "--dataset", "mosi", "--epochs", str(epochs),
                "--out", str(run), "--batch-size", "16", *TINY_MODEL]

    assert main(argv(2)) == 0
    assert {p.name for p in run.iterdir()} == {"last.pt", "best.pt", "history.json", "training_curve.png",
                                              "dominance.png"}  # GMD (the default) also draws dominance
    assert len(json.loads((run / "history.json").read_text())) == 2
    assert main(argv(2)) == 2  # refuses to overwrite the run
    assert "pass --resume" in capsys.readouterr().err
    assert main([*argv(3), "--resume"]) == 0
    assert len(json.loads((run / "history.json").read_text())) == 3
    capsys.readouterr()
    assert main([*argv(3), "--resume"]) == 0
    assert "nothing to train" in capsys.readouterr().out

    assert main(["sentiment", "evaluate", "--checkpoint", str(run / "best.pt"), "--data", str(data),
                 "--out", str(report), "--missing-rate-curve", "--device", "cpu"]) == 0
    metrics = json.loads((report / "metrics.json").read_text())
    assert list(metrics) == SUBSET_NAMES
    for row in metrics.values():
        assert list(row) == list(METRIC_NAMES)
        assert 0 <= row["Has0_acc_2"] <= 1 and row["MAE"] > 0
    table = (report / "metrics.md").read_text()
    assert all(f"| {name} |" in table for name in SUBSET_NAMES)
    curve = json.loads((report / "missing_rate_curve.json").read_text())
    assert [c["missing_rate"] for c in curve] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    assert curve[0]["available_fraction"] == 1.0 and curve[-1]["available_fraction"] < 0.6
    assert curve[0]["MAE"] == pytest.approx(metrics["LAV"]["MAE"])  # rate 0 is the full set
    for png in ("metrics.png", "missing_rate_curve.png"):
        assert (report / png).read_bytes()[:8] == PNG_MAGIC
    assert (run / "training_curve.png").read_bytes()[:8] == PNG_MAGIC
    assert (run / "dominance.png").read_bytes()[:8] == PNG_MAGIC


def test_cli_evaluate_refuses_a_file_with_other_feature_sizes(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["sentiment", "train", "--data", str(_tiny_file(tmp_path)), "--dataset", "mosi", "--epochs", "1",
                 "--out", str(run), *TINY_MODEL]) == 0
    other = write_synthetic(tmp_path / "mosei.pkl", fmt="mult", dataset="mosei", sizes=(4, 4, 4), text_dim=8,
                            text_len=10)
    assert main(["sentiment", "evaluate", "--checkpoint", str(run / "best.pt"), "--data", str(other),
                 "--out", str(tmp_path / "rep")]) == 2
    assert "do not match the checkpoint's [8, 5, 20]" in capsys.readouterr().err
    assert main(["sentiment", "evaluate", "--checkpoint", str(other), "--data", str(other),
                 "--out", str(tmp_path / "rep")]) == 2
    assert "not a readable checkpoint" in capsys.readouterr().err
