"""Real CMU-MOSI utterance features (``../shared/data/mosi_bclstm``): a short GMD run on a few videos, scored on
other videos. Skipped when the folder is absent (it is never part of the repository)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from nnunet_gmd.sentiment.batching import SplitTensors
from nnunet_gmd.sentiment.benchmark import fit
from nnunet_gmd.sentiment.evaluate import evaluate_subsets
from nnunet_gmd.sentiment.tables import load_table_folder, pick_valid_videos, split_by_videos
from nnunet_gmd.sentiment.train import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

MOSI = Path(__file__).resolve().parents[2] / "shared" / "data" / "mosi_bclstm"


@pytest.fixture(scope="module")
def mosi():
    if not (MOSI / "labels.csv").is_file():
        pytest.skip(f"real CMU-MOSI features not found at {MOSI} (see that folder's PROVENANCE.md)")
    return load_table_folder(MOSI)


def test_the_real_folder_loads_as_documented(mosi):
    assert len(mosi) == 1447 and len(mosi.videos) == 62
    assert mosi.feature_dims == {"text": 100, "audio": 73, "vision": 100}
    assert mosi.available.all()
    assert mosi.labels.min() >= -3 and mosi.labels.max() <= 3


def test_short_gmd_run_on_few_videos_beats_the_training_mean_on_other_videos(mosi):
    order = np.random.default_rng(0).permutation(len(mosi.videos))
    train_videos = [mosi.videos[i] for i in order[:14]]
    test_videos = [mosi.videos[i] for i in order[14:26]]
    train, test = mosi.select_videos(train_videos), mosi.select_videos(test_videos)
    data = split_by_videos(train, pick_valid_videos(train, 3, seed=0))
    config = TrainConfig(dataset="mosi", method="gmd", epochs=6, hidden=64, layers=1, backbone="mlp", seed=0)
    model, history, _ = fit(data, config, torch.device("cpu"))
    metrics = evaluate_subsets(model, SplitTensors(test.to_split()))

    mean_mae = float(np.mean(np.abs(test.labels - data.splits["train"].labels.mean())))
    maes = {name: round(m["MAE"], 3) for name, m in metrics.items()}
    print(f"\n{len(train)} training utterances, {len(test)} test utterances from other videos; "
          f"predicting the training mean: MAE {mean_mae:.3f}; GMD: {maes}")
    assert not set(train.videos) & set(test.videos)
    assert maes["LAV"] < mean_mae
    assert metrics["LAV"]["Non0_acc_2"] > 0.6
    assert "unimodal_grad_norms" in history[0] and history[0]["mean_conflicts"] >= 0
