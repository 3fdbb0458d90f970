"""The frozen teacher, the student with its regressors, and the loss terms of a micro-batch."""

import pytest
import torch
import torch.nn.functional as F

from fitdist.distiller import Distiller, FrozenTeacher, Student
from fitdist.losses import hint_loss, kd_loss
from fitdist.regressors import build_regressor
from fitdist.zoo import ZOO


def make_pair(impl="reference"):
    torch.manual_seed(0)
    teacher = FrozenTeacher(ZOO["fitnet"](10, 1, widths=[8, 16], pool_after=[1]), ["conv2"])
    backbone = ZOO["fitnet"](10, 1, widths=[4, 4, 4], pool_after=[1])
    student = Student(backbone, ["conv3"], [build_regressor((4, 14, 14), (16, 14, 14))], loss_impl=impl)
    x = torch.randn(2, 1, 28, 28)
    teacher.tap.probe(x)
    student.tap.probe(x)
    return teacher, student


def test_teacher_is_frozen_in_eval_and_gets_no_gradient():
    teacher, student = make_pair()
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    terms = Distiller(student, teacher, 3.0, "reference")(
        torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)), {"ce": 1.0, "kd": 2.0, "hint": 0.5})
    terms["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())  # BN stats untouched
    assert not any(k.startswith("teacher") for k in student.state_dict())


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_terms_equal_the_reference_losses(impl):
    teacher, student = make_pair(impl)
    x, y = torch.randn(6, 1, 28, 28), torch.randint(0, 10, (6,))
    w = {"ce": 0.7, "kd": 3.2, "hint": 1.5}
    terms = Distiller(student, teacher, 4.0, impl)(x, y, w)
    with torch.no_grad():
        t_logits, (t_hint,) = teacher.tap(x)
    s_logits, (s_feat,) = student.tap(x)
    ce = F.cross_entropy(s_logits, y)
    kd = kd_loss(s_logits, t_logits, 4.0)
    hint = hint_loss(student.regressors[0](s_feat), t_hint)
    torch.testing.assert_close(terms["ce"], ce)
    torch.testing.assert_close(terms["kd"], kd)
    torch.testing.assert_close(terms["hint"], hint)
    torch.testing.assert_close(terms["loss"], 0.7 * ce + 3.2 * kd + 1.5 * hint)


def test_hint_only_step_truncates_both_networks():
    teacher, student = make_pair()
    ran = []
    for name, m in [*teacher.model.named_children(), *student.backbone.named_children()]:
        m.register_forward_hook(lambda *a, n=name: ran.append(n))
    terms = Distiller(student, teacher, 3.0)(torch.randn(4, 1, 28, 28), torch.zeros(4, dtype=torch.long),
                                              {"ce": 0.0, "kd": 0.0, "hint": 1.0})
    assert set(terms) == {"hint", "loss"}
    # teacher conv1, student conv1, conv2; the tapped layers' own hooks stop the forward first
    assert ran == ["conv1", "conv1", "conv2"]


def test_kd_without_t2_scaling_weights_the_kl_as_fitnets_does():
    teacher, student = make_pair()
    x, y = torch.randn(6, 1, 28, 28), torch.randint(0, 10, (6,))
    w = {"ce": 1.0, "kd": 4.0, "hint": 0.0}
    hinton = Distiller(student, teacher, 3.0, "reference")(x, y, w)
    fitnets = Distiller(student, teacher, 3.0, "reference", kd_t2=False)(x, y, w)
    torch.testing.assert_close(fitnets["kd"], hinton["kd"])  # the logged term is kd_loss either way
    torch.testing.assert_close(fitnets["loss"], hinton["ce"] + 4.0 * hinton["kd"] / 9.0)
