"""Feature-fusion DS U-Net: shared encoder, fused skips, switched-off branches, deep supervision, export."""
import io

import pytest
import torch
from torch import nn

from nnunet_gmd.networks import DSFeatureFusionUNet


def tiny_ff(dim: int = 3, fusion: str = "mean", deep_supervision: bool = False) -> DSFeatureFusionUNet:
    """A tiny DS-FF network; attention scores are moved off their start (0, the plain mean) so they matter."""
    conv = nn.Conv3d if dim == 3 else nn.Conv2d
    norm = nn.InstanceNorm3d if dim == 3 else nn.InstanceNorm2d
    torch.manual_seed(0)
    net = DSFeatureFusionUNet(4, 3, [4, 8, 16], conv, 3, [1, 2, 2], 2, 3, 1, conv_bias=True, norm_op=norm,
                              norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                              nonlin_kwargs={"inplace": True}, deep_supervision=deep_supervision, fusion=fusion)
    with torch.no_grad():
        for score in net.fusion_scores:
            score.weight.normal_(0.0, 1.0)
    return net


@pytest.mark.parametrize("fusion", ["mean", "mean_var", "attention_var"])
@pytest.mark.parametrize("dim", [2, 3])
def test_missing_channel_values_cannot_change_the_output(dim, fusion):
    net = tiny_ff(dim, fusion).eval()
    x = torch.randn(2, 4, *([16] * dim))
    mask = torch.tensor([True, False, True, False])
    ref = net(x, mask)
    assert ref.shape == (2, 3, *([16] * dim))
    x2 = x.clone()
    x2[:, 1] = torch.randn_like(x2[:, 1]) * 100
    x2[:, 3] = float("nan")
    assert torch.equal(net(x2, mask), ref)
    assert not torch.allclose(net(x2), ref)


def test_only_encoder_norm_affines_are_per_modality():
    net = tiny_ff()
    owners = net.modality_of_parameters()
    assert {o for o in owners.values()} == {None, 0, 1, 2, 3}
    for name, owner in owners.items():
        assert (owner is not None) == (name.startswith("encoder.") and ".affines." in name), name
    # the decoder has one affine per norm: it sees fused features, not a modality
    assert not any(".affines.1." in n for n, _ in net.decoder.named_parameters())


def test_skips_are_fused_by_the_mean_of_the_available_branches():
    """Decoding the mean of the subset's encoder features by hand gives the network's output."""
    net = tiny_ff().eval()
    x = torch.randn(2, 4, 16, 16, 16)
    branches = net.forward_branch_graphs(x)  # [m][stage]
    for subset in [(0,), (1, 3), (0, 1, 2, 3)]:
        skips = [torch.stack([branches[m][s] for m in subset]).mean(0) for s in range(3)]
        by_hand = net.decoder(skips, [2])[0]
        mask = torch.zeros(4, dtype=torch.bool)
        mask[list(subset)] = True
        torch.testing.assert_close(net(x, mask), by_hand, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(net.decode_subset(branches, subset)[0], by_hand, rtol=1e-5, atol=1e-6)


def test_mean_var_fusion_adds_the_variance_and_it_is_zero_for_one_branch():
    net = tiny_ff(fusion="mean_var").eval()
    rows = torch.randn(3, 5, 4, 4, 4)
    sample_idx = torch.tensor([0, 0, 1])  # sample 0 has two branches, sample 1 one
    fused = net._fuse_features(rows, sample_idx, 2)
    assert fused.shape == (2, 10, 4, 4, 4)
    torch.testing.assert_close(fused[0, :5], rows[:2].mean(0))
    torch.testing.assert_close(fused[0, 5:], rows[:2].var(0, unbiased=False))
    assert torch.equal(fused[1, 5:], torch.zeros(5, 4, 4, 4))


def test_attention_fusion_is_a_softmax_over_the_available_branches_only():
    """Per voxel and channel, weights exp(score) normalised over each sample's own rows; one branch: weight 1."""
    net = tiny_ff(fusion="attention_var").eval()
    rows = torch.randn(3, 5, 4, 4, 4)
    scores = torch.randn(3, 5, 4, 4, 4)
    fused = net._attention_fuse(rows, scores, torch.tensor([0, 0, 1]), 2)  # sample 0: two branches, sample 1: one
    assert fused.shape == (2, 10, 4, 4, 4)
    bounded = 4.0 * torch.tanh(scores[:2] / 4.0)
    w = torch.softmax(bounded, 0)
    mean = (w * rows[:2]).sum(0)
    torch.testing.assert_close(fused[0, :5], mean)
    torch.testing.assert_close(fused[0, 5:], (w * (rows[:2] - mean) ** 2).sum(0))
    torch.testing.assert_close(fused[1, :5], rows[2])
    torch.testing.assert_close(fused[1, 5:], torch.zeros(5, 4, 4, 4))


def test_attention_fusion_starts_as_mean_var_and_adds_only_score_convolutions():
    """Zero scores are the plain mean and variance: a fresh attention network equals mean_var on its weights."""
    torch.manual_seed(0)
    attention = DSFeatureFusionUNet(4, 3, [4, 8, 16], nn.Conv3d, 3, [1, 2, 2], 2, 3, 1, conv_bias=True,
                                    norm_op=nn.InstanceNorm3d, nonlin=nn.LeakyReLU, fusion="attention_var").eval()
    mean_var = tiny_ff(fusion="mean_var").eval()
    extra = {k: v for k, v in attention.state_dict().items() if k.startswith("fusion_scores.")}
    assert sorted(extra) == [f"fusion_scores.{i}.{p}" for i in range(3) for p in ("bias", "weight")]
    assert all(o is None for n, o in attention.modality_of_parameters().items() if n.startswith("fusion_scores."))
    mean_var.load_state_dict({k: v for k, v in attention.state_dict().items() if k not in extra}, strict=True)
    x = torch.randn(2, 4, 16, 16, 16)
    for mask in [torch.tensor([True, True, True, True]), torch.tensor([False, True, False, True])]:
        torch.testing.assert_close(attention(x, mask), mean_var(x, mask), rtol=1e-5, atol=1e-6)


def test_per_sample_mask_equals_separate_calls():
    net = tiny_ff().eval()
    x = torch.randn(2, 4, 16, 16, 16)
    mask = torch.tensor([[True, False, False, True], [False, True, True, True]])
    out = net(x, mask)
    torch.testing.assert_close(out[0:1], net(x[0:1], mask[0]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[1:2], net(x[1:2], mask[1]), rtol=1e-4, atol=1e-5)


def test_errors_and_default_availability():
    net = tiny_ff().eval()
    x = torch.randn(1, 4, 16, 16, 16)
    with pytest.raises(ValueError, match="at least one available modality"):
        net(x, torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="fusion must be one of"):
        tiny_ff(fusion="max")
    mask = torch.tensor([False, True, True, False])
    net.set_default_available(mask)
    assert torch.equal(net(x), net(x, mask))
    net.set_default_available(None)


def test_same_modules_with_and_without_deep_supervision():
    net = tiny_ff(deep_supervision=True)
    outs = net(torch.randn(2, 4, 16, 16, 16))
    assert [tuple(o.shape) for o in outs] == [(2, 3, 16, 16, 16), (2, 3, 8, 8, 8)]
    tiny_ff(deep_supervision=False).load_state_dict(net.state_dict(), strict=True)


@pytest.mark.parametrize("fusion", ["mean", "mean_var", "attention_var"])
def test_scripted_export_keeps_the_mask_a_runtime_input(fusion):
    net = tiny_ff(fusion=fusion).eval()
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(net), buffer)
    buffer.seek(0)
    exported = torch.jit.load(buffer)
    x = torch.randn(2, 4, 16, 16, 16)
    for mask in [torch.tensor([True, False, False, False]), torch.tensor([False, True, True, True]),
                 torch.tensor([[True, False, False, False], [False, False, True, True]])]:
        torch.testing.assert_close(exported(x, mask), net(x, mask))
    assert not torch.allclose(exported(x, torch.tensor([True, False, False, False])),
                              exported(x, torch.tensor([False, True, False, False])))


@pytest.mark.parametrize("fusion", ["mean_var", "attention_var"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fusion_runs_under_autocast(fusion, dtype):
    """Mixed precision (the CUDA AMP path, here CPU autocast): index_add_ needs matching dtypes at every skip."""
    net = tiny_ff(fusion=fusion)
    x = torch.randn(2, 4, 16, 16, 16)
    with torch.autocast("cpu", dtype=dtype):
        out = net(x, torch.tensor([[True, False, True, True], [False, False, True, False]]))
    out.float().sum().backward()
    assert out.dtype == dtype and bool(torch.isfinite(out).all())
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in net.fusion_scores.parameters())
