"""Where the test suite's CPU time goes, by kind of process: what bounds `make test` on few cores.

    python benchmarks/suite_cpu.py [--workers 3] [pytest arguments ...]

Runs the suite as `make test` does (without coverage, which would add its own cost everywhere) with
a `sitecustomize` on PYTHONPATH that writes each Python process's own CPU seconds (user + system,
`resource.getrusage`) at exit. Prints wall time, the run's total CPU seconds (every descendant the
run waited for) and a table of CPU by process kind, each as a share of the total; the rest are
processes that did not log (not Python, killed, or started with an environment of their own: the
deployment's isolated parties). Total CPU / cores is the floor of the wall time on this machine.
Also: the CPU the whole machine was busy (/proc/stat), when the first test started and the last
ended (the rest is start-up and tear-down), the machine's idle CPU seconds in each 30 s (where
waiting, not computing, sets the wall time), and each costly test file's worker, span and CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# runs in every Python process the suite starts (PYTHONPATH): a file per process at exit, naming the
# test file that started it (pytest sets PYTEST_CURRENT_TEST while a test runs; children inherit it)
ACCOUNTING = """
import atexit, json, os, resource, sys
def _account():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    pytest = "xdist.remote" in sys.modules or "_pytest.main" in sys.modules
    test = os.environ.get("PYTEST_CURRENT_TEST", "").split("::")[0]
    with open(os.path.join({out!r}, f"{{os.getpid()}}.json"), "w") as f:
        json.dump({{"argv": sys.argv[:3], "pytest": pytest, "test": test, "cpu": usage.ru_utime + usage.ru_stime}}, f)
atexit.register(_account)
"""

# a pytest plugin (-p): each test file's own CPU in its worker (threads included) and wall span
PER_FILE = """
import json, os, resource, time
import pytest
_files = {{}}
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    usage, start = resource.getrusage(resource.RUSAGE_SELF), time.time()
    yield
    after = resource.getrusage(resource.RUSAGE_SELF)
    row = _files.setdefault(item.nodeid.split("::")[0], {{"cpu": 0.0, "start": start}})
    row["cpu"] += after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
    row["end"], row["worker"] = time.time(), os.environ.get("PYTEST_XDIST_WORKER", "main")
def pytest_sessionfinish(session):
    with open(os.path.join({out!r}, f"files-{{os.getpid()}}.json"), "w") as f:
        json.dump(_files, f)
"""

KINDS = (  # first match of argv wins
    ("prefect server start", "Prefect server (session and tests' own)"),
    ("uvicorn", "Prefect server (uvicorn)"),
    ("prefect/engine.py", "flow run process (worker or served deployment)"),
    ("mlflow server", "MLflow server"),
    ("bin/dvc", "DVC command"),
    ("fedtune", "fedtune CLI"),
    ("flows/cli.py", "fedtune CLI"),
    ("bin/prefect", "prefect CLI"),
)


def kind(process: dict[str, Any]) -> str:
    if process["pytest"]:
        return "pytest process (in-process tests)"
    command = " ".join(process["argv"])
    return next((name for key, name in KINDS if key in command), "other Python process")


def machine_busy() -> float:
    """CPU seconds the whole machine has spent busy since boot (/proc/stat: all but idle and iowait).
    It also counts what the run's own accounting cannot: processes it never waited for (daemons,
    processes re-parented to init) and anything else running on the machine."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def idle_timeline(process: subprocess.Popen[bytes], start: float, every: float = 30.0) -> list[float]:
    """The machine's idle CPU seconds in each `every` seconds until `process` exits: where the
    wall time is lost to waiting rather than spent computing."""
    cores, last = os.cpu_count() or 1, machine_busy()
    idle: list[float] = []
    while True:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=every - (time.monotonic() - start) % every)
        now = machine_busy()
        elapsed = (time.monotonic() - start) - len(idle) * every
        idle.append(max(elapsed * cores - (now - last), 0.0))
        last = now
        if process.poll() is not None:
            return idle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--files", type=int, default=20, help="the most costly test files to list")
    args, pytest_args = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch, "processes")
        out.mkdir()
        Path(scratch, "sitecustomize.py").write_text(ACCOUNTING.format(out=str(out)))
        Path(scratch, "suite_cpu_per_file.py").write_text(PER_FILE.format(out=str(out)))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [scratch, os.environ.get("PYTHONPATH")]))}
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", str(args.workers)]
        command += ["--dist", "loadfile", "--no-loadscope-reorder", "-p", "suite_cpu_per_file", *pytest_args]
        start, epoch, busy_before = time.monotonic(), time.time(), machine_busy()
        suite = subprocess.Popen(command, cwd=ROOT, env=env)
        idle = idle_timeline(suite, start)
        wall, busy = time.monotonic() - start, machine_busy() - busy_before
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        total = usage.ru_utime + usage.ru_stime
        by_kind: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
        files: dict[str, dict[str, Any]] = {}
        for path in out.glob("files-*.json"):
            files.update(json.loads(path.read_text()))
        started = min((row["start"] for row in files.values()), default=epoch)
        for path in out.glob("[0-9]*.json"):
            process = json.loads(path.read_text())
            row = by_kind[kind(process)]
            row[0] += 1
            row[1] += process["cpu"]
            if not process["pytest"] and process["test"] in files:
                files[process["test"]]["children"] = files[process["test"]].get("children", 0.0) + process["cpu"]
    logged = sum(cpu for _, cpu in by_kind.values())
    by_kind["not logged (not Python, killed, or own environment)"] = [0, max(total - logged, 0.0)]
    cores = os.cpu_count() or 1
    print(f"\npytest exit {suite.returncode}; wall {wall:.0f} s; CPU {total:.0f} s ({total / wall:.0%} of one core);")
    print(f"floor on {cores} cores at full use: {total / cores:.0f} s")
    print(f"the machine was busy {busy:.0f} CPU s in that time ({busy / wall / cores:.0%} of its {cores} cores)")
    ended = max((row["end"] for row in files.values()), default=epoch)
    print(f"tests ran from {started - epoch:.0f} s to {ended - epoch:.0f} s of the wall (outside: start-up, tear-down)")
    print("idle CPU s in each 30 s of the wall:", " ".join(f"{x:.0f}" for x in idle), "\n")
    print("| process kind | processes | CPU s | share |\n| --- | ---: | ---: | ---: |")
    for name, (count, cpu) in sorted(by_kind.items(), key=lambda item: -item[1][1]):
        print(f"| {name} | {count or '-'} | {cpu:.0f} | {cpu / total:.0%} |")
    print("\n| test file | worker | from s (wall) | to s | own CPU s | its Python children's CPU s |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    costly = sorted(files.items(), key=lambda item: -item[1]["cpu"] - item[1].get("children", 0.0))[: args.files]
    for name, row in sorted(costly, key=lambda item: (item[1]["worker"], item[1]["start"])):
        span = f"{row['start'] - epoch:.0f} | {row['end'] - epoch:.0f}"
        print(f"| {name} | {row['worker']} | {span} | {row['cpu']:.0f} | {row.get('children', 0.0):.0f} |")
    sys.exit(suite.returncode)


if __name__ == "__main__":
    main()
