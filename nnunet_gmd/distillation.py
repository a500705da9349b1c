"""Self-distillation from the full set to its subsets: the all-sequence prediction as a soft target.

A model trained on every subset with the ground truth alone learns each small subset from hard labels that it
often cannot see (enhancing tumour without T1ce). The full set's own prediction, detached, is a softer target
that says how sure the network is with every sequence present; pulling the subsets towards it is the
knowledge-distillation term of missing-modality segmenters such as KD-Net (Hu et al., MICCAI 2020) and ACN
(Wang et al., MICCAI 2021), here inside one network, so it costs one extra loss per subset and no teacher.

Torch only, so the nnU-Net trainers and any other integration share one definition.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def soft_target_loss(student: Tensor, teacher: Tensor, *, regions: bool) -> Tensor:
    """Mean per-voxel distillation loss of ``student`` logits towards detached ``teacher`` logits, ``(B, C, ...)``.

    ``regions``: each channel is an independent sigmoid (nnU-Net's region-based training, e.g. BraTS WT/TC/ET),
    so the loss is binary cross-entropy against the teacher's probabilities. Otherwise the channels are one
    softmax, and the loss is KL(teacher || student) summed over channels. Both have the gradient
    ``p_student - p_teacher`` per logit (over voxels and, for regions, channels), the same scale as a
    cross-entropy to hard labels, and both are minimal exactly where the student matches the teacher.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student and teacher logits differ in shape: {tuple(student.shape)} vs "
                         f"{tuple(teacher.shape)}")
    teacher = teacher.detach()
    if regions:
        return F.binary_cross_entropy_with_logits(student.float(), torch.sigmoid(teacher.float()))
    kl = F.kl_div(F.log_softmax(student.float(), dim=1), F.log_softmax(teacher.float(), dim=1),
                  reduction="none", log_target=True)
    return kl.sum(1).mean()
