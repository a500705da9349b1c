"""``nnunet-gmd bench gmd``: what one GMD step costs against a plain step, the literal reference and the floor.

Figures, not a test: each method runs in a fresh subprocess so that its peak memory above the set-up (model,
optimiser, batch) is its own, and the median of several timed steps after a warm-up is reported.

* ``plain_s``: a mean-loss step (one forward, the mean of the subset losses, one backward, Adam).
* ``reference_s``: the literal reference (the official code's loop: K ``autograd.grad`` calls, flattened
  copies, projected copies, pair loops) on the same branch graphs, so "parameters every loss reaches" means
  the same for both.
* ``gmd_s`` / ``gmd_k5_s``: :func:`nnunet_gmd.gmd.ds_gmd_backward` over all subsets / 5 sampled ones.
* ``floor_s``: one forward plus the per-subset VJPs that ``gmd_s`` needs, nothing else.

``--fusion features`` runs the same figures for the feature-fusion DS network (``DSFeatureFusionUNet``): there
a subset's VJP also runs through its own decoder pass, which dominates the step.
* the cheap modes of :mod:`nnunet_gmd.gmd_fast` (``gmd_fast_s``, ``fast_rel_err``...): see :mod:`nnunet_gmd.bench_fast`.
* ``paired``: plain, reuse and exact steps timed round-robin in one process (:func:`nnunet_gmd.bench_fast.paired`),
  the figures to take cost ratios from; ``paired.gmd_amortized_over_plain`` is the amortised mode's cost.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch
from torch import nn


METHODS = ("plain", "reference", "gmd", "gmd_k5", "floor")
FAST_METHODS = ("gmd_weighted", "gmd_amortized", "gmd_amortized_sub", "gmd_m1")  # nnunet_gmd.bench_fast


def build(cfg: dict):
    from nnunet_gmd.networks import DSFeatureFusionUNet, DSUNet

    torch.manual_seed(cfg["seed"])
    n = len(cfg["features"])
    features = cfg.get("fusion", "logits") == "features"
    net_class = DSFeatureFusionUNet if features else DSUNet
    net = net_class(cfg["modalities"], n, cfg["features"], nn.Conv3d, 3, [1] + [2] * (n - 1), 2, 3, 2,
                    conv_bias=True, norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5},
                    nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=True)
    x = torch.randn(cfg["batch"], cfg["modalities"], *[cfg["size"]] * 3)
    targets = [torch.randint(0, 3, (cfg["batch"], *[cfg["size"] // 2 ** i] * 3)) for i in range(n - 1)]
    weights = [1 / 2 ** i for i in range(n - 1)]

    def loss(output, _subset=None):
        return sum(w * nn.functional.cross_entropy(o, t) for w, o, t in zip(weights, output, targets)) / sum(weights)

    loss.targets, loss.weights = targets, weights  # for the sub-batch Gram of nnunet_gmd.bench_fast
    return net, x, loss


def step_fn(method: str, cfg: dict) -> tuple[Callable[[], None], nn.Module]:
    if method in FAST_METHODS:
        from nnunet_gmd import bench_fast

        return bench_fast.step_fn(method, cfg), None
    from nnunet_gmd import gmd
    from nnunet_gmd.gmd_fast import ds_mean_backward
    from nnunet_gmd.gmd_reference import reference_gmd_grads
    from nnunet_gmd.subsets import SubsetSampler, all_subsets

    net, x, loss = build(cfg)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    subsets = all_subsets(cfg["modalities"])
    params = list(net.parameters())
    generator = torch.Generator().manual_seed(cfg["seed"])
    sampler = SubsetSampler(cfg["modalities"], k=5, seed=cfg["seed"])

    def plain():
        opt.zero_grad(set_to_none=True)
        ds_mean_backward(net, x, subsets, loss)   # what nnUNetTrainerDS takes per step
        opt.step()

    def reference():
        opt.zero_grad(set_to_none=True)
        outputs = gmd.ds_branch_outputs(net, x)  # branch graphs, so "reached" means the same as for GMD
        losses = [loss(gmd.subset_outputs(net, outputs, s)) for s in subsets]
        grads = reference_gmd_grads(losses, params, gmd.draw_orders(len(subsets), generator))
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()

    def exact():
        opt.zero_grad(set_to_none=True)
        gmd.ds_gmd_backward(net, x, subsets, loss, generator=generator)
        opt.step()

    def sampled():
        opt.zero_grad(set_to_none=True)
        gmd.ds_gmd_backward(net, x, sampler.sample(), loss, generator=generator)
        opt.step()

    def floor():
        outputs = gmd.ds_branch_outputs(net, x)
        if gmd.fuses_features(net):  # per subset: decode, loss, one VJP through decoder and its branches
            for k, s in enumerate(subsets):
                torch.autograd.grad(loss(net.decode_subset(outputs, s)), params,
                                    retain_graph=k < len(subsets) - 1, allow_unused=True)
            return
        for k, s in enumerate(subsets):
            leaves = [f.detach().requires_grad_() for f in gmd.fuse_logits(outputs, s)]
            cot = torch.autograd.grad(loss(leaves), leaves, allow_unused=True)
            used = [i for i, c in enumerate(cot) if c is not None]
            torch.autograd.grad([outputs[m][i] for m in s for i in used], params,
                                grad_outputs=[cot[i] / len(s) for _ in s for i in used],
                                retain_graph=k < len(subsets) - 1, allow_unused=True)

    return {"plain": plain, "reference": reference, "gmd": exact, "gmd_k5": sampled, "floor": floor}[method], net


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_worker(method: str, cfg: dict) -> dict:
    torch.set_num_threads(cfg.get("threads") or torch.get_num_threads())
    fn, _ = step_fn(method, cfg)
    for _ in range(cfg["warmup"]):
        fn()
    base = _peak_rss_mb()
    times = []
    for _ in range(cfg["steps"]):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) / getattr(fn, "steps_per_call", 1))
    # the warm-up step already set the peak; a fresh process per method keeps it the method's own
    return {"median_s": statistics.median(times), "peak_mb": _peak_rss_mb(), "base_mb": base}


def setup_rss_mb(cfg: dict) -> float:
    """Peak RSS of a process that only builds the model, optimiser state and batch (no step)."""
    net, x, loss = build(cfg)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # materialise Adam's state
    with torch.no_grad():
        net(x)
    return _peak_rss_mb()


def accuracy(cfg: dict) -> float:
    """Max relative error of the structured GMD gradient against the literal reference, same orders."""
    from nnunet_gmd import gmd
    from nnunet_gmd.gmd_reference import reference_gmd_grads
    from nnunet_gmd.subsets import all_subsets

    net, x, loss = build(cfg)
    subsets = all_subsets(cfg["modalities"])
    params = list(net.parameters())
    gmd.ds_gmd_backward(net, x, subsets, loss, generator=torch.Generator().manual_seed(7))
    fast = [p.grad for p in params]
    outputs = gmd.ds_branch_outputs(net, x)
    losses = [loss(gmd.subset_outputs(net, outputs, s)) for s in subsets]
    ref = reference_gmd_grads(losses, params, gmd.draw_orders(len(subsets), torch.Generator().manual_seed(7)))
    num = max(float((f - r).abs().max()) for f, r in zip(fast, ref) if r is not None)
    den = max(float(r.abs().max()) for r in ref if r is not None)
    return num / den


def run_in_subprocess(args: list[str]) -> dict:
    """Run one measurement in a fresh interpreter and return its JSON line.

    A fresh process per method keeps peak-memory readings (ru_maxrss only grows) and allocator state apart.
    """
    out = subprocess.run([sys.executable, "-m", "nnunet_gmd.bench", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark worker {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_benchmark(cfg: dict, progress: bool = True) -> dict:
    from tqdm import tqdm

    blob = json.dumps(cfg)
    result: dict = {"config": cfg}
    setup = run_in_subprocess(["--worker", "setup", "--cfg", blob])["rss_mb"]
    for method in tqdm(METHODS + FAST_METHODS, desc="bench gmd", disable=not progress):
        r = run_in_subprocess(["--worker", method, "--cfg", blob])
        result[f"{method}_s"] = round(r["median_s"], 4)
        result.setdefault("peak_extra_mb", {})[method] = round(max(0.0, r["peak_mb"] - setup), 1)
    result["max_rel_err"] = run_in_subprocess(["--worker", "accuracy", "--cfg", blob])["max_rel_err"]
    net, _, _ = build(cfg)
    result["params_m"] = round(sum(p.numel() for p in net.parameters()) / 1e6, 3)
    result["threads"] = torch.get_num_threads()
    plain = result["plain_s"]
    result["ratios"] = {"gmd_over_plain": round(result["gmd_s"] / plain, 2),
                        "gmd_k5_over_plain": round(result["gmd_k5_s"] / plain, 2),
                        "gmd_over_floor": round(result["gmd_s"] / result["floor_s"], 3),
                        "reference_over_plain": round(result["reference_s"] / plain, 2),
                        "gmd_peak_over_reference_peak": round(result["peak_extra_mb"]["gmd"]
                                                              / max(result["peak_extra_mb"]["reference"], 1e-9), 3)}
    from nnunet_gmd import bench_fast

    result.update(bench_fast.summary(result, run_in_subprocess(["--worker", "fast_accuracy", "--cfg", blob])))
    result["paired"] = run_in_subprocess(["--worker", "paired", "--cfg", blob])
    return result


def _worker_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", required=True)
    parser.add_argument("--cfg", required=True)
    a = parser.parse_args(argv)
    cfg = json.loads(a.cfg)
    if a.worker == "setup":
        print(json.dumps({"rss_mb": setup_rss_mb(cfg)}))
    elif a.worker == "fast_accuracy":
        from nnunet_gmd import bench_fast

        print(json.dumps(bench_fast.accuracy(cfg)))
    elif a.worker == "paired":
        from nnunet_gmd import bench_fast

        print(json.dumps(bench_fast.paired(cfg)))
    elif a.worker == "accuracy":
        print(json.dumps({"max_rel_err": accuracy(cfg)}))
    else:
        print(json.dumps(run_worker(a.worker, cfg)))


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
