"""Utterance-feature tables: joining by id, genuinely missing modalities, every bad input, video-level splits."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunet_gmd.cli import main
from nnunet_gmd.sentiment import MODALITIES
from nnunet_gmd.sentiment.batching import SplitTensors
from nnunet_gmd.sentiment.data import SentimentDataError
from nnunet_gmd.sentiment.evaluate import evaluate_subsets, predict, subset_counts
from nnunet_gmd.sentiment.metrics import mmsa_regression_metrics
from nnunet_gmd.sentiment.tables import (is_table_folder, load_table_folder, pick_valid_videos, split_by_videos,
                                         video_folds)
from nnunet_gmd.sentiment.train import Trainer, TrainConfig, make_model
from nnunet_gmd.subsets import subset_mask

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

DIMS = {"text": 4, "audio": 3, "vision": 2}
TINY = ["--hidden", "16", "--layers", "1", "--device", "cpu", "--batch-size", "8"]


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def make_tables(folder: Path, videos: int = 4, per_video: int = 3, seed: int = 0,
                drop: dict[str, list[str]] | None = None, npz: tuple[str, ...] = (), prefix: str = "vid") -> dict:
    """A small table folder whose label is a noisy linear function of every modality; returns what was written.

    ``drop[m]`` lists utterance ids left out of modality m's table (genuinely missing there).
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    ids = [f"{prefix}{v}_{u}" for v in range(videos) for u in range(per_video)]
    feats = {m: rng.standard_normal((len(ids), d)).round(4) for m, d in DIMS.items()}
    signal = sum(feats[m][:, 0] for m in MODALITIES)
    labels = np.clip(np.round(signal + 0.1 * rng.standard_normal(len(ids)), 1), -3, 3)
    _write_csv(folder / "labels.csv", ["utterance_id", "video_id", "sentiment", "transcript"],
               [[u, u.split("_")[0], f"{y:g}", f"words, of {u}"] for u, y in zip(ids, labels)])
    drop = drop or {}
    for m in MODALITIES:
        keep = [i for i, u in enumerate(ids) if u not in set(drop.get(m, []))]
        if m in npz:
            np.savez(folder / f"{m}.npz", utterance_id=np.array([ids[i] for i in keep]), features=feats[m][keep])
        else:
            _write_csv(folder / f"{m}.csv", ["utterance_id"] + [f"f{j}" for j in range(DIMS[m])],
                       [[ids[i]] + [f"{x:.4f}" for x in feats[m][i]] for i in keep])
    return {"ids": ids, "features": feats, "labels": labels.astype(np.float32)}


def test_round_trip_csv_and_npz(tmp_path):
    written = make_tables(tmp_path / "t", npz=("audio",))
    assert is_table_folder(tmp_path / "t") and not is_table_folder(tmp_path)
    table = load_table_folder(tmp_path / "t")
    assert table.ids == written["ids"] and table.videos == ["vid0", "vid1", "vid2", "vid3"]
    assert table.video_ids[:4] == ["vid0", "vid0", "vid0", "vid1"]
    np.testing.assert_array_equal(table.labels, written["labels"])
    assert table.transcripts[0] == "words, of vid0_0"  # a quoted comma stays inside the cell
    assert table.feature_dims == DIMS and table.available.all()
    for m in MODALITIES:
        np.testing.assert_allclose(table.features[m], written["features"][m], rtol=0, atol=1e-6)
    split = table.to_split()
    assert split.features["text"].shape == (12, 1, 4) and split.available.shape == (12, 3)


def test_rows_missing_from_a_table_are_missing_modalities(tmp_path):
    make_tables(tmp_path / "t", drop={"vision": ["vid1_0", "vid2_2"], "audio": ["vid0_1"]}, npz=("vision",))
    table = load_table_folder(tmp_path / "t")
    row = {u: i for i, u in enumerate(table.ids)}
    assert not table.available[row["vid1_0"], 2] and not table.available[row["vid0_1"], 1]
    assert table.available.sum(0).tolist() == [12, 11, 10]
    assert (table.features["vision"][row["vid1_0"]] == 0).all()
    assert "text 12, audio 11, vision 10" in table.describe()


def _mutate_csv(path: Path, row: int, col: int, value: str) -> None:
    rows = list(csv.reader(path.open(newline="")))
    rows[row - 1][col] = value
    _write_csv(path, rows[0], rows[1:])


def _append_row(path: Path, cells: list[str]) -> None:
    with path.open("a", newline="") as f:
        csv.writer(f).writerow(cells)


# Each case: what to break in the folder, and the message (file, row, id) it must give.
BAD_INPUTS = [
    (lambda d: _append_row(d / "labels.csv", ["vid0_1", "vid0", "1", ""]),
     "labels.csv, row 14 (utterance_id 'vid0_1'): duplicate id (first at row 3)"),
    (lambda d: _append_row(d / "audio.csv", ["vid1_2", "1", "2", "3"]),
     "audio.csv, row 14 (utterance_id 'vid1_2'): duplicate id (first at row 7)"),
    (lambda d: _mutate_csv(d / "text.csv", 4, 2, "abc"),
     "text.csv, row 4 (utterance_id 'vid0_2'), column 'f1': 'abc' is not a number"),
    (lambda d: _mutate_csv(d / "text.csv", 5, 1, ""),
     "text.csv, row 5 (utterance_id 'vid1_0'), column 'f0': '' is not a number"),
    (lambda d: _mutate_csv(d / "vision.csv", 6, 2, "nan"),
     "vision.csv, row 6 (utterance_id 'vid1_1'), column 'f1': nan is not finite"),
    (lambda d: _mutate_csv(d / "audio.csv", 2, 3, "-inf"),
     "audio.csv, row 2 (utterance_id 'vid0_0'), column 'f2': -inf is not finite"),
    (lambda d: _mutate_csv(d / "labels.csv", 3, 2, "3.5"),
     "labels.csv, row 3 (utterance_id 'vid0_1'): sentiment 3.5 is outside [-3, 3]"),
    (lambda d: _mutate_csv(d / "labels.csv", 4, 2, "nan"),
     "labels.csv, row 4 (utterance_id 'vid0_2'): sentiment nan is outside [-3, 3]"),
    (lambda d: _mutate_csv(d / "labels.csv", 5, 2, "positive"),
     "labels.csv, row 5 (utterance_id 'vid1_0'): sentiment 'positive' is not a number"),
    (lambda d: _mutate_csv(d / "labels.csv", 6, 1, ""),
     "labels.csv, row 6 (utterance_id 'vid1_1'): empty video_id"),
    (lambda d: _mutate_csv(d / "labels.csv", 7, 0, ""), "labels.csv, row 7: empty utterance_id"),
    (lambda d: _append_row(d / "vision.csv", ["stranger_1", "0", "0"]),
     "vision.csv, row 14 (utterance_id 'stranger_1'): no such utterance in labels.csv"),
    (lambda d: _append_row(d / "text.csv", ["vid3_0", "1", "2"]),
     "text.csv, row 14 (utterance_id 'vid3_0'): 3 cell(s), but the header has 5"),
    (lambda d: (d / "audio.csv").unlink(), "no audio.csv or audio.npz"),
    (lambda d: np.savez(d / "text.npz", utterance_id=np.array(["a"]), features=np.zeros((1, 4))),
     "both text.csv and text.npz exist"),
    (lambda d: _write_csv(d / "labels.csv", ["utterance_id", "sentiment"], [["vid0_0", "1"]]),
     "labels.csv: missing column(s) ['video_id']"),
    (lambda d: _write_csv(d / "vision.csv", ["id", "f0"], [["vid0_0", "1"]]),
     "vision.csv: the first column must be 'utterance_id', found 'id'"),
]


@pytest.mark.parametrize("break_it, expected", BAD_INPUTS)
def test_bad_input_names_file_row_and_id(tmp_path, break_it, expected):
    folder = tmp_path / "t"
    make_tables(folder)
    break_it(folder)
    with pytest.raises(SentimentDataError) as e:
        load_table_folder(folder)
    assert expected in str(e.value)
    assert str(folder) in str(e.value) and "\n" not in str(e.value)


def test_an_utterance_without_any_modality_is_refused(tmp_path):
    folder = tmp_path / "t"
    make_tables(folder, drop={m: ["vid2_1"] for m in MODALITIES})
    with pytest.raises(SentimentDataError, match=r"labels\.csv, row 9 \(utterance_id 'vid2_1'\): no row in any of "
                                                 r"text\.csv, audio\.csv, vision\.csv"):
        load_table_folder(folder)


def test_bad_npz_tables(tmp_path):
    folder = tmp_path / "t"
    written = make_tables(folder, npz=("audio",))
    feats = written["features"]["audio"].copy()
    feats[5, 1] = np.inf
    np.savez(folder / "audio.npz", utterance_id=np.array(written["ids"]), features=feats)
    with pytest.raises(SentimentDataError, match=r"audio\.npz, index 5 \(utterance_id 'vid1_2'\), column '1': inf "
                                                 r"is not finite"):
        load_table_folder(folder)
    np.savez(folder / "audio.npz", utterance_id=np.array(written["ids"]))
    with pytest.raises(SentimentDataError, match=r"audio\.npz: missing array 'features'"):
        load_table_folder(folder)
    (folder / "audio.npz").write_bytes(b"not a zip")
    with pytest.raises(SentimentDataError, match=r"audio\.npz: not a readable \.npz file"):
        load_table_folder(folder)


def test_video_splits_keep_videos_whole_and_are_seeded(tmp_path):
    make_tables(tmp_path / "t", videos=10, per_video=2)
    table = load_table_folder(tmp_path / "t")
    first = pick_valid_videos(table, 3, seed=5)
    assert first == pick_valid_videos(table, 3, seed=5) and len(first) == 3
    assert any(pick_valid_videos(table, 3, seed=s) != first for s in range(6, 12))
    data = split_by_videos(table, first)
    train_v, valid_v = set(data.splits["train"].video_ids), set(data.splits["valid"].video_ids)
    assert valid_v == set(first) and not train_v & valid_v and len(train_v) == 7
    assert len(data.splits["train"]) + len(data.splits["valid"]) == 20
    folds = video_folds(table, 3, seed=0)
    assert sorted(v for f in folds for v in f) == sorted(table.videos) and [len(f) for f in folds] == [4, 3, 3]
    with pytest.raises(SentimentDataError, match=r"--valid-videos must be in \[1, 9\]"):
        pick_valid_videos(table, 10, seed=0)
    with pytest.raises(SentimentDataError, match=r"--cv must be in \[2, 10\]"):
        video_folds(table, 11)


def _tensors(folder: Path, noise_in_missing: bool = False) -> SplitTensors:
    tensors = SplitTensors(load_table_folder(folder).to_split())
    if noise_in_missing:  # what a missing modality's (unused) features hold must not matter
        for m in range(len(MODALITIES)):
            missing = ~tensors.available[:, m]
            tensors.features[m][missing] = 50.0 * torch.randn_like(tensors.features[m][missing])
    return tensors


@pytest.mark.parametrize("method", ["gmd", "ds", "full", "early", "early_dropout"])
def test_missing_modalities_never_enter_training(tmp_path, method):
    make_tables(tmp_path / "t", drop={"audio": ["vid0_0", "vid1_1", "vid3_2"], "vision": ["vid0_0", "vid2_0"]})
    config = TrainConfig(dataset="mosi", method=method, hidden=8, layers=1, backbone="mlp", batch_size=12,
                         dropout=0.0)
    results = []
    for noisy in (False, True):
        tensors = _tensors(tmp_path / "t", noisy)
        trainer = Trainer(make_model(config, DIMS), tensors, tensors, config, torch.device("cpu"))
        batch, labels, available = next(tensors.batches(12))
        assert not available.all()
        trainer.step(batch, labels, available)
        results.append(torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()]))
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)


def test_a_subset_loss_covers_exactly_the_samples_that_have_it(tmp_path):
    make_tables(tmp_path / "t", drop={"audio": ["vid0_0", "vid1_1", "vid3_2"]})
    config = TrainConfig(dataset="mosi", method="ds", subsets_per_step=None, hidden=8, layers=1, backbone="mlp",
                         dropout=0.0)
    tensors = _tensors(tmp_path / "t")
    model = make_model(config, DIMS)
    trainer = Trainer(model, tensors, tensors, config, torch.device("cpu"))
    batch, labels, available = tensors.batch(torch.arange(12)) + (tensors.available,)
    with torch.no_grad():
        pooled = model.forward_branches(batch)
        has = available[:, :2].all(1)
        expected = float(torch.nn.functional.l1_loss(model.predict_subset(pooled, (0, 1))[has], labels[has]))
        # One DS step's loss is the mean over the 7 subset losses; recompute it by hand.
        by_hand = []
        for s in trainer.sampler.subsets:
            rows = available[:, list(s)].all(1)
            by_hand.append(float(torch.nn.functional.l1_loss(model.predict_subset(pooled, s)[rows], labels[rows])))
    assert by_hand[3] == pytest.approx(expected)  # (0, 1) = LA is the 4th subset
    assert int(has.sum()) == 9
    logged = trainer.step(batch, labels, available)["loss"]
    assert logged == pytest.approx(float(np.mean(by_hand)), rel=1e-6)
    with torch.no_grad():
        all_rows = float(torch.nn.functional.l1_loss(model.predict_subset(pooled, (0, 1)), labels))
    assert all_rows != pytest.approx(expected)  # the rows without audio would have changed it


def test_evaluation_scores_each_subset_on_the_utterances_that_have_it(tmp_path):
    make_tables(tmp_path / "t", drop={"vision": ["vid1_0", "vid2_2"]})
    tensors = _tensors(tmp_path / "t")
    config = TrainConfig(dataset="mosi", method="gmd", hidden=8, layers=1, backbone="mlp")
    model = make_model(config, DIMS).eval()
    counts = subset_counts(tensors)
    assert counts == {"L": 12, "A": 12, "V": 10, "LA": 12, "LV": 10, "AV": 10, "LAV": 10}
    metrics = evaluate_subsets(model, tensors)
    rows = tensors.available[:, 2].nonzero().squeeze(1)
    preds = predict(model, tensors.select(rows), subset_mask((0, 1, 2), 3))
    assert metrics["LAV"] == pytest.approx(mmsa_regression_metrics(preds, tensors.labels[rows].numpy()),
                                           nan_ok=True)
    nobody = tensors.select(rows[:0])
    assert all(np.isnan(v) for v in evaluate_subsets(model, nobody)["L"].values())


def test_cli_trains_on_videos_and_evaluates_another_folder(tmp_path, capsys):
    make_tables(tmp_path / "train", videos=6, seed=1)
    make_tables(tmp_path / "test", videos=3, seed=2, drop={"audio": ["vid0_0"]})
    run = tmp_path / "run"
    assert main(["sentiment", "train", "--data", str(tmp_path / "train"), "--dataset", "mosi", "--epochs", "2",
                 "--valid-videos", "2", "--seed", "3", "--out", str(run), *TINY]) == 0
    out = capsys.readouterr().out
    assert "validation: 2 of 6 videos held out (seed 3)" in out
    state = torch.load(run / "best.pt", weights_only=True)
    assert state["model_config"]["backbone"] == "mlp"  # auto: length-1 utterance features
    assert len(state["data"]["valid_videos"]) == 2 and state["train_config"]["valid_videos"] == 2
    assert main(["sentiment", "evaluate", "--checkpoint", str(run / "best.pt"), "--data", str(tmp_path / "test"),
                 "--out", str(tmp_path / "rep"), "--device", "cpu"]) == 0
    metrics = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert list(metrics) == ["L", "A", "V", "LA", "LV", "AV", "LAV"]
    assert "| A | 8 |" in (tmp_path / "rep" / "metrics.md").read_text()  # 9 test utterances, one lacks audio
    capsys.readouterr()
    assert main(["sentiment", "evaluate", "--checkpoint", str(run / "best.pt"), "--data", str(tmp_path / "test"),
                 "--out", str(tmp_path / "rep2"), "--split", "valid"]) == 2
    assert "--split applies to pickles" in capsys.readouterr().err


def test_cli_reports_a_bad_table_in_one_line(tmp_path, capsys):
    make_tables(tmp_path / "t")
    _mutate_csv(tmp_path / "t" / "labels.csv", 3, 2, "9")
    assert main(["sentiment", "train", "--data", str(tmp_path / "t"), "--dataset", "mosi",
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "labels.csv, row 3 (utterance_id 'vid0_1'): sentiment 9" in err
    assert main(["sentiment", "train", "--data", str(tmp_path), "--dataset", "mosi",
                 "--out", str(tmp_path / "run")]) == 2
    assert "not a table folder (no labels.csv)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_cli_early_fusion_checkpoint_round_trip(tmp_path):
    make_tables(tmp_path / "train", videos=5, seed=1)
    make_tables(tmp_path / "test", videos=2, seed=2, prefix="new", drop={"text": ["new1_1"]})
    run = tmp_path / "run"
    assert main(["sentiment", "train", "--data", str(tmp_path / "train"), "--dataset", "mosi", "--epochs", "1",
                 "--method", "early_dropout", "--valid-videos", "1", "--out", str(run), *TINY]) == 0
    assert not (run / "dominance.png").exists()  # only GMD logs gradient statistics
    assert main(["sentiment", "evaluate", "--checkpoint", str(run / "best.pt"), "--data", str(tmp_path / "test"),
                 "--out", str(tmp_path / "rep"), "--missing-rate-curve", "--device", "cpu"]) == 0
    metrics = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert all(np.isfinite(m["MAE"]) for m in metrics.values())
    assert "| L | 5 |" in (tmp_path / "rep" / "metrics.md").read_text()
