"""How fast do reused GMD weights go stale? Cosine of each cheap mode's merged gradient to exact GMD's, along training.

A 2-D DS U-Net trains on axial slices of procedural BraTS-like phantoms (no download, no nnU-Net, a few CPU
minutes), or with ``--brats FOLDER`` on axial slices of real BraTS case folders (every ``--stride``-th voxel in
each axis, tumour slices only), with amortised GMD (exact weights every ``--interval`` steps). Every
``--probe-every`` steps, on that step's batch and weights, the K subset gradients are taken once and every mode's
merged gradient is formed from them, so all modes are compared on the same batch:

* ``amortized``: the training run's own cached weights (their age is the steps since the last refresh);
* ``amortized_sub``: weights refreshed every ``--sub-interval`` steps from one sample of the batch;
* ``m1``: exact GMD over the M + 1 objectives (unimodal subsets + full set), fresh every step;
* ``ds``: weights all 1 (plain DS, no decoupling), for scale;
* ``exact_other_orders``: exact GMD with another draw of projection orders (exact GMD is random through them).

The weights of every refresh are kept, so each probe also gives the cosine as a function of the weights' age.

    python benchmarks/gmd_staleness.py -o benchmarks/gmd_staleness [--steps 600] [--lr 3e-3]
    python benchmarks/gmd_staleness.py -o benchmarks/gmd_staleness_brats --brats brats_split/train --stride 3 \\
        --steps 1500 --lr 3e-3

Writes ``gmd_staleness.json`` and ``gmd_staleness.png`` (atomically) into the output folder.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from nnunet_gmd import gmd
from nnunet_gmd.demo.phantoms import MODALITIES, make_phantom
from nnunet_gmd.gmd_fast import AmortizedGMD, _reach, unimodal_and_full
from nnunet_gmd.networks import DSUNet
from nnunet_gmd.atomic import atomic_write, write_json
from nnunet_gmd.subsets import all_subsets

FEATURES = [16, 32, 64, 128]
DS_WEIGHTS = [1.0, 0.5, 0.25]


def phantom_slices(n_cases: int, size: int, seed: int) -> tuple[Tensor, Tensor]:
    """Axial slices through the tumour of ``n_cases`` phantoms: images (N, 4, size, size), labels 0..3."""
    rng = np.random.default_rng(seed)
    cases = (make_phantom((size, size, size), rng) for _ in range(n_cases))
    return tumour_slices((np.stack([c.images[m] for m in MODALITIES]), c.seg) for c in cases)


def brats_slices(folder: Path, stride: int) -> tuple[Tensor, Tensor]:
    """Axial tumour slices of every BraTS case folder in ``folder``, each axis subsampled by ``stride``.

    Files are found by the BraTS ``<case>_<sequence>.nii.gz`` names.
    """
    import nibabel

    cases = sorted(p for p in folder.iterdir() if p.is_dir())
    if not cases:
        raise SystemExit(f"{folder}: no BraTS case folders")

    def load(case: Path, suffix: str) -> np.ndarray:
        path = case / f"{case.name}_{suffix}.nii.gz"
        if not path.is_file():
            raise SystemExit(f"{path}: missing")
        return np.asarray(nibabel.load(str(path)).dataobj)[::stride, ::stride, ::stride]

    return tumour_slices((np.stack([load(c, m) for m in MODALITIES]), load(c, "seg")) for c in cases)


def tumour_slices(volumes) -> tuple[Tensor, Tensor]:
    """(images (N, 4, H, W), labels 0..3) from (4-channel volume, BraTS label map) pairs: every axial slice with
    tumour, each channel z-scored inside the brain (any channel non-zero) as nnU-Net does for MRI."""
    images, labels = [], []
    for vol, seg in volumes:
        vol = vol.astype(np.float32)
        brain = (vol != 0).any(axis=0)
        for c in range(vol.shape[0]):
            vals = vol[c][brain]
            vol[c] = np.where(brain, (vol[c] - vals.mean()) / (vals.std() + 1e-8), 0.0)
        seg = seg.astype(np.int64)
        seg[seg == 4] = 3
        for z in np.nonzero((seg > 0).any(axis=(0, 1)))[0]:
            images.append(vol[:, :, :, z])
            labels.append(seg[:, :, z])
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(labels))


def make_loss(labels: Tensor):
    """nnU-Net-style deep-supervision cross-entropy on (B, size, size) labels."""
    targets = [labels] + [labels[:, ::2 ** i, ::2 ** i] for i in range(1, len(DS_WEIGHTS))]

    def loss(output, _subset=None):
        return sum(w * nn.functional.cross_entropy(o, t) for w, o, t in zip(DS_WEIGHTS, output, targets)) \
            / sum(DS_WEIGHTS)

    return loss


def subset_gradients(net: DSUNet, x: Tensor, subsets, loss) -> Tensor:
    """The K subset gradients as rows of one (K, P) matrix, one VJP per subset through its own branches."""
    params = list(net.parameters())
    outputs = gmd.ds_branch_outputs(net, x)
    rows = []
    for k, s in enumerate(subsets):
        g = torch.autograd.grad(loss(gmd.fuse_logits(outputs, s)), params, retain_graph=k < len(subsets) - 1,
                                allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if gi is None else gi).reshape(-1) for gi, p in zip(g, params)]))
    return torch.stack(rows)


def merged(flat: Tensor, weights: Tensor, shared: Tensor) -> Tensor:
    """The official merge for given weights: sum_k w_k g_k, divided by K on the parameters every subset reaches."""
    m = weights.to(flat.dtype) @ flat
    return torch.where(shared, m / flat.shape[0], m)


def exact_weights(flat: Tensor, generator: torch.Generator) -> Tensor:
    return gmd.pcgrad_coefficients(flat @ flat.T, gmd.draw_orders(flat.shape[0], generator)).sum(0).float()


def cosine(a: Tensor, b: Tensor) -> float:
    return float(torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-30))


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    if args.brats:
        images, labels = brats_slices(args.brats, args.stride)
        side = 2 ** (len(FEATURES) - 1)   # crop to a multiple of the U-Net's total downsampling
        h, w = (d - d % side for d in images.shape[-2:])
        images, labels = images[..., :h, :w].contiguous(), labels[..., :h, :w].contiguous()
    else:
        images, labels = phantom_slices(args.cases, args.size, args.seed)
    n = len(FEATURES)
    net = DSUNet(4, n, FEATURES, nn.Conv2d, 3, [1] + [2] * (n - 1), 2, 4, 2, conv_bias=True,
                 norm_op=nn.InstanceNorm2d, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True},
                 deep_supervision=True)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=3e-5)
    subsets, m1 = all_subsets(4), unimodal_and_full(4)
    m1_rows = [subsets.index(s) for s in m1]
    layout = gmd.FlatLayout(list(net.parameters()))
    shared = {name: layout.element_mask(_reach(net, s)[0], torch.device("cpu"))
              for name, s in (("all", subsets), ("m1", m1))}
    mode = AmortizedGMD(args.interval)
    gen, sub_gen, probe_gen = (torch.Generator().manual_seed(args.seed + i) for i in range(3))
    sub_weights = torch.ones(len(subsets))
    data_gen = torch.Generator().manual_seed(args.seed + 3)
    history: list[tuple[int, Tensor]] = []  # (step, weights) of every refresh of the training run
    probes, losses, refresh_conflicts = [], [], []
    started = time.monotonic()
    for step in tqdm(range(args.steps + 1), desc="gmd staleness"):
        idx = torch.randperm(len(images), generator=data_gen)[:args.batch]
        x, loss = images[idx], make_loss(labels[idx])
        if step % args.sub_interval == 0:  # the sub-batch mode's own weights, along the same run
            sub_weights = gmd.ds_gmd_backward(net, x[:1], subsets, make_loss(labels[idx[:1]]),
                                              generator=sub_gen).weights
        if step % args.probe_every == 0:
            flat = subset_gradients(net, x, subsets, loss)
            w_exact = exact_weights(flat, probe_gen)
            exact = merged(flat, w_exact, shared["all"])
            other = cosine(merged(flat, exact_weights(flat, probe_gen), shared["all"]), exact)
            # on a refresh step the training run takes an exact step itself, with its own draw of orders
            cached = None if mode.needs_refresh(subsets) else mode.weights
            record = {"step": step, "conflicts": gmd.gram_statistics(flat @ flat.T)[1],
                      "amortized_age": 0 if cached is None else step - history[-1][0],
                      "cos": {"amortized": other if cached is None else cosine(merged(flat, cached, shared["all"]),
                                                                              exact),
                              "amortized_sub": cosine(merged(flat, sub_weights, shared["all"]), exact),
                              "m1": cosine(merged(flat[m1_rows], exact_weights(flat[m1_rows], probe_gen),
                                                  shared["m1"]), exact),
                              "ds": cosine(merged(flat, torch.ones(len(subsets)), shared["all"]), exact),
                              "exact_other_orders": other},
                      "cos_by_age": [[step - s, cosine(merged(flat, w, shared["all"]), exact)]
                                     for s, w in history if step - s <= args.max_age]}
            probes.append(record)
            del flat
        if step == args.steps:
            break
        opt.zero_grad(set_to_none=True)
        out = mode.backward(net, x, subsets, loss, generator=gen)
        if out.stats is not None:
            history.append((step, out.weights.clone()))
            refresh_conflicts.append([step, out.stats.num_conflicts])
        losses.append(float(out.losses.mean()))
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
        opt.step()
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"}
    return {"config": config, "features": FEATURES,
            "data": str(args.brats) if args.brats else "phantoms", "slice_shape": list(images.shape[-2:]),
            "slices": len(images), "seconds": round(time.monotonic() - started, 1),
            "threads": torch.get_num_threads(), "train_loss": losses, "probes": probes,
            "refresh_conflicts": refresh_conflicts,
            "summary": summarise(probes)}


def summarise(probes: list[dict]) -> dict:
    """Mean and minimum cosine of each mode over the probes, and the mean cosine per weights' age."""
    modes = probes[0]["cos"].keys()
    out = {m: {"mean": round(float(np.mean([p["cos"][m] for p in probes])), 4),
               "min": round(float(np.min([p["cos"][m] for p in probes])), 4)} for m in modes}
    by_age: dict[int, list[float]] = {}
    for p in probes:
        for age, c in p["cos_by_age"]:
            by_age.setdefault(int(age), []).append(c)
    out["cos_by_age_mean"] = {str(a): round(float(np.mean(v)), 4) for a, v in sorted(by_age.items())}
    out["mean_conflicts"] = round(float(np.mean([p["conflicts"] for p in probes])), 2)
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probes = result["probes"]
    steps = [p["step"] for p in probes]
    fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(9, 11))
    for mode in probes[0]["cos"]:
        top.plot(steps, [p["cos"][mode] for p in probes], marker="o", label=mode)
    top.set_ylabel("cosine to exact GMD")
    top.set_xlabel("training step")
    top.set_title("merged gradient of each mode vs exact GMD, same batch and weights")
    top.legend()
    middle.plot(steps, [p["conflicts"] for p in probes], marker="o", color="tab:red", label="probe batches")
    refreshes = result.get("refresh_conflicts", [])
    middle.plot([r[0] for r in refreshes], [r[1] for r in refreshes], ".", color="tab:gray",
                label="training run's exact refreshes")
    middle.legend()
    middle.set_ylabel("conflicting pairs (of 105)")
    middle.set_xlabel("training step")
    ages = [(a, c) for p in probes for a, c in p["cos_by_age"]]
    if ages:
        bottom.scatter([a for a, _ in ages], [c for _, c in ages], s=12, alpha=0.6)
    bottom.set_xlabel("age of the reused weights (steps since their exact refresh)")
    bottom.set_ylabel("cosine to exact GMD")
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--out", type=Path, required=True, help="output folder")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--probe-every", type=int, default=50)
    parser.add_argument("--interval", type=int, default=16, help="amortised mode: exact weights every N steps")
    parser.add_argument("--sub-interval", type=int, default=8, help="sub-batch mode: exact weights every N steps")
    parser.add_argument("--max-age", type=int, default=200, help="oldest reused weights compared at a probe")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--brats", type=Path, help="folder of real BraTS case folders instead of phantoms")
    parser.add_argument("--stride", type=int, default=5, help="with --brats: keep every N-th voxel per axis")
    args = parser.parse_args()
    result = run(args)
    write_json(args.out / "gmd_staleness.json", result)
    plot(result, args.out / "gmd_staleness.png")
    print({k: v for k, v in result["summary"].items() if k != "cos_by_age_mean"}, f"{result['seconds']} s")


if __name__ == "__main__":
    main()
