"""`python -m fitdist.gpu_check [--device cuda|cpu] [--out DIR] [--sections 1,2,...]`.

Runs each chosen section in a child process with a time limit, prints one line per section,
`PASS|FAIL|SKIP section N name (S s): detail`, and writes `report.json` and `report.md` to DIR.
Exit status: 0 when every section that ran passed (SKIP lines do not count), 1 otherwise, 2 for
bad arguments (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from fitdist.gpu_check import SECTIONS
from fitdist.gpu_check.common import Context, kill_group, last_error_line, one_line

# Seconds a section may take before it is stopped and reported as FAIL: far above what each takes
# (the whole check is meant to fit in 9 minutes on one GPU, 2-3 minutes in CPU mode).
TIMEOUT = {1: 120, 2: 600, 3: 900, 4: 600, 5: 600, 6: 600}


class BadInput(Exception):
    """Bad arguments: one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise BadInput(message)


def parse(argv: list[str]) -> argparse.Namespace:
    p = _Parser(prog="gpu_check.sh", description="Check that fitdist works on this machine's GPU.")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cuda (default): the real check; cpu: every section with small shapes")
    p.add_argument("--out", default="gpu-check", help="report directory (default ./gpu-check)")
    p.add_argument("--sections", default=",".join(str(n) for n, _, _ in SECTIONS),
                   help="comma-separated section numbers to run (default: all)")
    a = p.parse_args(argv)
    known = {n for n, _, _ in SECTIONS}
    try:
        a.sections = sorted({int(s) for s in a.sections.split(",") if s.strip()})
    except ValueError:
        raise BadInput(f"--sections: {a.sections!r} is not a comma-separated list of numbers") from None
    unknown = [s for s in a.sections if s not in known]
    if unknown or not a.sections:
        raise BadInput(f"--sections: {','.join(map(str, unknown)) or 'none given'}: sections are 1-{max(known)}")
    out = Path(a.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write-test").write_text("")
        (out / ".write-test").unlink()
    except OSError as e:
        raise BadInput(f"--out: cannot write to {out} ({e.strerror or e})") from None
    a.out = out.resolve()
    return a


def run_section(ctx: Context, number: int, name: str) -> dict:
    """Runs one section's child; a crash or a timeout is that section's FAIL."""
    ctx.logs.mkdir(parents=True, exist_ok=True)
    result = Path(ctx.out) / "sections" / f"{number}-{name}.json"
    result.parent.mkdir(exist_ok=True)
    result.unlink(missing_ok=True)
    env = ctx.env()
    if number == 2 and not ctx.cuda:
        env["TRITON_INTERPRET"] = "1"  # Triton runs on CPU tensors only under its interpreter
    log = ctx.logs / f"section-{number}-{name}.log"
    cmd = [ctx.python, "-m", "fitdist.gpu_check.section", str(number), str(Path(ctx.out) / "context.json"),
           str(result)]
    t0, timed_out = time.perf_counter(), False
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ctx.work,
                                start_new_session=True)
        try:
            proc.wait(timeout=TIMEOUT[number])
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_group(proc)
    seconds = time.perf_counter() - t0
    if result.is_file():
        out = json.loads(result.read_text())
    elif timed_out:
        out = {"status": "FAIL", "detail": f"stopped after {TIMEOUT[number]} s (log: {log})", "checks": []}
    else:
        why = last_error_line(log.read_text(errors="replace"))
        out = {"status": "FAIL", "detail": f"exit {proc.returncode}: {why} (log: {log})", "checks": []}
    return {"number": number, "name": name, "seconds": round(seconds, 1), **out}


def line(r: dict) -> str:
    return f"{r['status']} section {r['number']} {r['name']} ({r['seconds']:.1f} s): {one_line(r['detail'], 600)}"


def write_reports(out: Path, meta: dict, results: list[dict]) -> None:
    (out / "report.json").write_text(json.dumps({**meta, "sections": results}, indent=1, default=str) + "\n")
    where = (f"- device: `{meta['device']}`; host: {meta['host']}; started {meta['started']}, "
             f"{meta['seconds']:.0f} s in all")
    md = [f"# fitdist GPU check: {meta['verdict']}", "", where, f"- command: `{meta['command']}`", "",
          "| section | status | seconds | detail |", "|---|---|---:|---|"]
    md += [f"| {r['number']} {r['name']} | {r['status']} | {r['seconds']:.1f} | {_cell(r['detail'])} |"
           for r in results]
    for r in results:
        md += ["", f"## {r['number']} {r['name']}: {r['status']}", ""]
        if r.get("checks"):
            md += ["| check | status | detail |", "|---|---|---|"]
            md += [f"| {c['name']} | {c['status']} | {_cell(c['detail'])} |" for c in r["checks"]]
        else:
            md.append(_cell(r["detail"]))
    (out / "report.md").write_text("\n".join(md) + "\n")


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse(argv)
    except BadInput as e:
        print(f"gpu_check: error: {e}", file=sys.stderr)
        return 2
    repo = Path(__file__).resolve().parents[2]
    ctx = Context(device=args.device, out=str(args.out), repo=str(repo))
    ctx.work.mkdir(exist_ok=True)
    ctx.save(args.out / "context.json")
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"fitdist GPU check: device {args.device}, report in {args.out}", flush=True)
    t0 = time.perf_counter()
    results = []
    no_device = None
    for number, name, _ in SECTIONS:
        if number not in args.sections:
            continue
        if no_device:
            r = {"number": number, "name": name, "seconds": 0.0, "status": "SKIP", "detail": no_device, "checks": []}
        else:
            r = run_section(ctx, number, name)
        if number == 1 and r.get("data", {}).get("device_ok") is False:
            no_device = f"no usable {args.device} device (section 1)"
        results.append(r)
        print(line(r), flush=True)
    ran = [r for r in results if r["status"] != "SKIP"]
    failed = [r for r in ran if r["status"] == "FAIL"]
    verdict = "FAIL" if failed else "PASS"
    meta = {"verdict": verdict, "device": args.device, "host": f"{platform.node()} ({os.cpu_count()} CPUs)",
            "started": started, "seconds": round(time.perf_counter() - t0, 1),
            "command": " ".join(["launch/gpu_check.sh", *argv])}
    write_reports(args.out, meta, results)
    print(f"{verdict}: {len(ran) - len(failed)} passed, {len(failed)} failed, {len(results) - len(ran)} skipped "
          f"in {meta['seconds']:.0f} s; {args.out / 'report.md'}", flush=True)
    return 1 if failed or not ran else 0


if __name__ == "__main__":
    raise SystemExit(main())
