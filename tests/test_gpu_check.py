"""`launch/gpu_check.sh`: its CPU mode runs every section end to end (so the script is known to
work the day a GPU is at hand), its printed lines and its two reports agree, a failing section is
a FAIL line and a nonzero exit, and bad arguments are one line with exit status 2."""

import json
import os
import re
import subprocess
from pathlib import Path

from fitdist.gpu_check import SECTIONS
from fitdist.gpu_check.common import Checks

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "gpu_check.sh"
LINE = re.compile(r"^(PASS|FAIL|SKIP) section (\d+) (\S+) \((\d+\.\d) s\): (.*)$")


def gpu_check(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=900,
                          env={**os.environ, **env}, check=False)


def section_lines(stdout: str) -> list[tuple[str, int, str, float, str]]:
    return [(m[1], int(m[2]), m[3], float(m[4]), m[5]) for m in map(LINE.match, stdout.splitlines()) if m]


def test_cpu_mode_runs_every_section_and_reports_agree(tmp_path):
    out = tmp_path / "report"
    proc = gpu_check("--device", "cpu", "--out", str(out))
    lines = section_lines(proc.stdout)
    assert [(n, name) for _, n, name, _, _ in lines] == [(n, name) for n, name, _ in SECTIONS], proc.stdout
    failed = [ln for ln in proc.stdout.splitlines() if ln.startswith("FAIL")]
    assert proc.returncode == 0 and not failed, "\n".join(failed) or proc.stdout + proc.stderr[-3000:]
    assert all(status in ("PASS", "SKIP") for status, *_ in lines)
    # what CPU mode cannot do is a SKIP check inside its section, saying why
    assert "ddp nccl skipped (CPU: no NCCL" in lines[4][4]
    assert "sync-debug mode skipped (CUDA only" in lines[5][4]

    report = json.loads((out / "report.json").read_text())
    assert report["verdict"] == "PASS" and report["device"] == "cpu"
    assert [(s["status"], s["number"], s["name"], s["seconds"]) for s in report["sections"]] == [
        (status, n, name, seconds) for status, n, name, seconds, _ in lines]
    for s, (*_, detail) in zip(report["sections"], lines):
        assert detail.startswith(s["detail"][:200])
        assert s["checks"] and all(c["status"] in ("PASS", "SKIP") for c in s["checks"])
    md = (out / "report.md").read_text()
    assert md.startswith("# fitdist GPU check: PASS")
    for status, n, name, seconds, _ in lines:
        assert f"| {n} {name} | {status} | {seconds:.1f} |" in md
        assert f"## {n} {name}: {status}" in md


def test_a_failing_section_is_a_fail_line_and_a_nonzero_exit(tmp_path):
    """--device cuda where no CUDA device is visible: section 1 fails, later ones are skipped."""
    out = tmp_path / "report"
    proc = gpu_check("--device", "cuda", "--out", str(out), "--sections", "1,2", CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = section_lines(proc.stdout)
    assert [(status, n) for status, n, *_ in lines] == [("FAIL", 1), ("SKIP", 2)], proc.stdout
    assert "torch.cuda.is_available() is False" in lines[0][4]
    assert "no usable cuda device (section 1)" in lines[1][4]
    report = json.loads((out / "report.json").read_text())
    assert report["verdict"] == "FAIL"
    assert [s["status"] for s in report["sections"]] == ["FAIL", "SKIP"]
    assert (out / "report.md").read_text().startswith("# fitdist GPU check: FAIL")


def test_bad_arguments_are_one_line_and_exit_2(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for args, words in ((["--sections", "9"], "sections are 1-6"), (["--sections", "x"], "--sections"),
                        (["--out", str(blocker / "report")], "--out: cannot write"),
                        (["--device", "tpu"], "--device")):
        proc = gpu_check(*args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1, (args, proc.stderr)
        assert words in proc.stderr, (args, proc.stderr)


def test_a_section_passes_with_skips_fails_on_any_failure_and_skips_when_nothing_ran():
    checks = Checks()
    checks.skip("nccl", "CPU")
    assert checks.status() == "SKIP"
    checks.ok("gloo", "fine")
    assert checks.status() == "PASS"
    checks.run("boom", lambda: 1 / 0)
    assert checks.status() == "FAIL"
    assert checks.summary().startswith("boom FAIL (ZeroDivisionError: division by zero)")
