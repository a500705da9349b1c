"""Fixtures shared by the test modules (pytest finds them here; no test module imports them).

nnU-Net: ``tiny_nnunet`` plans a tiny BraTS-like dataset once per session (see ``nnunet_helpers``),
``nnunet_paths`` sets its environment variables in this process, ``trained_gmd_smoke`` trains the GMD smoke
trainer on it once, ``ds_model`` / ``stock_model`` are untrained model folders on it.
Sentiment: ``one_thread`` (modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nnunet_helpers import (CONFIG, DATASET_ID, DS_TRAINER, GMD_SMOKE, GMD_SMOKE_FOLD, STOCK_TRAINER, Workspace,
                            build_workspace, run_tool, write_untrained_model)


@pytest.fixture(scope="session")
def tiny_nnunet(tmp_path_factory) -> Workspace:
    """The session's planned tiny dataset."""
    return build_workspace(tmp_path_factory.mktemp("nnunet"))


@pytest.fixture
def nnunet_paths(tiny_nnunet, monkeypatch) -> Workspace:
    """``tiny_nnunet`` with its nnU-Net environment variables set in this process (undone after the test)."""
    for key, value in tiny_nnunet.env_vars().items():
        monkeypatch.setenv(key, value)
    return tiny_nnunet


@pytest.fixture(scope="session")
def trained_gmd_smoke(tiny_nnunet) -> Path:
    """``nnUNetv2_train ... -tr nnUNetTrainerGMD_smoke -device cpu`` on fold 1, run once per session."""
    folder = tiny_nnunet.model_folder(GMD_SMOKE)
    run_tool(["nnUNetv2_train", str(DATASET_ID), CONFIG, str(GMD_SMOKE_FOLD), "-tr", GMD_SMOKE, "-device", "cpu"],
             tiny_nnunet.env(NNUNET_GMD_FINAL_VALIDATION="0"), timeout=900)
    return folder


@pytest.fixture
def ds_model(nnunet_paths) -> Path:
    """Untrained nnUNetTrainerDS model folder (fold 0) on the tiny dataset."""
    return write_untrained_model(nnunet_paths, DS_TRAINER)


@pytest.fixture
def stock_model(nnunet_paths) -> Path:
    """Untrained stock nnUNetTrainer model folder (fold 0) on the tiny dataset."""
    return write_untrained_model(nnunet_paths, STOCK_TRAINER)


@pytest.fixture
def one_thread():
    """Two busy cores are shared by several test runs; one intra-op thread avoids oversubscription stalls."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
