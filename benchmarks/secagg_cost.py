"""Secure aggregation cost: client and server compute and bytes per client, against plain upload.

Runs the real protocol objects (X25519, AES-GCM shares, AES-CTR masks, Shamir over GF(2^521-1))
for N clients on vectors of `--length` coordinates (default 460,800: LoRA r=8 on q/v of
SmolLM2-135M), with 10% of the clients dropping after sharing keys, so the server also
recovers their pairwise masks. Complete graph for N <= 10, SecAgg+ neighbourhoods above.

    python benchmarks/secagg_cost.py [--clients 10 50 100] [--length 460800] [--flower .venv-flower/bin/python]

With `--flower`, the same round (same N, length, neighbourhood size, threshold and dropouts) also
runs through Flower's own SecAgg+ in that interpreter's environment (`flower_secaggplus.py`), and
the table gains its columns. Prints a markdown table; writes benchmarks/results/secagg_cost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import save_results

from fedtune.privacy.secagg.protocol import SecAggClient, SecAggParams, SecAggServer
from fedtune.privacy.secagg.quantize import FixedPoint
from fedtune.privacy.secagg.wire import packed_size

POINT = FixedPoint(clip=1.0, level_bits=24, modulus_bits=62)  # secagg's default quantization


def measure(n: int, length: int, neighbours: int | None, examples: int) -> dict[str, Any]:
    """One round of `n` clients of `examples` examples each, in the modulus secure_aggregate gives it."""
    bits = POINT.bits_for(n * examples)
    params = SecAggParams(threshold=max(2, (neighbours or n) // 2 + 1), modulus_bits=bits, neighbours=neighbours)
    params.check(n)
    rng = np.random.default_rng(0)
    largest = examples * (POINT.levels - 1)  # an encoded coordinate: weight x quantization level
    inputs = {c: rng.integers(0, largest + 1, size=length, dtype=np.uint64) for c in range(n)}
    dropped = set(range(0, n, 10)) if n >= 10 else set()
    clients = {c: SecAggClient(c, params, 1) for c in range(n)}
    server = SecAggServer(params, 1, length)
    client_seconds, server_seconds, sent = 0.0, 0.0, 0

    def timed(fn: Any) -> Any:
        nonlocal client_seconds
        start = time.perf_counter()
        out = fn()
        client_seconds += time.perf_counter() - start
        return out

    start = time.perf_counter()
    adverts = [timed(clients[c].advertise) for c in clients]
    server_seconds += time.perf_counter() - start
    start = time.perf_counter()
    roster = server.collect_keys(adverts)
    server_seconds += time.perf_counter() - start
    shares = [timed(lambda c=c: clients[c].share_keys(roster)) for c in clients]
    sent += 64 * n + sum(len(ct) for m in shares for ct in m.ciphertexts.values())
    start = time.perf_counter()
    deliveries = server.route_shares(shares)
    server_seconds += time.perf_counter() - start
    alive = [c for c in clients if c not in dropped]
    masked = [timed(lambda c=c: clients[c].masked_input(deliveries[c], inputs[c])) for c in alive]
    sent += sum(packed_size(m.vector.shape[0], m.bits) for m in masked)  # as `wire` sends them
    start = time.perf_counter()
    request = server.collect_masked(masked)
    server_seconds += time.perf_counter() - start
    responses = [timed(lambda c=c: clients[c].unmask(request)) for c in alive]
    sent += sum(len(json.dumps([r.seed_shares, r.key_shares], default=str)) for r in responses)
    start = time.perf_counter()
    total = server.unmask(request, responses)
    server_seconds += time.perf_counter() - start
    expected = np.zeros(length, dtype=np.uint64)
    for c in alive:
        expected = (expected + inputs[c]) & params.modulus_mask
    assert np.array_equal(total, expected), "the sum is wrong"
    return {
        "clients": n,
        "length": length,
        "neighbours": neighbours or n - 1,
        "examples_per_client": examples,
        "modulus_bits": bits,
        "dropped": len(dropped),
        "client_ms_mean": 1000 * client_seconds / n,
        "server_ms": 1000 * server_seconds,
        "bytes_per_client": sent / n,
        "plain_float32_bytes": 4 * length,
    }


def flower(python: str, row: dict[str, Any], threshold: int) -> dict[str, Any]:
    """The same round through Flower's SecAgg+ (num_shares counts the client itself)."""
    command = [python, str(Path(__file__).with_name("flower_secaggplus.py"))]
    command += ["--clients", str(row["clients"]), "--length", str(row["length"])]
    command += ["--shares", str(row["neighbours"] + 1), "--threshold", str(threshold)]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    measured = json.loads(out.strip().splitlines()[-1])
    assert measured["dropped"] == row["dropped"], "both sides must drop the same clients"
    return {f"flower_{key}": value for key, value in measured.items() if key not in ("clients", "length", "dropped")}


def main() -> None:
    parser = argparse.ArgumentParser(description="secure aggregation cost")
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--length", type=int, nargs="+", default=[460_800])
    parser.add_argument("--neighbours", type=int, default=10, help="SecAgg+ k for more than 10 clients")
    parser.add_argument("--examples", type=int, default=500, help="each client's example count (its weight)")
    parser.add_argument("--flower", help="a Python with flwr installed: compare with Flower's SecAgg+")
    args = parser.parse_args()
    rows = []
    for length in args.length:
        for n in args.clients:
            neighbours = None if n <= 10 else args.neighbours
            row = measure(n, length, neighbours, args.examples)
            if args.flower:
                row |= flower(args.flower, row, threshold=max(2, (neighbours or n) // 2 + 1))
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    save_results("secagg_cost", rows)
    header = "| clients | coordinates | neighbours | dropped | modulus bits | client ms | server ms | bytes / client "
    header += "| x plain |"
    rule = "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    if args.flower:
        header += " Flower client ms | Flower server ms | Flower bytes / client |"
        rule += " --- | --- | --- |"
    print(header)
    print(rule)
    for r in rows:
        ratio = r["bytes_per_client"] / r["plain_float32_bytes"]
        line = (
            f"| {r['clients']} | {r['length']:,} | {r['neighbours']} | {r['dropped']} | {r['modulus_bits']} "
            f"| {r['client_ms_mean']:.0f} "
            f"| {r['server_ms']:.0f} | {r['bytes_per_client']:,.0f} | {ratio:.2f} |"
        )
        if args.flower:
            line += (
                f" {r['flower_client_ms_mean']:.0f} | {r['flower_server_ms']:.0f} "
                f"| {r['flower_bytes_per_client']:,.0f} |"
            )
        print(line)


if __name__ == "__main__":
    main()
