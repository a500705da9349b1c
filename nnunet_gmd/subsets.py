"""Modality subsets: enumeration, naming, masks and a seeded sampler.

A subset is a sorted tuple of modality indices, e.g. ``(1, 3)`` for T1ce + FLAIR in BraTS order.
Everything here is framework-free apart from torch, so the nnU-Net trainers, the MONAI bundle and the
sentiment companion share one definition of "which subsets exist" and "which were drawn this step".
"""
from __future__ import annotations

from itertools import combinations
from typing import Optional, Sequence

import torch

Subset = tuple[int, ...]


def all_subsets(num_modalities: int) -> list[Subset]:
    """All 2^M - 1 non-empty subsets, ordered by size then lexicographically (full set last)."""
    if num_modalities < 1:
        raise ValueError(f"num_modalities must be >= 1, got {num_modalities}")
    return [c for size in range(1, num_modalities + 1) for c in combinations(range(num_modalities), size)]


def subset_mask(subset: Sequence[int], num_modalities: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """Boolean availability mask of shape ``(M,)`` for ``subset``."""
    mask = torch.zeros(num_modalities, dtype=torch.bool, device=device)
    mask[list(subset)] = True
    return mask


def subset_name(subset: Sequence[int], names: Sequence[str], sep: str = "+") -> str:
    """Human-readable name, e.g. ``"t1ce+flair"``."""
    return sep.join(names[i] for i in subset)


def parse_subset(spec: str | Sequence[str], names: Sequence[str]) -> Subset:
    """Turn ``"t1ce,flair"`` (or a list of names) into a subset of indices, with a clear error."""
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    items = [s for s in items if s]
    lowered = [n.lower() for n in names]
    out = []
    for item in items:
        if item.lower() not in lowered:
            raise ValueError(f"unknown modality {item!r}; known modalities: {', '.join(names)}")
        out.append(lowered.index(item.lower()))
    if not out:
        raise ValueError(f"no modality given in {spec!r}; known modalities: {', '.join(names)}")
    return tuple(sorted(set(out)))


class SubsetSampler:
    """Draws ``k`` distinct subsets per step (the paper samples k=5), or returns all of them when k is None.

    ``include_full`` always puts the full set in the draw, so the all-modality prediction is trained every
    step. A dedicated ``torch.Generator`` keeps the draw reproducible without touching the global RNG that
    data augmentation uses.
    """

    def __init__(self, num_modalities: int, k: Optional[int] = None, include_full: bool = False,
                 seed: Optional[int] = None) -> None:
        self.subsets = all_subsets(num_modalities)
        if k is not None and not 1 <= k <= len(self.subsets):
            raise ValueError(f"k must be in [1, {len(self.subsets)}], got {k}")
        self.k = k
        self.include_full = include_full
        self.generator = torch.Generator()
        self.generator.manual_seed(torch.initial_seed() % 2**63 if seed is None else seed)

    def sample(self, allowed: Optional[Sequence[Subset]] = None) -> list[Subset]:
        """This step's subsets. ``allowed`` restricts the draw to the subsets a batch can supply (a batch of
        incomplete cases cannot supply every subset); ``include_full`` then holds only when the full set is
        allowed, and fewer than ``k`` come back when fewer are allowed."""
        if allowed is not None:
            allowed = set(allowed)
        subsets = self.subsets if allowed is None else [s for s in self.subsets if s in allowed]
        if not subsets:
            return []
        full = self.subsets[-1]
        if self.k is None or self.k >= len(subsets):
            return list(subsets)
        include_full = self.include_full and full in subsets
        pool = [s for s in subsets if s != full] if include_full else subsets
        n = self.k - 1 if include_full else self.k
        picked = torch.randperm(len(pool), generator=self.generator)[:n].tolist()
        chosen = sorted(picked)
        out = [pool[i] for i in chosen]
        return out + [full] if include_full else out

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
