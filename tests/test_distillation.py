"""The full-set-to-subset distillation loss: its gradient is p_student - p_teacher and the teacher gets none."""
import pytest
import torch

from nnunet_gmd.distillation import soft_target_loss


@pytest.mark.parametrize("regions", [True, False])
def test_gradient_is_the_student_minus_teacher_probability(regions):
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(2, 3, 4, 5, generator=gen, requires_grad=True)
    teacher = torch.randn(2, 3, 4, 5, generator=gen, requires_grad=True)
    soft_target_loss(student, teacher, regions=regions).backward()
    if regions:   # independent sigmoids, mean over every element
        want = (torch.sigmoid(student) - torch.sigmoid(teacher)) / student.numel()
    else:         # one softmax over channels, mean over voxels
        want = (torch.softmax(student, 1) - torch.softmax(teacher, 1)) / (student.numel() / student.shape[1])
    torch.testing.assert_close(student.grad, want.detach(), rtol=1e-5, atol=1e-9)
    assert teacher.grad is None   # the full set's own gradient is left alone


@pytest.mark.parametrize("regions", [True, False])
def test_the_loss_is_smallest_where_the_student_matches_the_teacher(regions):
    teacher = torch.randn(1, 3, 6, generator=torch.Generator().manual_seed(1))
    at_teacher = soft_target_loss(teacher.clone(), teacher, regions=regions)
    for shift in (-1.0, 0.3, 2.0):
        moved = teacher.clone()
        moved[:, 0] += shift
        assert soft_target_loss(moved, teacher, regions=regions) > at_teacher
    if not regions:
        assert float(at_teacher) == pytest.approx(0.0, abs=1e-6)   # KL of a distribution to itself


def test_mismatched_shapes_are_named():
    with pytest.raises(ValueError, match=r"\(1, 3, 4\) vs \(1, 2, 4\)"):
        soft_target_loss(torch.zeros(1, 3, 4), torch.zeros(1, 2, 4), regions=True)
