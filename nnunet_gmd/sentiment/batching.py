"""A loaded split as torch tensors, cut into minibatches, plus the feature statistics the encoders standardize with."""
from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch import Tensor

from nnunet_gmd.sentiment import MODALITIES
from nnunet_gmd.sentiment.data import SentimentSplit
from nnunet_gmd.sentiment.model import SequenceBatch


class SplitTensors:
    """Holds a whole split in memory (MOSI/MOSEI features fit) and serves index-selected batches."""

    def __init__(self, split: SentimentSplit) -> None:
        self.features = [torch.from_numpy(split.features[m]) for m in MODALITIES]
        self.lengths: list[Optional[Tensor]] = [
            None if split.lengths[m] is None else torch.from_numpy(split.lengths[m]) for m in MODALITIES]
        self.labels = torch.from_numpy(split.labels)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, index: Tensor) -> tuple[SequenceBatch, Tensor]:
        return (SequenceBatch([x[index] for x in self.features],
                              [None if n is None else n[index] for n in self.lengths]),
                self.labels[index])

    def batches(self, batch_size: int, generator: Optional[torch.Generator] = None
                ) -> Iterator[tuple[SequenceBatch, Tensor]]:
        """In order, or shuffled with ``generator`` (a dedicated one keeps resumed runs reproducible)."""
        n = len(self)
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        for start in range(0, n, batch_size):
            yield self.batch(order[start:start + batch_size])

    def num_batches(self, batch_size: int) -> int:
        return -(-len(self) // batch_size)


def feature_statistics(split: SplitTensors) -> list[tuple[Tensor, Tensor]]:
    """Per-feature mean and std over the valid time steps of each modality (padding excluded when lengths say so)."""
    stats = []
    for x, lengths in zip(split.features, split.lengths):
        steps = x.shape[1]
        if lengths is None:
            frames = x.reshape(-1, x.shape[2])
        else:
            valid = torch.arange(steps)[None, :] < lengths.clamp(1, steps)[:, None]
            frames = x[valid]
        frames = frames.double()
        stats.append((frames.mean(0).float(), frames.std(0, unbiased=False).float()))
    return stats
