"""The DS sentiment model: missing modalities are switched off, padding is ignored, subsets reach only their own
parameters (what GMD's merge rule relies on)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nnunet_gmd.gmd import gmd_backward
from nnunet_gmd.sentiment.evaluate import SUBSETS
from nnunet_gmd.sentiment.model import DSSentimentModel, EarlyFusionMLP, ModelConfig, SequenceBatch, build_model
from nnunet_gmd.subsets import subset_mask

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _model(backbone: str = "transformer") -> DSSentimentModel:
    torch.manual_seed(0)
    return DSSentimentModel(ModelConfig(feature_dims=(12, 5, 7), hidden=16, layers=2, heads=2, dropout=0.0,
                                        backbone=backbone)).eval()


def _batch(b: int = 6) -> SequenceBatch:
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(b, t, d, generator=g) for t, d in ((10, 12), (14, 5), (9, 7))]
    lengths = [torch.randint(1, 11, (b,), generator=g), torch.randint(0, 15, (b,), generator=g), None]
    return SequenceBatch(feats, lengths)


@pytest.mark.parametrize("backbone", ["transformer", "mlp"])
@torch.no_grad()
def test_missing_modalities_are_never_computed(backbone):
    model, batch = _model(backbone), _batch()
    text_only = model(batch, subset_mask((0,), 3))
    poisoned = SequenceBatch([batch.features[0], torch.full_like(batch.features[1], float("nan")),
                              torch.full_like(batch.features[2], float("inf"))], batch.lengths)
    torch.testing.assert_close(model(poisoned, subset_mask((0,), 3)), text_only, rtol=0, atol=0)
    assert torch.isfinite(text_only).all()
    assert not torch.allclose(model(batch, subset_mask((0, 1), 3)), text_only)  # audio does change the output


@torch.no_grad()
def test_per_sample_masks_match_per_subset_predictions():
    model, batch = _model(), _batch()
    per_subset = {s: model(batch, subset_mask(s, 3)) for s in SUBSETS}
    rows = [SUBSETS[i % len(SUBSETS)] for i in range(batch.batch_size)]
    mixed = model(batch, torch.stack([subset_mask(s, 3) for s in rows]))
    for i, s in enumerate(rows):
        torch.testing.assert_close(mixed[i], per_subset[s][i])
    pooled = model.forward_branches(batch)  # the training path gives the same fused predictions
    for s in SUBSETS:
        torch.testing.assert_close(model.predict_subset(pooled, s), per_subset[s])


@pytest.mark.parametrize("backbone", ["transformer", "mlp"])
@torch.no_grad()
def test_padding_beyond_lengths_is_ignored(backbone):
    model, batch = _model(backbone), _batch()
    before = model(batch)
    changed = [x.clone() for x in batch.features]
    for m in (0, 1):
        steps = changed[m].shape[1]
        pad = torch.arange(steps)[None, :] >= batch.lengths[m].clamp(1, steps)[:, None]
        changed[m][pad] = 100.0
    torch.testing.assert_close(model(SequenceBatch(changed, batch.lengths)), before)


def test_availability_mask_is_checked():
    model, batch = _model(), _batch(3)
    with pytest.raises(ValueError, match="all-missing"):
        model(batch, torch.tensor([[True, False, False], [False, False, False], [True, True, True]]))
    with pytest.raises(ValueError, match=r"shape \(3,\) or \(3, 3\)"):
        model(batch, torch.ones(2, 3, dtype=torch.bool))


@pytest.mark.parametrize("backbone", ["transformer", "mlp"])
def test_a_subset_loss_reaches_only_its_own_modalities_parameters(backbone):
    model, batch = _model(backbone), _batch()
    names = [n for n, _ in model.named_parameters()]
    owners = model.modality_of_parameters()
    assert {owners[n] for n in names} == {None, 0, 1, 2}
    pooled = model.forward_branches(batch)
    labels = torch.zeros(batch.batch_size)
    for subset in SUBSETS:
        loss = F.l1_loss(model.predict_subset(pooled, subset), labels)
        grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True, allow_unused=True)
        for name, g in zip(names, grads):
            owner = owners[name]
            assert (g is not None) == (owner is None or owner in subset), (subset, name)


def test_gmd_step_through_the_core_updates_only_reached_parameters():
    model, batch = _model(), _batch()
    model.train()
    labels = torch.linspace(-2, 2, batch.batch_size)
    pooled = model.forward_branches(batch)
    subsets = [(0,), (0, 2)]  # audio is in neither subset
    losses = [F.l1_loss(model.predict_subset(pooled, s), labels) for s in subsets]
    stats = gmd_backward(losses, list(model.parameters()), generator=torch.Generator().manual_seed(0))
    assert stats.cosine.shape == (2, 2)
    for name, p in model.named_parameters():
        owner = model.modality_of_parameters()[name]
        assert (p.grad is None) == (owner == 1), name


@torch.no_grad()
def test_early_fusion_zero_fills_missing_modalities_and_never_reads_them():
    torch.manual_seed(0)
    model = build_model(ModelConfig(feature_dims=(12, 5, 7), hidden=16, layers=2, fusion="early")).eval()
    assert isinstance(model, EarlyFusionMLP)
    batch = _batch()
    text_only = model(batch, subset_mask((0,), 3))
    poisoned = SequenceBatch([batch.features[0], torch.full_like(batch.features[1], float("nan")),
                              torch.full_like(batch.features[2], float("inf"))], batch.lengths)
    torch.testing.assert_close(model(poisoned, subset_mask((0,), 3)), text_only, rtol=0, atol=0)
    # zero-filled after standardization: a missing modality looks like its training mean
    at_mean = SequenceBatch([batch.features[0], torch.zeros_like(batch.features[1]),
                             torch.zeros_like(batch.features[2])], [batch.lengths[0], None, None])
    torch.testing.assert_close(model(at_mean), text_only)  # the encoders' mean is still 0 here
    assert not torch.allclose(model(batch), text_only)
