"""Where the suite's CPU goes: runs the suite as `make test` does and samples every process from /proc (Linux).

    .venv/bin/python benchmarks/profile_suite.py [--workers 2] [--top 25] [-- PYTEST_ARGS...]

Each process's CPU time (utime + stime, read once a second) is charged to the test that its pytest-xdist worker
was running when it was spent: Ray's processes, the role actors, engine cores and subprocess drivers are found
under a worker through their parent processes (a raylet is its driver's child, an actor its raylet's). It prints
the suite's wall time and CPU, the CPU by kind of process (role actors, Ray's own processes, drivers), the test files
that cost the most CPU with their kinds, and how many role processes were started. The suite is CPU-bound on two
cores (CONTRIBUTING.md): a file's CPU, not its wall time (which includes the other worker's load), is what a cut saves.
Processes that live less than a second are missed; the sampler itself costs ~0.3% of a core.

This module is also the pytest plugin that records when each test starts and ends (``-p profile_suite``).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("RolloutWorker", "TeacherWorker", "LearnerWorker", "EnvActor", "EngineCore", "VLLM::Worker", "vllm serve",
         "mopd_ray.main", "mopd_ray.demo", "pytest-xdist", "raylet", "gcs_server", "log_monitor", "DashboardAgent",
         "RuntimeEnvAgent", "dashboard", "ray::IDLE", "default_worker")
ROLES = ("RolloutWorker", "TeacherWorker", "LearnerWorker", "EnvActor", "EngineCore", "VLLM::Worker")


# ---- the plugin (runs inside pytest and its xdist workers) ----------------------------------------------------

def _log(kind: str, nodeid: str) -> None:
    out = os.environ.get("MOPD_PROFILE_TIMING")
    if out:
        with open(out, "a") as f:
            f.write(f"{time.time():.2f}\t{os.environ.get('PYTEST_XDIST_WORKER', 'main')}\t{os.getpid()}\t"
                    f"{kind}\t{nodeid}\n")


def pytest_runtest_logstart(nodeid, location):
    _log("start", nodeid)


def pytest_runtest_logfinish(nodeid, location):
    _log("end", nodeid)


# ---- the sampler and the report ----------------------------------------------------------------------------------

def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return ""


class Sampler(threading.Thread):
    """Per process (pid and start time): its parent, cmdlines seen and (time, CPU ticks) whenever the ticks moved."""

    def __init__(self, period_s: float = 1.0):
        super().__init__(daemon=True)
        self.period_s, self.procs, self.stop = period_s, {}, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            now = time.time()
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        stat = f.read()
                except OSError:
                    continue
                fields = stat[stat.rfind(")") + 2:].split()
                ticks = int(fields[11]) + int(fields[12])
                p = self.procs.get((pid, fields[19]))
                if p is None:
                    self.procs[(pid, fields[19])] = {"pid": int(pid), "ppid": int(fields[1]), "cmd": [_cmdline(pid)],
                                                     "ts": [(now, ticks)]}
                elif ticks != p["ts"][-1][1]:
                    p["ts"].append((now, ticks))
                    n = len(p["ts"])  # Ray actors retitle themselves after start: look again now and then
                    if len(p["cmd"]) < 4 and n & (n - 1) == 0:
                        cmd = _cmdline(pid)
                        if cmd and cmd != p["cmd"][-1]:
                            p["cmd"].append(cmd)
            self.stop.wait(self.period_s)


def kind_of(cmds: list) -> str:
    """The newest cmdline's kind (an actor's title replaces default_worker.py's command line)."""
    for cmd in reversed(cmds):
        kind = next((k for k in KINDS if k in cmd), None)
        if kind == "default_worker" and cmd is not cmds[-1]:
            continue
        if kind:
            return kind
        if cmd.startswith("ray::"):
            return "other Ray actor"
    return "other"


def report(procs: dict, timing: list, top: int, hz: float) -> dict:
    """CPU seconds by kind, by test file (with kinds) and role processes started, charged as the module says."""
    spans = collections.defaultdict(list)  # xdist worker pid -> [(start, end, nodeid)]
    opened = {}
    for t, _, pid, what, nodeid in timing:
        if what == "start":
            opened[(pid, nodeid)] = t
        elif (pid, nodeid) in opened:
            spans[pid].append((opened.pop((pid, nodeid)), t, nodeid))
    by_pid = {p["pid"]: p for p in procs.values()}

    def worker_of(p):
        for _ in range(12):
            if p["pid"] in spans:
                return p["pid"]
            p = by_pid.get(p["ppid"])
            if p is None:
                return None
        return None

    def test_at(worker, t):
        return next((n for a, b, n in spans[worker] if a - 0.5 <= t <= b + 0.5), "(between tests)")

    by_kind, by_file = collections.Counter(), collections.defaultdict(collections.Counter)
    started = collections.Counter()
    for p in procs.values():
        worker, kind = worker_of(p), kind_of(p["cmd"])
        if worker is None:
            continue
        if kind in ROLES and len(p["ts"]) > 1:
            started[kind] += 1
        for (_, c0), (t1, c1) in zip(p["ts"], p["ts"][1:]):
            cpu = (c1 - c0) / hz
            by_kind[kind] += cpu
            by_file[test_at(worker, t1).split("::")[0]][kind] += cpu
    files = sorted(by_file.items(), key=lambda kv: -sum(kv[1].values()))
    return {"cpu_s": round(sum(by_kind.values()), 1), "by_kind": {k: round(v, 1) for k, v in by_kind.most_common()},
            "started": dict(started),
            "files": [(f, round(sum(c.values()), 1), {k: round(v, 1) for k, v in c.most_common() if v >= 0.5})
                      for f, c in files[:top]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("pytest_args", nargs="*")
    args = ap.parse_args()
    timing_file = Path(tempfile.mkdtemp(prefix="mopd_profile_")) / "timing.tsv"
    env = {**os.environ, "MOPD_PROFILE_TIMING": str(timing_file),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "benchmarks"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    sampler = Sampler()
    sampler.start()
    t0 = time.time()
    rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-n", str(args.workers), "--dist", "loadfile",
                          "--no-loadscope-reorder", "-p", "profile_suite", "-p", "no:cacheprovider", *args.pytest_args],
                         cwd=ROOT, env=env)
    wall = time.time() - t0
    sampler.stop.set()
    sampler.join()
    timing = []
    for line in timing_file.read_text().splitlines() if timing_file.exists() else []:
        t, worker, pid, what, nodeid = line.split("\t")
        timing.append((float(t), worker, int(pid), what, nodeid))
    out = {"wall_s": round(wall, 1), "exit_code": rc,
           **report(sampler.procs, timing, args.top, os.sysconf(os.sysconf_names["SC_CLK_TCK"]))}
    print(f"\nsuite: {out['wall_s']} s wall, {out['cpu_s']} s of CPU charged to its tests "
          f"({out['cpu_s'] / max(out['wall_s'], 1):.2f} cores on average), pytest exit code {rc}")
    print("CPU by kind of process: " + ", ".join(f"{k} {v}" for k, v in out["by_kind"].items()))
    print("role processes started: " + ", ".join(f"{k} {v}" for k, v in sorted(out["started"].items())))
    print(f"the {args.top} test files that cost the most CPU (s):")
    for f, cpu, kinds in out["files"]:
        print(f"  {cpu:7.1f}  {f}: " + ", ".join(f"{k} {v}" for k, v in kinds.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    sys.exit(rc)


if __name__ == "__main__":
    main()
