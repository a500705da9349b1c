"""Dynamic Sharing U-Net: shared weights, switched-off branches, fusion, deep supervision, export."""
import io

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from nnunet_gmd.networks import DSUNet


def tiny_net(dim: int = 3, m: int = 4, deep_supervision: bool = False, classes: int = 3) -> DSUNet:
    conv = nn.Conv3d if dim == 3 else nn.Conv2d
    norm = nn.InstanceNorm3d if dim == 3 else nn.InstanceNorm2d
    torch.manual_seed(0)
    return DSUNet(m, 3, [4, 8, 16], conv, 3, [1, 2, 2], 2, classes, 1, conv_bias=True, norm_op=norm,
                  norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                  nonlin_kwargs={"inplace": True}, deep_supervision=deep_supervision)


def test_convolutions_match_plain_unet_and_only_norm_affines_are_per_modality():
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    net = tiny_net(m=4)
    plain = PlainConvUNet(1, 3, [4, 8, 16], nn.Conv3d, 3, [1, 2, 2], 2, 3, 1, conv_bias=True,
                          norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                          nonlin=nn.LeakyReLU)
    conv_params = lambda mod: sorted(p.numel() for n, p in mod.named_parameters() if "norm" not in n)  # noqa: E731
    assert conv_params(net) == conv_params(plain)
    plain_norm = sum(p.numel() for n, p in plain.named_parameters() if "norm" in n)
    ds_norm = sum(p.numel() for n, p in net.named_parameters() if "norm" in n)
    assert ds_norm == 4 * plain_norm
    owners = net.modality_of_parameters()
    assert {o for o in owners.values()} == {None, 0, 1, 2, 3}
    assert all(owners[n] is None for n in owners if "affines" not in n)


@pytest.mark.parametrize("dim", [2, 3])
def test_missing_channel_values_cannot_change_the_output(dim):
    net = tiny_net(dim).eval()
    x = torch.randn(2, 4, *([16] * dim))
    mask = torch.tensor([True, False, True, False])
    ref = net(x, mask)
    x2 = x.clone()
    x2[:, 1] = torch.randn_like(x2[:, 1]) * 100
    x2[:, 3] = float("nan")
    assert torch.equal(net(x2, mask), ref)
    assert not torch.allclose(net(x2), ref)  # with all branches on, channel 1 does matter


def test_fusion_is_the_mean_of_available_branch_logits():
    net = tiny_net().eval()
    x = torch.randn(2, 4, 16, 16, 16)
    branches = torch.stack([outs[0] for outs in net.forward_branch_graphs(x)])  # (M, B, C, ...)
    for subset in [(0,), (1, 3), (0, 1, 2, 3)]:
        mask = torch.zeros(4, dtype=torch.bool)
        mask[list(subset)] = True
        torch.testing.assert_close(net(x, mask), branches[list(subset)].mean(0), rtol=1e-5, atol=1e-6)


def test_per_sample_mask_equals_separate_calls():
    net = tiny_net().eval()
    x = torch.randn(2, 4, 16, 16, 16)
    mask = torch.tensor([[True, False, False, True], [False, True, True, True]])
    out = net(x, mask)
    torch.testing.assert_close(out[0:1], net(x[0:1], mask[0]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[1:2], net(x[1:2], mask[1]), rtol=1e-5, atol=1e-6)


def test_all_missing_and_wrong_shapes_are_clear_errors():
    net = tiny_net()
    x = torch.randn(2, 4, 16, 16, 16)
    with pytest.raises(ValueError, match="at least one available modality"):
        net(x, torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least one available modality"):
        net(x, torch.tensor([[True, False, False, False], [False] * 4]))
    with pytest.raises(ValueError, match="mask must have shape"):
        net(x, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="expected 4 modality channels"):
        net(torch.randn(1, 3, 16, 16, 16))
    with pytest.raises(ValueError, match="a modality in every row"):
        net.set_default_available(torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="a modality in every row"):
        net.set_default_available(torch.tensor([[True, False, False, False], [False] * 4]))
    # a per-sample default (nnU-Net's validation step on incomplete cases) equals passing the mask
    mask = torch.tensor([[True, False, True, True], [False, True, False, False]])
    net.eval()
    with torch.no_grad():
        expected = net(x, mask)
        net.set_default_available(mask)
        torch.testing.assert_close(net(x), expected)
        net.set_default_available(None)


def test_cost_falls_with_fewer_modalities():
    net = tiny_net().eval()
    x = torch.randn(1, 4, 16, 16, 16)

    def flops(mask):
        with FlopCounterMode(display=False) as counter:
            net(x, mask)
        return counter.get_total_flops()

    full, one = flops(torch.ones(4, dtype=torch.bool)), flops(torch.tensor([False, False, True, False]))
    assert one * 4 == pytest.approx(full, rel=0.01)


def test_default_availability_is_used_by_plain_calls():
    net = tiny_net().eval()
    x = torch.randn(1, 4, 16, 16, 16)
    mask = torch.tensor([False, True, True, False])
    net.set_default_available(mask)
    assert torch.equal(net(x), net(x, mask))
    net.set_default_available(None)
    assert torch.equal(net(x), net(x, torch.ones(4, dtype=torch.bool)))


def test_deep_supervision_outputs_highest_resolution_first():
    net = tiny_net(deep_supervision=True)
    outs = net(torch.randn(2, 4, 16, 16, 16))
    assert [tuple(o.shape) for o in outs] == [(2, 3, 16, 16, 16), (2, 3, 8, 8, 8)]
    net.decoder.deep_supervision = False
    assert tuple(net(torch.randn(2, 4, 16, 16, 16)).shape) == (2, 3, 16, 16, 16)
    # the same modules either way: weights trained with deep supervision load strictly without it
    tiny_net(deep_supervision=False).load_state_dict(net.state_dict(), strict=True)


def test_scripted_export_keeps_the_mask_a_runtime_input():
    net = tiny_net().eval()
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


def test_fused_instance_norm_equals_norm_then_per_modality_affine():
    from nnunet_gmd.networks.ds_unet import ModalityNorm

    torch.manual_seed(0)
    fused = ModalityNorm(5, 3, nn.InstanceNorm3d, {"eps": 1e-5})
    for affine in fused.affines:
        nn.init.normal_(affine.weight)
        nn.init.normal_(affine.bias)
    generic = ModalityNorm(5, 3, nn.InstanceNorm3d, {"eps": 1e-5})
    generic.load_state_dict(fused.state_dict())
    generic.fused_instance_norm = False
    assert fused.fused_instance_norm
    x = torch.randn(6, 5, 4, 4, 4)
    counts = [2, 0, 4]  # rows 0-1 modality 0, rows 2-5 modality 2
    torch.testing.assert_close(fused(x, counts), generic(x, counts), rtol=1e-5, atol=1e-5)
    expected = nn.functional.instance_norm(x[2:3]) * fused.affines[2].weight.view(1, 5, 1, 1, 1) \
        + fused.affines[2].bias.view(1, 5, 1, 1, 1)
    torch.testing.assert_close(fused(x, counts)[2:3], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask, problem", [
    (torch.tensor([True, False]), r"shape \(4,\) or \(2, 4\)"),
    (torch.ones(3, 4, dtype=torch.bool), r"shape \(4,\) or \(2, 4\)"),
    (torch.tensor([[True, False, False, False], [False] * 4]), "all-missing mask row"),
])
def test_the_unet_and_the_sentiment_model_apply_one_mask_rule(mask, problem):
    from nnunet_gmd.sentiment.model import ModelConfig, build_model, check_availability

    net = tiny_net(dim=2)
    with pytest.raises(ValueError, match=problem):
        net(torch.randn(2, 4, 16, 16), mask)
    with pytest.raises(ValueError, match=problem):
        check_availability(mask, 2, 4, torch.device("cpu"))
    ok = torch.tensor([True, False, True, False])
    assert torch.equal(check_availability(ok, 2, 4, torch.device("cpu")), ok.expand(2, 4))
    assert torch.equal(net._mask(torch.zeros(2, 4, 8, 8), ok), ok.expand(2, 4))
    sentiment = build_model(ModelConfig(feature_dims=(3, 4, 5), backbone="mlp"))
    owners = sentiment.modality_of_parameters()
    assert {o for o in owners.values()} == {None, 0, 1, 2}
    assert all(o == int(n.split(".")[1]) for n, o in owners.items() if n.startswith("encoders."))


def test_parameter_owners_follow_the_per_modality_containers():
    from nnunet_gmd.networks.modality import modality_owners

    names = ["encoder.stages.0.norm.affines.2.weight", "encoder.stages.0.conv.weight", "encoders.1.proj.weight",
             "decoder.stages.0.norm.affines.3.bias", "head.weight", "affines.x.weight"]
    assert modality_owners(names) == {names[0]: 2, names[1]: None, names[2]: 1, names[3]: 3, names[4]: None,
                                      names[5]: None}
    assert modality_owners(names, shared_prefixes=("decoder",))[names[3]] is None
    counts = {o for o in tiny_net(dim=2).modality_of_parameters().values()}
    assert counts == {None, 0, 1, 2, 3}


def learned_net(dim: int = 2, deep_supervision: bool = False) -> DSUNet:
    conv = nn.Conv3d if dim == 3 else nn.Conv2d
    norm = nn.InstanceNorm3d if dim == 3 else nn.InstanceNorm2d
    torch.manual_seed(0)
    return DSUNet(4, 3, [4, 8, 16], conv, 3, [1, 2, 2], 2, 3, 1, conv_bias=True, norm_op=norm,
                  norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU, deep_supervision=deep_supervision,
                  learned_fusion=True)


def test_learned_fusion_starts_at_the_plain_mean_and_weights_only_the_available_branches():
    plain, learned = tiny_net(dim=2), learned_net()
    assert set(learned.state_dict()) - set(plain.state_dict()) == {f"fusion_weights.{m}.weight" for m in range(4)}
    learned.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(2, 4, 16, 16)
    mask = torch.tensor([[True, False, True, True], [False, True, False, False]])
    torch.testing.assert_close(learned(x, mask), plain(x, mask))   # weights 0: the mean

    weights = torch.randn(4, 3)
    with torch.no_grad():
        for m, f in enumerate(learned.fusion_weights):
            f.weight.copy_(weights[m])
    branch = [plain(x, torch.eye(4, dtype=torch.bool)[m]) for m in range(4)]   # each branch's logits alone
    got = learned(x, mask)
    for b in range(2):
        avail = mask[b].nonzero().squeeze(1)
        alpha = torch.softmax(weights[avail], dim=0)                       # (n_available, C), over available only
        want = sum(alpha[i].view(3, 1, 1) * branch[int(m)][b] for i, m in enumerate(avail))
        torch.testing.assert_close(got[b], want, rtol=1e-5, atol=1e-6)
    noisy = x.clone()
    noisy[0, 1] = torch.randn(16, 16) * 1e3
    noisy[1, [0, 2, 3]] = float("nan")
    torch.testing.assert_close(learned(noisy, mask), got)    # a missing branch still cannot reach the output
    owners = learned.modality_of_parameters()
    assert [owners[f"fusion_weights.{m}.weight"] for m in range(4)] == [0, 1, 2, 3]


def test_learned_fusion_scripts_with_the_mask_a_runtime_input():
    net = learned_net(dim=3).eval()
    with torch.no_grad():
        for f in net.fusion_weights:
            f.weight.normal_()
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(net), buffer)
    buffer.seek(0)
    exported = torch.jit.load(buffer)
    x = torch.randn(2, 4, 16, 16, 16)
    for mask in [torch.tensor([True, False, False, True]), torch.tensor([[True, True, True, True],
                                                                        [False, False, True, False]])]:
        torch.testing.assert_close(exported(x, mask), net(x, mask))
