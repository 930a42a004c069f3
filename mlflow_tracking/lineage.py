"""What a run was made from: git commit and the DVC data versions of its inputs."""

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


def dvc_md5(path: str | Path) -> str:
    """The md5 DVC versions a file or folder by (a folder's ends in `.dir`): what `dvc add` or
    dvc.lock would record for it, computed with DVC's own hashing, so it names an object in a
    DVC cache whether or not the path is tracked."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem
    from dvc_objects.fs.memory import MemoryFileSystem

    staging = HashFileDB(MemoryFileSystem(), "/fedtune-staging")  # dry run: nothing is stored
    _, _, obj = build(staging, str(path), LocalFileSystem(), "md5", dry_run=True)
    return str(obj.hash_info.value)
