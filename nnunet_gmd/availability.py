"""Which sequences each training case really has, and what that means for one batch (framework-free).

A clinical archive is incomplete in training too. A Dynamic Sharing model needs neither discarded cases nor
faked sequences: a case without T1ce still supervises every subset that does not contain T1ce. The record is a
JSON object, case id -> list of available channel names (``modality_availability.json``, written by
``nnunet-gmd convert-brats --allow-missing`` or by hand); a case it does not list has every channel.

Per batch, subset S's loss is taken only over the samples whose availability contains S, and a subset no sample
can supply is skipped. A zero-filled channel therefore never reaches a loss.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor

from nnunet_gmd.errors import UserError
from nnunet_gmd.subsets import Subset

AVAILABILITY_FILE = "modality_availability.json"


def load_availability(path: str | Path, channel_names: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Case id -> available channel indices, checked against the dataset's channel names."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the availability record ({e})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(record, dict):
        raise UserError(f"{path}: expected an object mapping case ids to lists of channel names")
    index = {name.lower(): i for i, name in enumerate(channel_names)}
    out: dict[str, tuple[int, ...]] = {}
    for case, names in record.items():
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise UserError(f"{path}: case {case}: expected a list of channel names, got {names!r}")
        unknown = [n for n in names if n.lower() not in index]
        if unknown:
            raise UserError(f"{path}: case {case}: unknown channel {unknown[0]!r} (channels: "
                            f"{', '.join(channel_names)})")
        if not names:
            raise UserError(f"{path}: case {case} has no available channel; remove the case from the dataset")
        out[str(case)] = tuple(sorted({index[n.lower()] for n in names}))
    return out


def batch_mask(keys: Sequence[str], availability: Mapping[str, Sequence[int]], num_channels: int,
               device: Optional[torch.device] = None) -> Tensor:
    """``(B, M)`` boolean mask of the channels each sample of a batch really has (unlisted cases: all)."""
    mask = torch.ones(len(keys), num_channels, dtype=torch.bool)
    for row, key in enumerate(keys):
        channels = availability.get(str(key))
        if channels is not None:
            mask[row] = False
            mask[row, list(channels)] = True
    return mask if device is None else mask.to(device)


def samples_supplying(subset: Subset, mask: Tensor) -> Tensor:
    """Indices of the samples whose available channels contain ``subset``."""
    return mask[:, list(subset)].all(1).nonzero().flatten()


def supported_subsets(subsets: Sequence[Subset], mask: Tensor) -> list[Subset]:
    """The subsets that at least one sample of the batch can supply, in their order."""
    return [s for s in subsets if bool(mask[:, list(s)].all(1).any())]


def select_samples(value, rows: Tensor):
    """``value[rows]`` for a tensor, or for each tensor of a list (deep-supervision outputs and targets)."""
    if isinstance(value, (list, tuple)):
        return [v[rows.to(v.device)] for v in value]
    return value[rows.to(value.device)]
