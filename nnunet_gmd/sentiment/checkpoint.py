"""Sentiment checkpoints: written atomically, read with ``weights_only`` so a checkpoint cannot run code either."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from nnunet_gmd.atomic import atomic_path
from nnunet_gmd.sentiment.model import ModelConfig, SentimentModel, build_model

CHECKPOINT_KIND = "nnunet-gmd-sentiment"
CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A file that is not a readable sentiment checkpoint; the message names it."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save({"kind": CHECKPOINT_KIND, "version": CHECKPOINT_VERSION, **state}, tmp)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols before refusing them
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types (OSError, RuntimeError, ...) for corrupt or foreign files
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint: the file is damaged or incomplete (a copy or a "
                              f"run stopped while writing it?); torch says: {detail}") from None
    if not isinstance(state, dict) or state.get("kind") != CHECKPOINT_KIND:
        raise CheckpointError(f"{path}: not a sentiment checkpoint written by 'nnunet-gmd sentiment train'")
    if state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {state.get('version')} is not supported "
                              f"(expected {CHECKPOINT_VERSION})")
    for key in ("model", "model_config", "train_config"):
        if key not in state:
            raise CheckpointError(f"{path}: checkpoint lacks '{key}'")
    return state


def model_from_checkpoint(state: dict[str, Any]) -> SentimentModel:
    model = build_model(ModelConfig.from_dict(state["model_config"]))
    model.load_state_dict(state["model"])
    return model
