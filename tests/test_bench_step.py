"""Smoke test of `fitdist bench step --small`: output structure, and FLOPs against a hand count."""

import json

import torch
from torch.utils.flop_counter import FlopCounterMode

from fitdist.bench import step as bench_step


def conv3x3(cin: int, cout: int, side: int) -> int:
    return 2 * cin * cout * 9 * side * side  # 2 FLOPs per multiply-add, bias not counted


def test_small_run_structure_and_hand_counted_flops(capsys):
    threads = torch.get_num_threads()
    assert bench_step.main(["--small", "--json", "--steps", "3", "--warmup", "1"]) == 0
    assert torch.get_num_threads() == threads  # the caller's thread count is restored
    res = json.loads(capsys.readouterr().out)

    assert set(res) == {"meta", "flops", "steps", "ensemble", "ratios", "memory_mib", "rss_mib"}
    assert list(res["steps"]) == list(bench_step.VARIANTS)
    for s in res["steps"].values():
        assert s["median_ms"] > 0 and s["over_student"] > 0
    assert res["steps"]["student"]["over_student"] == 1.0
    # Truncation changes the cost, not the loss: same weights and batch give the same hint loss.
    assert (
        abs(res["steps"]["stage1"]["first_loss"] - res["steps"]["stage1_full"]["first_loss"]) < 1e-5
    )

    # Hand count, batch 4 of 3x8x8, 10 classes; fitnet = conv3x3 (pad 1) layers, 2x2 pool after
    # layer 1, global average pool, linear classifier.
    b = res["meta"]["batch"]
    assert b == 4
    student_to_hint = conv3x3(3, 4, 8) + conv3x3(4, 8, 4)  # conv1 at 8x8, conv2 at 4x4 (hint)
    teacher_to_hint = conv3x3(3, 8, 8) + conv3x3(8, 16, 4)
    student = student_to_hint + conv3x3(8, 8, 4) + 2 * 8 * 10
    teacher = teacher_to_hint + conv3x3(16, 16, 4) + 2 * 16 * 10
    regressor = 2 * 8 * 16 * 4 * 4  # 1x1 conv 8 -> 16 channels at 4x4
    assert res["flops"] == {
        "student": b * student,
        "teacher": b * teacher,
        "student_to_hint": b * student_to_hint,
        "teacher_to_hint": b * teacher_to_hint,
        "regressor": b * regressor,
    }

    # KD with 1, 2, 3 teachers: each member a forward of the teacher's cost in the FLOP model; the
    # members have weights of their own, so the ensemble's first loss is not the lone teacher's
    for k, e in res["ensemble"].items():
        assert abs(e["r_FLOP"] - (3 * student + int(k) * teacher) / (3 * student)) < 1e-3
        assert e["over_student"] == res["steps"][e["variant"]]["over_student"] > 0
    assert [e["variant"] for e in res["ensemble"].values()] == ["kd", "kd_2t", "kd_3t"]
    losses = [res["steps"][v]["first_loss"] for v in ("kd", "kd_2t", "kd_3t")]
    assert len(set(losses)) == 3, losses

    # KD from the stored top-10 (all 10 classes, fp16) starts where online KD does, to fp16 rounding
    stored, online = res["steps"]["kd_stored"]["first_loss"], res["steps"]["kd"]["first_loss"]
    assert stored != online and abs(stored - online) < 5e-3 * online

    ra = res["ratios"]
    assert isinstance(ra["kd_stored_target_met"], bool)
    assert ra["kd_stored_over_student"] > 0  # paired per round: not the ratio of the two medians
    assert abs(ra["r_FLOP"] - (3 * student + teacher) / (3 * student)) < 1e-3
    assert abs(ra["r_KD"] - res["steps"]["hint_kd"]["over_student"]) < 1e-2
    assert isinstance(ra["r_KD_target_met"], bool) and isinstance(
        ra["teacher_memory_target_met"], bool
    )
    mem = res["memory_mib"]
    assert mem["teacher_weights"] > 0 and mem["teacher_working_set"] > 0
    assert mem["hint_kd_peak"] > mem["student_peak"] > 0
    assert res["rss_mib"]["student_peak_rss"] > 0 and res["rss_mib"]["hint_kd_peak_rss"] > 0


def test_flop_counter_matches_torchvision_resnet18():
    # The counter the benchmark uses, on a known figure: resnet18 at 224x224 is 1.814 GMACs
    # (torchvision's model card lists 1.81 "GFLOPS", which are multiply-adds).
    import torchvision

    model = torchvision.models.resnet18(num_classes=1000).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    assert abs(counter.get_total_flops() / 2 / 1e9 - 1.814) < 0.005
