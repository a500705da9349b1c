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

    def __init__(self, split: Optional[SentimentSplit] = None) -> None:
        if split is None:  # filled in by select()
            return
        self.features = [torch.from_numpy(split.features[m]) for m in MODALITIES]
        self.lengths: list[Optional[Tensor]] = [
            None if split.lengths[m] is None else torch.from_numpy(split.lengths[m]) for m in MODALITIES]
        self.labels = torch.from_numpy(split.labels)
        n = len(split.labels)
        # (N, M) bool: which modalities each sample really has (all, for the pickle formats)
        self.available = (torch.ones(n, len(MODALITIES), dtype=torch.bool) if split.available is None
                          else torch.from_numpy(split.available.astype(bool)))

    def select(self, index: Tensor) -> "SplitTensors":
        """The rows ``index`` as a new split (e.g. the samples that have every modality of a subset)."""
        out = SplitTensors()
        out.features = [x[index] for x in self.features]
        out.lengths = [None if n is None else n[index] for n in self.lengths]
        out.labels = self.labels[index]
        out.available = self.available[index]
        return out

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, index: Tensor) -> tuple[SequenceBatch, Tensor]:
        return (SequenceBatch([x[index] for x in self.features],
                              [None if n is None else n[index] for n in self.lengths]),
                self.labels[index])

    def batches(self, batch_size: int, generator: Optional[torch.Generator] = None
                ) -> Iterator[tuple[SequenceBatch, Tensor, Tensor]]:
        """``(batch, labels, available)`` in order, or shuffled with ``generator`` (a dedicated one keeps resumed
        runs reproducible)."""
        n = len(self)
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        for start in range(0, n, batch_size):
            index = order[start:start + batch_size]
            yield (*self.batch(index), self.available[index])

    def num_batches(self, batch_size: int) -> int:
        return -(-len(self) // batch_size)


def feature_statistics(split: SplitTensors) -> list[tuple[Tensor, Tensor]]:
    """Per-feature mean and std over the valid time steps of each modality (padding excluded when lengths say so,
    samples that lack the modality excluded too; a modality nobody has gets mean 0, std 1)."""
    stats = []
    for m, (x, lengths) in enumerate(zip(split.features, split.lengths)):
        have = split.available[:, m]
        if not bool(have.any()):
            stats.append((torch.zeros(x.shape[2]), torch.ones(x.shape[2])))
            continue
        if not bool(have.all()):
            x, lengths = x[have], None if lengths is None else lengths[have]
        steps = x.shape[1]
        if lengths is None:
            frames = x.reshape(-1, x.shape[2])
        else:
            valid = torch.arange(steps)[None, :] < lengths.clamp(1, steps)[:, None]
            frames = x[valid]
        frames = frames.double()
        std = frames.std(0, unbiased=False)
        # A feature constant in training carries nothing; scaling it by 1/eps would blow up any test value.
        std = torch.where(std < 1e-6, torch.ones_like(std), std)
        stats.append((frames.mean(0).float(), std.float()))
    return stats
