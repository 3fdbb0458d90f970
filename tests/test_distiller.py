"""The frozen teacher, the student with its regressors, and the loss terms of a micro-batch."""

import copy

import pytest
import torch
import torch.nn.functional as F

from fitdist.distiller import Distiller, FrozenTeacher, Student
from fitdist.losses import hint_loss, kd_loss
from fitdist.regressors import build_regressor
from fitdist.zoo import ZOO


def make_pair(impl="reference", guided="conv3"):
    """A hand-built teacher and student, as a library user makes them (no probe call)."""
    teacher = FrozenTeacher(ZOO["fitnet"](10, 1, widths=[8, 16], pool_after=[1]), ["conv2"])
    backbone = ZOO["fitnet"](10, 1, widths=[4, 4, 4, 4], pool_after=[1])
    student = Student(backbone, [guided], [build_regressor((4, 14, 14), (16, 14, 14))], loss_impl=impl)
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
    # teacher conv1, student conv1..conv3; the tapped layers' own hooks stop the forward first
    assert ran == ["conv1", "conv1", "conv2"]


def test_hint_step_leaves_the_layers_above_the_guided_one_bit_identical():
    """FitNets stage 1 must not touch the student above its guided layer: not its weights, not its
    BatchNorm running statistics (which a whole forward in train mode would update)."""
    torch.manual_seed(0)
    teacher, student = make_pair(guided="conv2")
    student.train()
    above = {k: v.clone() for k, v in student.backbone.state_dict().items() if k.startswith(("conv3", "conv4", "fc"))}
    below = {k: v.clone() for k, v in student.backbone.state_dict().items() if k.startswith("conv1.1.running")}
    terms = Distiller(student, teacher, 3.0, "fused")(torch.randn(8, 1, 28, 28), torch.zeros(8, dtype=torch.long),
                                                     {"hint": 1.0})
    terms["loss"].backward()
    after = student.backbone.state_dict()
    assert all(torch.equal(after[k], v) for k, v in above.items())
    assert not all(torch.equal(after[k], v) for k, v in below.items())  # the layers below did run in train mode
    grads = {n for n, p in student.named_parameters() if p.grad is not None}
    assert grads and not any(n.startswith(("backbone.conv3", "backbone.conv4", "backbone.fc")) for n in grads)


def test_a_hint_pair_without_a_regressor_is_an_error():
    backbone = ZOO["fitnet"](10, 1, widths=[4, 4], pool_after=[1])
    with pytest.raises(ValueError, match=r"2 guided layers .* 1 regressors"):
        Student(backbone, ["conv1", "conv2"], [build_regressor((4, 14, 14), (16, 14, 14))])
    _, student = make_pair()
    hint = torch.zeros(2, 16, 14, 14)
    with pytest.raises(ValueError, match=r"2 teacher hints for 1 hint pairs"):
        student(torch.randn(2, 1, 28, 28), [hint, hint], need_logits=False)


@pytest.mark.parametrize("impl", ["reference", "fused", "auto"])
@pytest.mark.parametrize("kd_t2", [True, False])
def test_logged_kd_is_the_term_lambda_multiplies(impl, kd_t2):
    torch.manual_seed(1)
    teacher, student = make_pair(impl)
    x, y = torch.randn(6, 1, 28, 28), torch.randint(0, 10, (6,))
    w = {"ce": 0.5, "kd": 4.0, "hint": 0.0}
    terms = Distiller(student, teacher, 3.0, impl, kd_t2=kd_t2)(x, y, w)
    with torch.no_grad():
        t_logits, _ = teacher.tap(x)
        s_logits, _ = student.tap(x)
    # closed form in float64: KL(p_t^T ‖ p_s^T) averaged over the batch, T² only with kd_t2
    log_pt = F.log_softmax(t_logits.double() / 3.0, dim=1)
    log_ps = F.log_softmax(s_logits.double() / 3.0, dim=1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(1).mean()
    expected_kd = kl * 9.0 if kd_t2 else kl
    ce = F.cross_entropy(s_logits.double(), y)
    torch.testing.assert_close(terms["kd"].double(), expected_kd, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(terms["ce"].double(), ce, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(terms["loss"].double(), 0.5 * ce + 4.0 * expected_kd, rtol=1e-5, atol=1e-7)


def test_fixed_terms_run_a_term_of_weight_zero_with_gradients_of_zero():
    """A stage with `hint: [0, 1]` computes the hint at weight 0 too: the same graph every step."""
    teacher, student = make_pair()
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    distiller = Distiller(student, teacher, 3.0, "fused", terms={"ce", "hint"})
    terms = distiller(x, y, {"ce": 1.0, "hint": 0.0})
    assert set(terms) == {"ce", "hint", "loss"} and terms["hint"] > 0
    terms["loss"].backward()
    reg = student.regressors[0].proj.weight
    assert reg.grad is not None and torch.count_nonzero(reg.grad) == 0
    torch.testing.assert_close(terms["loss"], terms["ce"])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_a_placed_teacher_is_cast_once_and_gives_the_per_call_autocast_outputs_bit_for_bit(precision, channels_last, seed):
    from fitdist.precision import DTYPES

    model = ZOO["fitnet"](10, 3, widths=[8, 16, 16], pool_after=[1], batch_norm=True)
    model.eval()
    for m in model.modules():  # non-trivial BN statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    reference = copy.deepcopy(model)
    teacher = FrozenTeacher(model, ["conv2"], precision, channels_last).place(torch.device("cpu"))
    dtype = DTYPES[precision]
    for m in teacher.model.modules():  # cast once: conv/linear in the autocast dtype, norms in fp32
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            assert m.weight.dtype == dtype and (m.bias is None or m.bias.dtype == dtype)
        if isinstance(m, torch.nn.BatchNorm2d):
            assert m.weight.dtype == m.running_var.dtype == torch.float32
        if isinstance(m, torch.nn.Conv2d) and channels_last:
            assert m.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 20, 20)
    logits, (feat,) = teacher(x)
    captured = []
    reference.conv2.register_forward_hook(lambda mod, inp, out: captured.append(out))
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):  # the per-call cast of every weight
        expected = reference(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
    assert logits.dtype == expected.dtype and torch.equal(logits, expected)
    assert torch.equal(feat, captured[0])
