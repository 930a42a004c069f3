"""Run a generated program and its tests apart from the evaluating process (HumanEval's pass@1).

Written here because the harness's `code_eval` metric is fetched from the Hugging Face hub at run
time and executes the code in threads of the evaluating process, next to the model and the
user's credentials. This keeps a model's program in a child process with an empty environment, a
fresh temporary folder as its working directory, Python's isolated mode, CPU-time, memory, file-size
and wall-clock limits, and its own process group (killed whole at the limit). It is not a security
boundary against code written to escape: evaluate untrusted models inside a container as well.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import secrets
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

MEMORY_BYTES = 1 << 30  # address space: enough for the test's imports, not for a runaway allocation
FILE_BYTES = 1 << 20


def _limits(cpu_s: int) -> None:  # in the child, before it runs the program
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES))
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_BYTES, FILE_BYTES))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def passes(program: str, timeout_s: float = 10.0) -> bool:
    """Whether `program` (a completion followed by its tests) runs to its end within `timeout_s`
    seconds of wall clock: it exits 0 after printing a random line appended after the tests, so a
    completion that exits early (`os._exit(0)`) does not pass. A crash, a failed assertion, a limit
    reached or a hang all count as a failure."""
    finished = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="fedtune-sandbox-") as work:
        script = Path(work) / "program.py"
        script.write_text(f"{program}\nprint({finished!r})\n", encoding="utf-8")
        output = Path(work) / "stdout"
        with output.open("wb") as stdout:  # a file, so the file-size limit bounds what it prints
            child = subprocess.Popen(
                [sys.executable, "-I", "-B", str(script)],
                cwd=work,
                env={"PATH": os.defpath},
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=lambda: _limits(max(1, math.ceil(timeout_s))),
            )
            try:
                code = child.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                code = None
            finally:
                with contextlib.suppress(ProcessLookupError):  # the group may be gone already
                    os.killpg(child.pid, signal.SIGKILL)  # the program's own children too
                child.wait()
        lines = output.read_text(errors="replace").splitlines()
        return code == 0 and lines[-1:] == [finished]
