"""GMD against the literal reference, closed forms, merge rules, AMP scaling and the sampler."""
import pytest
import torch
from torch import nn

from nnunet_gmd.gmd import (draw_orders, ds_gmd_backward, ds_subset_losses, gmd_backward, pcgrad_coefficients)
from nnunet_gmd.gmd_reference import reference_gmd_grads
from nnunet_gmd.networks import DSFeatureFusionUNet, DSUNet
from nnunet_gmd.subsets import SubsetSampler, all_subsets, parse_subset, subset_mask, subset_name


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------- subsets
def test_all_subsets_for_four_modalities():
    subsets = all_subsets(4)
    assert len(subsets) == 15 and len(set(subsets)) == 15
    assert subsets[:4] == [(0,), (1,), (2,), (3,)] and subsets[-1] == (0, 1, 2, 3)
    assert subset_mask((1, 3), 4).tolist() == [False, True, False, True]
    assert subset_name((1, 3), ["t1", "t1ce", "t2", "flair"]) == "t1ce+flair"
    assert parse_subset("FLAIR, t1ce", ["t1", "t1ce", "t2", "flair"]) == (1, 3)
    with pytest.raises(ValueError, match="unknown modality 'pd'"):
        parse_subset("pd", ["t1", "t1ce", "t2", "flair"])


def test_sampler_draws_k_distinct_subsets_reproducibly():
    a, b = SubsetSampler(4, k=5, seed=3), SubsetSampler(4, k=5, seed=3)
    draws = [a.sample() for _ in range(20)]
    assert draws == [b.sample() for _ in range(20)]
    assert all(len(d) == 5 and len(set(d)) == 5 for d in draws)
    assert len({tuple(d) for d in draws}) > 1
    full = SubsetSampler(4, k=5, include_full=True, seed=0)
    assert all((0, 1, 2, 3) in full.sample() for _ in range(20))
    assert SubsetSampler(4).sample() == all_subsets(4)
    state = a.state_dict()
    nxt = a.sample()
    a.load_state_dict(state)
    assert a.sample() == nxt


# ---------------------------------------------------------------------------- closed forms on linear losses
def linear_losses(vectors):
    """Loss k = v_k . w, so its gradient is exactly v_k."""
    w = nn.Parameter(torch.zeros(len(vectors[0]), dtype=torch.float64))
    return w, [torch.dot(torch.tensor(v, dtype=torch.float64), w) for v in vectors]


def test_two_loss_closed_form_eq_8_9():
    g1, g2 = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([-1.5, 1.0, 0.25])
    assert torch.dot(g1, g2) < 0
    g1p = g1 - torch.dot(g1, g2) / g2.norm() ** 2 * g2  # Eq. 8
    g2p = g2 - torch.dot(g2, g1) / g1.norm() ** 2 * g1
    for reduction, scale in [("sum", 1.0), ("mean", 0.5)]:  # Eq. 9 and the official mean
        w, losses = linear_losses([g1.tolist(), g2.tolist()])
        stats = gmd_backward(losses, [w], reduction=reduction, generator=seeded())
        torch.testing.assert_close(w.grad.float(), scale * (g1p + g2p))
        assert stats.num_conflicts == 1
        assert stats.cosine[0, 1] < 0


def test_no_conflict_equals_plain_merge():
    vectors = [[1.0, 2.0, 0.0], [0.5, 1.0, 1.0], [2.0, 0.1, 0.3]]
    w, losses = linear_losses(vectors)
    stats = gmd_backward(losses, [w], generator=seeded())
    assert stats.num_conflicts == 0
    torch.testing.assert_close(w.grad, torch.tensor(vectors, dtype=torch.float64).mean(0))
    torch.testing.assert_close(stats.weights, torch.ones(3))


def test_mean_on_shared_parameters_sum_on_the_rest():
    shared = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    private = [nn.Parameter(torch.zeros(2, dtype=torch.float64)) for _ in range(2)]
    a, b = torch.tensor([1.0, 1.0], dtype=torch.float64), torch.tensor([2.0, -1.0], dtype=torch.float64)
    losses = [torch.dot(a, shared) + torch.dot(a, private[0]), torch.dot(a, shared) + torch.dot(b, private[1])]
    unused = nn.Parameter(torch.zeros(1))
    gmd_backward(losses, [shared, *private, unused], reduction="mean", generator=seeded())
    torch.testing.assert_close(shared.grad, a)  # mean of two equal gradients
    torch.testing.assert_close(private[0].grad, a)  # reached by one loss only: summed, not halved
    torch.testing.assert_close(private[1].grad, b)
    assert unused.grad is None


def test_scaled_losses_give_a_scaled_merge_and_the_same_weights():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(6))
    targets = w.detach() + torch.randn(4, 6)
    targets[1] = 2 * w.detach() - targets[0] + 0.3 * torch.randn(6)  # pulls against target 0
    plain = gmd_backward([((w - t) ** 2).sum() for t in targets], [w], generator=seeded(1))
    g_plain = w.grad.clone()
    scaled = gmd_backward([1024.0 * ((w - t) ** 2).sum() for t in targets], [w], generator=seeded(1))
    assert plain.num_conflicts > 0
    torch.testing.assert_close(scaled.weights, plain.weights)
    torch.testing.assert_close(w.grad, 1024.0 * g_plain)


def test_coefficients_match_torchjd_pcgrad_weighting():
    """torchjd's PCGradWeighting (j != i) gives the same weights when handed the same permutations."""
    torchjd = pytest.importorskip("torchjd.aggregation")
    torch.manual_seed(0)
    grads = torch.randn(6, 40)
    grads[3] = -grads[0] + 0.1 * torch.randn(40)
    gram = grads @ grads.T
    torch.manual_seed(7)
    expected = torchjd.PCGradWeighting()(gram.double())
    torch.manual_seed(7)
    orders = [torch.randperm(6).tolist() for _ in range(6)]
    ours = pcgrad_coefficients(gram, orders).sum(0)
    torch.testing.assert_close(ours, expected)


# ---------------------------------------------------------------------------- DS network against the oracle
def tiny_ds(deep_supervision: bool = True, fusion: str = "logits") -> nn.Module:
    """A tiny DS network: logit fusion (DSUNet; "learned": learned fusion weights) or feature fusion ("mean",
    "mean_var", "attention_var")."""
    torch.manual_seed(0)
    if fusion in ("logits", "learned"):
        net = DSUNet(4, 3, [4, 8, 8], nn.Conv2d, 3, [1, 2, 2], 1, 3, 1, conv_bias=True, norm_op=nn.InstanceNorm2d,
                     nonlin=nn.LeakyReLU, deep_supervision=deep_supervision,
                     learned_fusion=fusion == "learned").double()
        with torch.no_grad():   # learned weights away from their start (the plain mean)
            for f in net.fusion_weights:
                f.weight.normal_(0.0, 1.0)
        return net
    net = DSFeatureFusionUNet(4, 3, [4, 8, 8], nn.Conv2d, 3, [1, 2, 2], 1, 3, 1, conv_bias=True,
                              norm_op=nn.InstanceNorm2d, nonlin=nn.LeakyReLU, deep_supervision=deep_supervision,
                              fusion=fusion).double()
    with torch.no_grad():   # attention scores away from their start (the plain mean and variance)
        for score in net.fusion_scores:
            score.weight.normal_(0.0, 1.0)
    return net


def conflicting_subset_loss(seed: int = 0):
    """Contradictory per-subset objectives, so that conflicts really occur (they are rare at initialisation).

    Each subset gets its own random targets, and subsets of odd size push class-0 logits up while even-sized
    subsets push them down.
    """
    gen = torch.Generator().manual_seed(seed)
    targets = {s: torch.randint(0, 3, (2, 16, 16), generator=gen) for s in all_subsets(4)}

    def loss(output, subset):
        outs = output if isinstance(output, list) else [output]
        sign = 1.0 if len(subset) % 2 else -1.0
        total = 0.0
        for weight, out in zip([1.0, 0.5], outs):
            tgt = nn.functional.interpolate(targets[subset][:, None].double(), size=out.shape[2:])[:, 0].long()
            total = total + weight * (nn.functional.cross_entropy(out, tgt) + 5.0 * sign * out[:, 0].mean())
        return total

    return loss


@pytest.mark.parametrize("reduction,fusion", [("mean", "logits"), ("sum", "logits"), ("mean", "mean"),
                                              ("sum", "mean"), ("mean", "mean_var"), ("mean", "attention_var"),
                                              ("mean", "learned"),
                                              ("sum", "learned")])
def test_structured_path_matches_reference(reduction, fusion):
    net = tiny_ds(fusion=fusion)
    x = torch.randn(2, 4, 16, 16, dtype=torch.float64)
    subsets = all_subsets(4)
    loss = conflicting_subset_loss()
    params = list(net.parameters())

    stats = ds_gmd_backward(net, x, subsets, loss, reduction=reduction, generator=seeded(5))
    fast = [None if p.grad is None else p.grad.clone() for p in params]

    # the oracle: one forward per subset with the other branches switched off
    ref_losses = [loss(net(x, subset_mask(s, 4)), s) for s in subsets]
    orders = draw_orders(len(subsets), seeded(5))
    expected = reference_gmd_grads(ref_losses, params, orders, reduction)

    assert stats.num_conflicts > 10, "the test case must actually exercise the projection"
    for got, want in zip(fast, expected):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(stats.losses.double(), torch.stack(ref_losses).detach(), rtol=1e-6, atol=1e-8)

    # the generic entry point on the same losses agrees as well
    net.zero_grad(set_to_none=True)
    ref_losses = [loss(net(x, subset_mask(s, 4)), s) for s in subsets]
    gmd_backward(ref_losses, params, reduction=reduction, generator=seeded(5))
    for p, want in zip(params, expected):
        torch.testing.assert_close(p.grad, want, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("fusion", ["logits", "mean", "learned"])
def test_modality_affines_follow_the_subsets_that_reach_them(fusion):
    net = tiny_ds(deep_supervision=False, fusion=fusion)
    x = torch.randn(2, 4, 16, 16, dtype=torch.float64)
    subsets = [(0,), (0, 1)]  # modality 2 and 3 are never used, modality 1 only by one subset
    ds_gmd_backward(net, x, subsets, conflicting_subset_loss(), generator=seeded())
    owners = net.modality_of_parameters()
    for name, p in net.named_parameters():
        if owners[name] in (2, 3):
            assert p.grad is None or not p.grad.any(), name
        elif owners[name] is not None:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("fusion", ["logits", "mean", "mean_var", "attention_var", "learned"])
def test_ds_subset_losses_equal_masked_forwards(fusion):
    net = tiny_ds(fusion=fusion)
    x = torch.randn(2, 4, 16, 16, dtype=torch.float64)
    loss = conflicting_subset_loss()
    got = ds_subset_losses(net, x, all_subsets(4), loss)
    want = [loss(net(x, subset_mask(s, 4)), s) for s in all_subsets(4)]
    torch.testing.assert_close(torch.stack(got), torch.stack(want))


def test_grad_scaler_step_matches_unscaled_step_and_skips_infinite_steps():
    loss = conflicting_subset_loss()
    x = torch.randn(2, 4, 16, 16)

    def step(use_scaler: bool, poison: bool = False):
        torch.manual_seed(0)
        net = DSUNet(4, 3, [4, 8, 8], nn.Conv2d, 3, [1, 2, 2], 1, 3, 1, conv_bias=True,
                     norm_op=nn.InstanceNorm2d, nonlin=nn.LeakyReLU, deep_supervision=False)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12) if use_scaler else None

        def subset_loss(out, s):
            value = loss(out, s) * (float("inf") if poison and s == (0,) else 1.0)
            return scaler.scale(value) if scaler else value

        ds_gmd_backward(net, x, all_subsets(4), subset_loss, generator=seeded(2))
        if scaler:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        return net, scaler

    plain, _ = step(False)
    scaled, _ = step(True)
    for a, b in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    poisoned, scaler = step(True, poison=True)
    torch.manual_seed(0)
    fresh = DSUNet(4, 3, [4, 8, 8], nn.Conv2d, 3, [1, 2, 2], 1, 3, 1, conv_bias=True, norm_op=nn.InstanceNorm2d,
                   nonlin=nn.LeakyReLU, deep_supervision=False)
    assert all(torch.equal(a, b) for a, b in zip(poisoned.parameters(), fresh.parameters()))
    assert scaler.get_scale() < 2.0 ** 12


@pytest.mark.parametrize("fusion", ["logits", "mean"])
def test_ds_networks_satisfy_the_protocol_and_unit_weights_are_the_ds_mean(fusion):
    from nnunet_gmd.gmd import DSNetwork, FlatLayout, merge_flat, pcgrad_weights

    net = tiny_ds(fusion=fusion)
    assert isinstance(net, DSNetwork)
    x = torch.randn(2, 4, 16, 16, dtype=torch.float64, generator=seeded(1))
    subsets = all_subsets(4)
    loss = conflicting_subset_loss(0)
    params = list(net.parameters())
    layout = FlatLayout(params)
    losses = ds_subset_losses(net, x, subsets, loss)
    flat = torch.zeros(len(subsets), layout.numel, dtype=torch.float64)
    for k, value in enumerate(losses):
        layout.flatten_into(flat[k], torch.autograd.grad(value, params, retain_graph=True, allow_unused=True))
    # the DS ablation (mean of the subset losses) is the same merge with weights 1 ...
    expected = torch.autograd.grad(torch.stack(losses).mean(), params, allow_unused=True)
    merged = merge_flat(flat, torch.ones(len(subsets), dtype=torch.float64), torch.ones(layout.numel).bool(), "mean")
    want = torch.zeros(layout.numel, dtype=torch.float64)
    layout.flatten_into(want, expected)
    torch.testing.assert_close(merged, want)
    # ... and with no conflict, PCGrad's weights are 1 too
    gram = flat @ flat.T
    weights = pcgrad_weights(gram.abs(), seeded(0))
    torch.testing.assert_close(weights, torch.ones(len(subsets), dtype=torch.float64))
