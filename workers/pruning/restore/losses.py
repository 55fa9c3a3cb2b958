"""Restoration losses: the task's own loss mixed with distillation from the dense teacher.

loss = (1 - lambda) * task + lambda * KL(teacher || student), with the KL taken over the same rows the task
loss scores (next-token positions of a language model, the image-text similarity rows of CLIP).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # a label that takes no part in the loss (image placeholders, padding): as in transformers


@dataclass(frozen=True)
class Loss:
    total: torch.Tensor  # what is differentiated
    task: float  # cross-entropy (language models) or the contrastive loss (CLIP)
    distill: float  # KL(teacher || student); 0.0 when no teacher ran


def kl_teacher_student(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(p_teacher || p_student) = sum p_t (log p_t - log p_s); logits are [rows, classes]."""
    return F.kl_div(F.log_softmax(student.float(), dim=-1), F.log_softmax(teacher.float(), dim=-1),
                    log_target=True, reduction="batchmean")


def mix(task: torch.Tensor, distill_loss: torch.Tensor | None, distill: float) -> Loss:
    if distill_loss is None:  # lambda = 0: the teacher is not run at all
        return Loss(task, float(task.detach()), 0.0)
    total = (1.0 - distill) * task + distill * distill_loss
    return Loss(total, float(task.detach()), float(distill_loss.detach()))


def causal_lm_loss(student: torch.Tensor, teacher: torch.Tensor | None, labels: torch.Tensor,
                   distill: float) -> Loss:
    """Next-token cross-entropy over the positions whose next label is not IGNORE_INDEX, plus the KL there.

    Logits are [batch, seq, vocab] and labels [batch, seq]: position t is scored on labels[t + 1].
    """
    targets = labels[:, 1:]
    valid = targets != IGNORE_INDEX
    if not bool(valid.any()):
        raise ValueError("a training batch has no token to predict")
    rows = student[:, :-1][valid].float()
    task = F.cross_entropy(rows, targets[valid])
    kl = kl_teacher_student(rows, teacher[:, :-1][valid]) if teacher is not None else None
    return mix(task, kl, distill)


def contrastive_loss(student: torch.Tensor, teacher: torch.Tensor | None, distill: float) -> Loss:
    """CLIP's symmetric loss on logits_per_image [n, n] (image i belongs with text i), plus the KL of both the
    image-to-text rows and the text-to-image rows against the teacher's."""
    if student.shape[0] < 2:
        raise ValueError("a contrastive batch needs at least two image-text pairs")
    target = torch.arange(student.shape[0], device=student.device)
    logits = student.float()
    task = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    kl = None
    if teacher is not None:
        kl = (kl_teacher_student(logits, teacher) + kl_teacher_student(logits.T, teacher.T)) / 2
    return mix(task, kl, distill)
