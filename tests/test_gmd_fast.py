"""Amortised GMD: the weighted single backward against separate gradients, and interval 1 against exact GMD."""
import pytest
import torch

from test_gmd import conflicting_subset_loss, seeded, tiny_ds

from nnunet_gmd.gmd import ds_gmd_backward
from nnunet_gmd.gmd import ds_subset_losses
from nnunet_gmd.gmd_fast import AmortizedGMD, ds_mean_backward, unimodal_and_full, weighted_ds_backward
from nnunet_gmd.subsets import all_subsets, subset_mask


def grads_of(net):
    return [None if p.grad is None else p.grad.detach().clone() for p in net.parameters()]


def separate_gradients(net, x, subsets, loss):
    """K gradients, each from its own masked forward (absent branches never computed) and its own backward."""
    out = []
    for s in subsets:
        net.zero_grad(set_to_none=True)
        gs = torch.autograd.grad(loss(net(x, subset_mask(s, 4)), s), list(net.parameters()), allow_unused=True)
        out.append(list(gs))
    return out


@pytest.mark.parametrize("subsets", [all_subsets(4), [(0,), (0, 1), (1, 2, 3)], [(0,), (0, 1)]])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_weighted_single_backward_equals_weighted_sum_of_separate_gradients(subsets, reduction):
    net = tiny_ds()
    x = torch.randn(2, 4, 16, 16, dtype=torch.float64, generator=seeded(1))
    loss = conflicting_subset_loss()
    weights = torch.rand(len(subsets), generator=seeded(2), dtype=torch.float64) * 3 - 1  # some negative
    separate = separate_gradients(net, x, subsets, loss)
    owners = list(net.modality_of_parameters().values())

    net.zero_grad(set_to_none=True)
    losses = weighted_ds_backward(net, x, subsets, loss, weights, reduction=reduction)
    assert losses.shape == (len(subsets),)
    checked = 0
    for i, p in enumerate(net.parameters()):
        parts = [w * g[i] for w, g in zip(weights, separate) if g[i] is not None]
        if not parts:
            assert p.grad is None or not p.grad.any()
            continue
        want = sum(parts)
        shared = owners[i] is None or all(owners[i] in s for s in subsets)
        if reduction == "mean" and shared:
            want = want / len(subsets)
        torch.testing.assert_close(p.grad, want, rtol=1e-9, atol=1e-12)
        checked += 1
    assert checked > len(owners) // 2


@pytest.mark.parametrize("fusion", ["logits", "mean"])
def test_the_ds_ablation_step_is_the_gradient_of_the_mean_subset_loss(fusion):
    """The DS "mean" ablation goes through the weighted merge (w = 1/K): the same gradient as one plain backward."""
    subsets = [(0,), (1, 3), (0, 1, 2, 3)]
    x = torch.randn(2, 4, 16, 16, dtype=torch.float64, generator=seeded(4))
    loss = conflicting_subset_loss()
    net = tiny_ds(fusion=fusion)
    net.zero_grad(set_to_none=True)
    torch.stack(ds_subset_losses(net, x, subsets, loss)).mean().backward()
    want = grads_of(net)
    net.zero_grad(set_to_none=True)
    losses = ds_mean_backward(net, x, subsets, loss)
    assert losses.shape == (3,) and torch.isfinite(losses).all()
    compared = 0
    for got, expected in zip(grads_of(net), want):
        if expected is None:
            assert got is None or not got.any()
            continue
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
        compared += 1
    assert compared > len(want) // 2


def test_interval_one_is_exact_gmd_step_for_step():
    x = torch.randn(2, 4, 16, 16, dtype=torch.float64, generator=seeded(3))
    loss = conflicting_subset_loss()
    nets = [tiny_ds(), tiny_ds()]
    opts = [torch.optim.Adam(n.parameters(), lr=1e-2) for n in nets]
    gens = [seeded(5), seeded(5)]
    mode = AmortizedGMD(interval=1)
    conflicts = 0
    for _ in range(3):
        for o in opts:
            o.zero_grad(set_to_none=True)
        stats = ds_gmd_backward(nets[0], x, all_subsets(4), loss, generator=gens[0])
        step = mode.backward(nets[1], x, all_subsets(4), loss, generator=gens[1])
        assert step.stats is not None
        conflicts += stats.num_conflicts
        for a, b in zip(grads_of(nets[0]), grads_of(nets[1])):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(step.weights, stats.weights)
        for o in opts:
            o.step()
    assert conflicts > 10, "the projection must be exercised"
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-8)


def test_reuse_steps_apply_the_cached_weights_and_resume_from_state():
    x = torch.randn(2, 4, 16, 16, dtype=torch.float64, generator=seeded(4))
    loss = conflicting_subset_loss()
    subsets = all_subsets(4)
    net = tiny_ds()
    opt = torch.optim.SGD(net.parameters(), lr=1e-2)
    mode = AmortizedGMD(interval=3)
    refreshed, cached = [], None
    for i in range(5):
        opt.zero_grad(set_to_none=True)
        if i == 4:  # a copy resumed from the state must take the same step as the original
            resumed = AmortizedGMD(interval=3)
            resumed.load_state_dict(mode.state_dict())
            resumed.backward(net, x, subsets, loss, generator=seeded(9))
            from_state = grads_of(net)
            opt.zero_grad(set_to_none=True)
        step = mode.backward(net, x, subsets, loss, generator=seeded(9))
        refreshed.append(step.stats is not None)
        if step.stats is not None:
            cached = step.stats.weights
            assert not torch.equal(cached, torch.ones_like(cached)), "the weights must differ from plain DS"
        else:
            torch.testing.assert_close(step.weights, cached)
            got = grads_of(net)
            opt.zero_grad(set_to_none=True)
            weighted_ds_backward(net, x, subsets, loss, cached)
            for a, b in zip(got, grads_of(net)):
                assert (a is None) == (b is None) and (a is None or torch.equal(a, b))
        opt.step()
    assert refreshed == [True, False, False, True, False]
    for a, b in zip(from_state, grads_of(net)):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))


def rows_loss(rows: slice):
    """Cross-entropy on the targets of ``rows`` of the batch, with subsets of odd and even size pulling apart."""
    targets = torch.randint(0, 3, (2, 16, 16), generator=seeded(8))[rows]

    def loss(output, subset):
        sign = 1.0 if len(subset) % 2 else -1.0
        out = output[0]
        return torch.nn.functional.cross_entropy(out, targets) + 5.0 * sign * out[:, 0].mean()

    return loss


def test_sub_batch_gram_and_overflow_refresh():
    x = torch.randn(2, 4, 16, 16, dtype=torch.float64, generator=seeded(6))
    loss, sub_loss = rows_loss(slice(None)), rows_loss(slice(0, 1))
    subsets = unimodal_and_full(4)
    assert subsets == [(0,), (1,), (2,), (3,), (0, 1, 2, 3)]
    net = tiny_ds()
    mode = AmortizedGMD(interval=4)
    step = mode.backward(net, x, subsets, loss, generator=seeded(1), gram_input=(x[:1], sub_loss))
    got = grads_of(net)
    net.zero_grad(set_to_none=True)
    sub_stats = ds_gmd_backward(net, x[:1], subsets, sub_loss, generator=seeded(1))
    assert sub_stats.num_conflicts > 0
    torch.testing.assert_close(step.weights, sub_stats.weights)
    net.zero_grad(set_to_none=True)
    weighted_ds_backward(net, x, subsets, loss, sub_stats.weights)
    for a, b in zip(got, grads_of(net)):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))

    overflow = AmortizedGMD(interval=4)
    poisoned = overflow.backward(net, x, subsets, lambda out, s: loss(out, s) * float("inf"), generator=seeded(1))
    assert poisoned.stats is not None and overflow.weights is None
    assert overflow.backward(net, x, subsets, loss, generator=seeded(1)).stats is not None  # refreshes again
    assert overflow.weights is not None
    assert overflow.backward(net, x, subsets, loss, generator=seeded(1)).stats is None


def test_interval_must_be_positive():
    with pytest.raises(ValueError, match="interval must be >= 1"):
        AmortizedGMD(interval=0)


def test_paired_bench_times_each_step_in_one_process_and_amortises_by_the_cycle():
    from nnunet_gmd.bench_fast import amortized_cost, paired

    cfg = dict(modalities=2, features=[4, 8], size=8, batch=1, steps=2, seed=0, fast_interval=4)
    out = paired(cfg)
    for step in ("bare", "plain", "reuse", "exact"):
        assert out[f"{step}_s"] > 0
    assert out["interval"] == 4
    assert out["gmd_amortized_s"] == pytest.approx(amortized_cost(out["exact_s"], out["reuse_s"], 4), abs=1e-3)
    assert out["gmd_amortized_over_plain"] == pytest.approx(out["gmd_amortized_s"] / out["plain_s"], rel=1e-2)
    assert amortized_cost(5.0, 1.0, 1) == 5.0 and amortized_cost(5.0, 1.0, 4) == 2.0
