"""The cheap GMD modes' figures for ``nnunet-gmd bench gmd`` (:mod:`nnunet_gmd.gmd_fast`), on bench's network and batch.

* ``gmd_weighted_s``: one reuse step (one forward, one backward of the weighted subset losses, Adam).
* ``gmd_amortized_s``: exact weights every ``fast_interval`` steps, reused in between; timed over whole cycles and
  divided by the cycle length, so the exact step's cost is in the figure.
* ``gmd_amortized_sub_s``: the same with the refresh's Gram on one sample of the batch, every ``sub_interval`` steps.
* ``gmd_m1_s``: exact GMD every step over the M + 1 objectives (unimodal subsets + full set).

``gmd_fast_s`` is the default cheap mode (:data:`FAST_DEFAULT`). ``fast_rel_err`` is the relative L2 error of its
merged gradient against exact GMD's on the same batch and the same network weights, at the stalest point of a
cycle: after ``fast_interval - 1`` reuse steps of training on the bench batch. For scale the same figure is given
for plain DS (weights all 1, ``ds_rel_err``) and for exact GMD with another draw of projection orders
(``orders_rel_err``): exact GMD is itself random through the orders.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from nnunet_gmd.gmd_fast import DEFAULT_INTERVAL

METHODS = ("gmd_weighted", "gmd_amortized", "gmd_amortized_sub", "gmd_m1")
FAST_DEFAULT = "gmd_amortized"
DEFAULTS = dict(fast_interval=DEFAULT_INTERVAL, sub_interval=8)


def _cfg(cfg: dict, key: str) -> int:
    return int(cfg.get(key, DEFAULTS[key]))


def step_fn(method: str, cfg: dict) -> Callable[[], None]:
    """One call of the returned function runs ``fn.steps_per_call`` training steps."""
    from nnunet_gmd import gmd
    from nnunet_gmd.bench import build
    from nnunet_gmd.gmd_fast import AmortizedGMD, unimodal_and_full, weighted_ds_backward
    from nnunet_gmd.subsets import all_subsets

    net, x, loss = build(cfg)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    subsets = all_subsets(cfg["modalities"])
    generator = torch.Generator().manual_seed(cfg["seed"])
    calls = 1

    if method == "gmd_weighted":
        weights = gmd.ds_gmd_backward(net, x, subsets, loss, generator=generator).weights
        net.zero_grad(set_to_none=True)

        def fn():
            opt.zero_grad(set_to_none=True)
            weighted_ds_backward(net, x, subsets, loss, weights)
            opt.step()
    elif method in ("gmd_amortized", "gmd_amortized_sub"):
        sub = method == "gmd_amortized_sub"
        calls = _cfg(cfg, "sub_interval" if sub else "fast_interval")
        mode = AmortizedGMD(calls)
        sub_input = (x[:1], _first_sample_loss(loss)) if sub else None

        def fn():
            for _ in range(calls):
                opt.zero_grad(set_to_none=True)
                mode.backward(net, x, subsets, loss, generator=generator, gram_input=sub_input)
                opt.step()
    elif method == "gmd_m1":
        objectives = unimodal_and_full(cfg["modalities"])

        def fn():
            opt.zero_grad(set_to_none=True)
            gmd.ds_gmd_backward(net, x, objectives, loss, generator=generator)
            opt.step()
    else:
        raise ValueError(f"unknown method {method!r}")
    fn.steps_per_call = calls
    return fn


def _first_sample_loss(loss):
    """bench's loss on the first sample's targets (``build`` hangs its targets and weights on the loss)."""
    from torch import nn

    targets, weights = [t[:1] for t in loss.targets], loss.weights

    def first(output, _subset=None):
        return sum(w * nn.functional.cross_entropy(o, t) for w, o, t in zip(weights, output, targets)) / sum(weights)

    return first


def _flat_grad(net) -> torch.Tensor:
    return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in net.parameters()])


def accuracy(cfg: dict) -> dict:
    """Relative L2 errors against exact GMD on the bench batch, at the stalest point of an amortised cycle."""
    from nnunet_gmd import gmd
    from nnunet_gmd.bench import build
    from nnunet_gmd.gmd_fast import AmortizedGMD, weighted_ds_backward
    from nnunet_gmd.subsets import all_subsets

    net, x, loss = build(cfg)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    subsets = all_subsets(cfg["modalities"])
    interval = _cfg(cfg, "fast_interval")
    mode = AmortizedGMD(interval)
    generator = torch.Generator().manual_seed(cfg["seed"])
    for _ in range(interval - 1):
        opt.zero_grad(set_to_none=True)
        mode.backward(net, x, subsets, loss, generator=generator)
        opt.step()
    assert not mode.needs_refresh(subsets)
    net.zero_grad(set_to_none=True)
    mode.backward(net, x, subsets, loss, generator=generator)
    fast = _flat_grad(net)
    net.zero_grad(set_to_none=True)
    stats = gmd.ds_gmd_backward(net, x, subsets, loss, generator=torch.Generator().manual_seed(cfg["seed"] + 1))
    exact = _flat_grad(net)
    net.zero_grad(set_to_none=True)
    gmd.ds_gmd_backward(net, x, subsets, loss, generator=torch.Generator().manual_seed(cfg["seed"] + 2))
    other_orders = _flat_grad(net)
    net.zero_grad(set_to_none=True)
    weighted_ds_backward(net, x, subsets, loss, torch.ones(len(subsets)))
    ds = _flat_grad(net)
    norm = float(exact.norm())
    return {"fast_rel_err": float((fast - exact).norm()) / norm, "ds_rel_err": float((ds - exact).norm()) / norm,
            "orders_rel_err": float((other_orders - exact).norm()) / norm, "fast_conflicts": stats.num_conflicts}


def paired_times(cfg: dict, rounds: int) -> dict[str, list[float]]:
    """Step times of the plain, reuse and exact steps, run round-robin in one process on one network and batch.

    Separate processes disagree by up to a quarter on identical work on a shared CPU, so cost ratios come from
    here: a load change hits every step of a round alike. ``bare`` is ``mean(losses).backward()``; ``plain`` is
    :func:`~nnunet_gmd.gmd_fast.ds_mean_backward`, the DS trainers' step; ``reuse`` is one weighted backward with
    exact weights; ``exact`` is :func:`~nnunet_gmd.gmd.ds_gmd_backward`. Round 0 is a warm-up and not returned.
    """
    from nnunet_gmd import gmd
    from nnunet_gmd.bench import build
    from nnunet_gmd.gmd_fast import ds_mean_backward, weighted_ds_backward
    from nnunet_gmd.subsets import all_subsets

    net, x, loss = build(cfg)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    subsets = all_subsets(cfg["modalities"])
    generator = torch.Generator().manual_seed(cfg["seed"])
    weights = gmd.ds_gmd_backward(net, x, subsets, loss, generator=generator).weights
    steps = {"bare": lambda: torch.stack(gmd.ds_subset_losses(net, x, subsets, loss)).mean().backward(),
             "plain": lambda: ds_mean_backward(net, x, subsets, loss),
             "reuse": lambda: weighted_ds_backward(net, x, subsets, loss, weights),
             "exact": lambda: gmd.ds_gmd_backward(net, x, subsets, loss, generator=generator)}
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(rounds + 1):
        for name, fn in steps.items():
            opt.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            fn()
            opt.step()
            if r:
                times[name].append(time.perf_counter() - t0)
    return times


def amortized_cost(exact_s: float, reuse_s: float, interval: int) -> float:
    """Mean step time of amortised GMD: one exact refresh and ``interval - 1`` reuse steps per cycle."""
    return (exact_s + (interval - 1) * reuse_s) / interval


def paired(cfg: dict) -> dict:
    """Medians of :func:`paired_times` over ``cfg["steps"]`` rounds, and the amortised cost at ``fast_interval``."""
    med = {k: statistics.median(v) for k, v in paired_times(cfg, cfg["steps"]).items()}
    interval = _cfg(cfg, "fast_interval")
    amortized = amortized_cost(med["exact"], med["reuse"], interval)
    return {**{f"{k}_s": round(v, 4) for k, v in med.items()}, "interval": interval,
            "gmd_amortized_s": round(amortized, 4),
            "gmd_amortized_over_plain": round(amortized / med["plain"], 3),
            "reuse_over_plain": round(med["reuse"] / med["plain"], 3),
            "exact_over_plain": round(med["exact"] / med["plain"], 3),
            "plain_over_bare": round(med["plain"] / med["bare"], 3)}


def summary(result: dict, accuracy_figures: dict) -> dict:
    """The ``gmd_fast_s`` figure, its ratio to ``plain_s`` and the error figures."""
    plain = result["plain_s"]
    out = {"gmd_fast_s": result[f"{FAST_DEFAULT}_s"], "gmd_fast_mode": FAST_DEFAULT, **accuracy_figures}
    out["fast_ratios"] = {f"{m}_over_plain": round(result[f"{m}_s"] / plain, 3) for m in METHODS}
    out["fast_ratios"]["gmd_fast_over_plain"] = round(out["gmd_fast_s"] / plain, 3)
    return out
