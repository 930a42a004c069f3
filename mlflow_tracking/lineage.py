"""What a run was made from: git commit and the DVC data version of its inputs."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import yaml


def git_commit(cwd: str | Path = ".") -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def dvc_data_version(lock_path: str | Path = "dvc.lock") -> str:
    """A digest of the data-stage outputs recorded in dvc.lock (the hashes DVC versions them by)."""
    path = Path(lock_path)
    if not path.exists():
        return "untracked"
    stages = (yaml.safe_load(path.read_text()) or {}).get("stages", {})
    digests = [
        f"{name}:{out.get('path')}:{out.get('md5') or out.get('hash')}"
        for name in ("prepare_data", "partition")
        for out in stages.get(name, {}).get("outs", [])
    ]
    if not digests:
        return "untracked"
    return hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()[:16]
