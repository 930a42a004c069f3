"""The one-command GPU benchmark runs end to end on a CPU (`--smoke`), so it works the first time a GPU is there."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _ag_news_like(directory: Path, rows: int) -> Path:
    """A CSV in AG News' layout (class 1-4, title, description), without a header."""
    folder = directory / "ag_news"
    folder.mkdir(parents=True)
    topics = ["election vote minister", "match goal season", "shares profit market", "software chip research"]
    with (folder / "ag_news_7600.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        for i in range(rows):
            label = i % 4
            writer.writerow([label + 1, f"Headline {i}", f"{topics[label]} story number {i}"])
    return directory


def test_gpu_benchmark_smoke_runs_every_part(tmp_path: Path, tiny_model_dir: Path) -> None:
    shared = _ag_news_like(tmp_path / "shared", 160)
    out = tmp_path / "out"
    command = [
        sys.executable, "benchmarks/gpu.py", "--smoke", "--shared", str(shared), "--out", str(out),
        "-s", f"model.name_or_path={tiny_model_dir}", "-s", "model.source=null", "-s", "model.dtype=float32",
        "-s", "peft.r=4",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "gpu.json").read_text())

    rows = results["throughput"]["result"]
    assert {r["loop"] for r in rows} == {"fedtune", "plain peft"}
    for row in rows:
        assert row["tokens_per_s"] > 0
        # model FLOP/s cannot exceed what the machine's matmuls deliver (MFU <= 1), but the limit
        # and the loop are timed at different moments of a shared 2-core machine (7.7 was seen
        # under load): a FLOPs count off by an order of magnitude still shows here
        assert 0 < row["mfu"] < 10, row

    round_ = results["round"]["result"]
    assert round_["clients"] == 3
    assert round_["overhead_ratio"] > 0 and round_["plain_seconds"] > 0

    methods = {r["method"]: r for r in results["compare"]["result"]}
    assert set(methods) == {"fedavg", "local-only", "centralized"}
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in methods.values())
    assert methods["fedavg"]["bytes_up_per_client_round"] > 0
    assert "| fedtune |" in (out / "gpu.md").read_text()
