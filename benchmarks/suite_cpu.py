"""Where the test suite's CPU time goes, by kind of process: what bounds `make test` on few cores.

    python benchmarks/suite_cpu.py [--workers 3] [pytest arguments ...]

Runs the suite as `make test` does (without coverage, which would add its own cost everywhere) with
a `sitecustomize` on PYTHONPATH that writes each Python process's own CPU seconds (user + system,
`resource.getrusage`) at exit. Prints wall time, the run's total CPU seconds (every descendant the
run waited for) and a table of CPU by process kind, each as a share of the total; the rest are
processes that did not log (not Python, killed, or started with an environment of their own: the
deployment's isolated parties). Total CPU / cores is the floor of the wall time on this machine.
"""

from __future__ import annotations

import argparse
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

# runs in every Python process the suite starts (PYTHONPATH): a file per process at exit
ACCOUNTING = """
import atexit, json, os, resource, sys
def _account():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    pytest = "xdist.remote" in sys.modules or "_pytest.main" in sys.modules
    with open(os.path.join({out!r}, f"{{os.getpid()}}.json"), "w") as f:
        json.dump({{"argv": sys.argv[:3], "pytest": pytest, "cpu": usage.ru_utime + usage.ru_stime}}, f)
atexit.register(_account)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=3)
    args, pytest_args = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch, "processes")
        out.mkdir()
        Path(scratch, "sitecustomize.py").write_text(ACCOUNTING.format(out=str(out)))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [scratch, os.environ.get("PYTHONPATH")]))}
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", str(args.workers)]
        command += ["--dist", "loadfile", "--no-loadscope-reorder", *pytest_args]
        start = time.monotonic()
        done = subprocess.run(command, cwd=ROOT, env=env)
        wall = time.monotonic() - start
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        total = usage.ru_utime + usage.ru_stime
        by_kind: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
        for path in out.glob("*.json"):
            process = json.loads(path.read_text())
            row = by_kind[kind(process)]
            row[0] += 1
            row[1] += process["cpu"]
    logged = sum(cpu for _, cpu in by_kind.values())
    by_kind["not logged (not Python, killed, or own environment)"] = [0, max(total - logged, 0.0)]
    cores = os.cpu_count() or 1
    print(f"\npytest exit {done.returncode}; wall {wall:.0f} s; CPU {total:.0f} s ({total / wall:.0%} of one core);")
    print(f"floor on {cores} cores at full use: {total / cores:.0f} s\n")
    print("| process kind | processes | CPU s | share |\n| --- | ---: | ---: | ---: |")
    for name, (count, cpu) in sorted(by_kind.items(), key=lambda item: -item[1][1]):
        print(f"| {name} | {count or '-'} | {cpu:.0f} | {cpu / total:.0%} |")
    sys.exit(done.returncode)


if __name__ == "__main__":
    main()
