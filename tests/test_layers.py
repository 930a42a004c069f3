"""The layer contracts in pyproject.toml hold: flows -> tasks -> fedtune, fedtune free of prefect
and mlflow, fedtune.core and fedtune.config free of torch and peft, fedtune's wings importing only
the wings below them, and no import cycle in fedtune."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's packages, whichever is installed
    done = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "5 kept, 0 broken" in done.stdout
