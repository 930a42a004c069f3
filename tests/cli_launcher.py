"""Runs `fedtune` commands in processes forked from this one, which imported the CLI once.

The crash tests need a dozen coordinator processes; starting Python and importing torch,
transformers, peft, Prefect and MLflow costs 8-17 s each on 2 cores, which forking a process that
already did skips. A child runs `flows.cli.app` as the `fedtune` script does, so it is killed,
exits and leaves files as that script would.

Usage: `python -m tests.cli_launcher MLFLOW_DB`. It opens the MLflow store MLFLOW_DB (the migrated
store the runs' stores are copies of), so MLflow's store code is warm in every child. Then one JSON
request per stdin line, {"args": [...], "env": {...}, "log": path}; the child's stdout and stderr go
to `log`; the reply is a stdout line `exit <code>` (-9 when SIGKILLed). `ready` is printed first.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import traceback


def _child(request: dict) -> None:
    os.environ.update(request["env"])
    fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    from flows.cli import app

    try:
        app(request["args"], prog_name="fedtune")
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else int(done.code is not None)
    except BaseException:
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()  # as at the script's exit (Prefect drains its log and event workers here)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skips only the interpreter's teardown, which writes nothing and takes 3-6 s here


def main() -> None:
    import peft  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from mlflow import MlflowClient

    import flows.cli  # noqa: F401
    import flows.federated_finetune  # noqa: F401

    MlflowClient(f"sqlite:///{sys.argv[1]}").search_experiments()
    print("ready", flush=True)
    for line in sys.stdin:
        pid = os.fork()
        if pid == 0:
            _child(json.loads(line))
        _, status = os.waitpid(pid, 0)
        print(f"exit {os.waitstatus_to_exitcode(status)}", flush=True)


if __name__ == "__main__":
    main()
