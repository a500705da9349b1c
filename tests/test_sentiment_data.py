"""Loading MMSA/MulT feature pickles: round trips, validation errors and the restricted unpickler."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from nnunet_gmd.cli import main
from nnunet_gmd.sentiment import MODALITIES
from nnunet_gmd.sentiment.data import (SPLITS, SentimentDataError, dataset_mismatch_hint, load_sentiment_file,
                                       parse_sentiment_dict)
from nnunet_gmd.sentiment.synthetic import make_synthetic, write_synthetic

SMALL = dict(sizes=(6, 4, 3), text_len=12, text_dim=16, unaligned_lengths=(20, 15), seed=3)


def _write(path: Path, obj) -> Path:
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=4)
    return path


@pytest.mark.parametrize("fmt", ["mmsa-aligned", "mmsa-unaligned", "mult"])
def test_round_trip_keeps_every_value(tmp_path, fmt):
    raw = make_synthetic(fmt, "mosei", **SMALL)
    data = load_sentiment_file(write_synthetic(tmp_path / "f.pkl", fmt=fmt, dataset="mosei", **SMALL))
    assert data.format == ("mult" if fmt == "mult" else "mmsa")
    assert data.aligned == (fmt != "mmsa-unaligned")
    assert data.feature_dims == {"text": 16, "audio": 74, "vision": 35}  # from the file, MOSEI audio/vision sizes
    for split, n in zip(SPLITS, SMALL["sizes"]):
        got, want = data.splits[split], raw[split]
        assert len(got) == n
        for m in MODALITIES:
            np.testing.assert_array_equal(got.features[m], want[m])
            assert got.features[m].dtype == np.float32
        label_key = "labels" if fmt == "mult" else "regression_labels"
        np.testing.assert_array_equal(got.labels, want[label_key].reshape(-1))
        if fmt == "mult":
            assert want["labels"].shape == (n, 1, 1)
            assert all(v is None for v in got.lengths.values())
        else:
            assert want["text_bert"].shape == (n, 3, 12)
            np.testing.assert_array_equal(got.lengths["text"], want["text_bert"][:, 1].sum(1))
            assert got.ids == list(want["id"])
        if fmt == "mmsa-unaligned":
            assert want["audio"].shape[1:] == (20, 74) and want["vision"].shape[1:] == (15, 35)
            np.testing.assert_array_equal(got.lengths["audio"], want["audio_lengths"])
            np.testing.assert_array_equal(got.lengths["vision"], want["vision_lengths"])


def test_default_synthetic_sizes_match_the_real_files():
    mmsa = make_synthetic("mmsa-aligned", "mosi", sizes=(2, 2, 2))["train"]
    assert (mmsa["text"].shape, mmsa["text_bert"].shape) == ((2, 50, 768), (2, 3, 50))
    assert (mmsa["audio"].shape, mmsa["vision"].shape) == ((2, 50, 5), (2, 50, 20))
    mult = make_synthetic("mult", "mosi", sizes=(2, 2, 2))["train"]
    assert (mult["text"].shape, mult["labels"].shape) == ((2, 50, 300), (2, 1, 1))


def _mmsa():
    return make_synthetic("mmsa-unaligned", "mosi", **SMALL)


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d.pop("valid"), "missing split(s) ['valid']"),
    (lambda d: d["test"].pop("vision"), "split 'test' is missing key(s) ['vision']"),
    (lambda d: d["train"].update(audio=d["train"]["audio"][..., None]), "split 'train', key 'audio': expected shape"),
    (lambda d: d["valid"].update(text=d["valid"]["text"][:3]), "split 'valid', key 'text': expected shape (N=4"),
    (lambda d: d["test"]["regression_labels"].__setitem__(2, 3.5), "split 'test', key 'regression_labels', index 2: "
                                                                   "label 3.5 is outside [-3, 3]"),
    (lambda d: d["train"]["regression_labels"].__setitem__(4, np.nan), "key 'regression_labels', index 4"),
    (lambda d: d["valid"]["audio_lengths"].__setitem__(1, 21), "key 'audio_lengths', index 1: length 21 is not"),
    (lambda d: d["train"]["text_bert"].__setitem__((5, 1, 0), 7), "key 'text_bert', index 5: the attention mask"),
    (lambda d: d["test"].update(vision=d["test"]["vision"][:, :, :4]), "split 'test', key 'vision': 4 features per "
                                                                       "step, but split 'train' has 20"),
    (lambda d: d["train"].pop("regression_labels"), "neither 'regression_labels' (MMSA) nor 'labels' (MulT)"),
])
def test_bad_content_is_reported_with_split_key_and_index(mutate, expected):
    raw = _mmsa()
    mutate(raw)
    with pytest.raises(SentimentDataError) as e:
        parse_sentiment_dict(raw, Path("aligned_50.pkl"))
    assert expected in str(e.value)
    assert str(e.value).startswith("aligned_50.pkl: ")


def test_nonfinite_features_are_counted_and_fixed_only_on_request():
    raw = _mmsa()
    raw["valid"]["audio"][2, 0, :3] = -np.inf  # MOSEI's known problem
    raw["valid"]["audio"][3, 1, 0] = np.nan
    with pytest.raises(SentimentDataError) as e:
        parse_sentiment_dict(raw, Path("f.pkl"))
    assert "split 'valid', key 'audio', index 2: 1 NaN and 3 inf value(s)" in str(e.value)
    assert "--fix-nonfinite" in str(e.value)

    data = parse_sentiment_dict(raw, Path("f.pkl"), fix_nonfinite=True)
    assert data.nonfinite_fixed == {"valid/audio": 4}
    audio = data.splits["valid"].features["audio"]
    assert np.isfinite(audio).all()
    assert (audio[2, 0, :3] == 0).all() and audio[3, 1, 0] == 0
    np.testing.assert_array_equal(audio[2, 0, 3:], raw["valid"]["audio"][2, 0, 3:])


def test_dataset_hint_spots_a_mosei_file_passed_as_mosi(tmp_path):
    data = load_sentiment_file(write_synthetic(tmp_path / "f.pkl", fmt="mult", dataset="mosei", **SMALL))
    assert "MOSEI" in dataset_mismatch_hint(data, "mosi")
    assert dataset_mismatch_hint(data, "mosei") is None


class _RunsAShellCommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    raw = _mmsa()
    raw["train"]["id"] = _RunsAShellCommand(marker)
    evil = _write(tmp_path / "aligned_50.pkl", raw)
    # Sanity check of the payload itself: plain pickle would run it.
    with evil.open("rb") as f:
        pickle.load(f)
    assert marker.exists()
    marker.unlink()

    with pytest.raises(SentimentDataError) as e:
        load_sentiment_file(evil)
    assert not marker.exists()
    assert str(evil) in str(e.value) and "refusing to load" in str(e.value) and "system" in str(e.value)


@pytest.mark.parametrize("reduce_to", [(eval, ("1+1",)), (getattr, ("abc", "upper")), (np.load, ("x.npy",))])
def test_other_callables_are_refused(tmp_path, reduce_to):
    class Payload:
        def __reduce__(self):
            return reduce_to

    path = _write(tmp_path / "f.pkl", {"train": Payload()})
    with pytest.raises(SentimentDataError, match="refusing to load"):
        load_sentiment_file(path)


def test_unreadable_and_missing_files_name_the_file(tmp_path):
    good = write_synthetic(tmp_path / "good.pkl", fmt="mult", **SMALL)
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(SentimentDataError, match=r"truncated\.pkl: not a readable pickle"):
        load_sentiment_file(truncated)
    with pytest.raises(SentimentDataError, match=r"nope\.pkl: no such file"):
        load_sentiment_file(tmp_path / "nope.pkl")
    with pytest.raises(SentimentDataError, match="expected a dict"):
        load_sentiment_file(_write(tmp_path / "list.pkl", [1, 2, 3]))


def test_cli_prints_one_line_for_a_refused_file(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = _write(tmp_path / "evil.pkl", {"train": _RunsAShellCommand(marker)})
    code = main(["sentiment", "train", "--data", str(evil), "--dataset", "mosi", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not marker.exists()
    assert len(err.splitlines()) == 1 and "refusing to load" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
