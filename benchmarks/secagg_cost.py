"""Secure aggregation cost: client and server compute and bytes per client, against plain upload.

Runs the real protocol objects (X25519, AES-GCM shares, AES-CTR masks, Shamir over GF(2^521-1))
for N clients on vectors of `--length` coordinates (default 460,800: LoRA r=8 on q/v of
SmolLM2-135M), with 10% of the clients dropping after sharing keys, so the server also
recovers their pairwise masks. Complete graph for N <= 10, SecAgg+ neighbourhoods above.

    python benchmarks/secagg_cost.py [--clients 10 50 100 1000] [--length 460800] [--flower .venv-flower/bin/python]

With `--flower`, the same round (same N, length, neighbourhood size, threshold and dropouts) also
runs through Flower's own SecAgg+ in that interpreter's environment (`flower_secaggplus.py`), and
the table gains its columns. Every configuration runs in a fresh process of its own; "round MB" is
what the round added to that process's peak resident memory (server and clients of the
one-process simulation together; neither side holds the N inputs, which each client makes on
demand), so a server that keeps every masked input shows it and a running sum does not; Flower's process gets
at most `--flower-memory-gb` of data memory and `--flower-timeout-s` seconds, and its row says
which limit it reached. Prints a
markdown table; writes benchmarks/results/secagg_cost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import save_results
from peak_memory import peak_mb, reset_peak

from fedtune.privacy.secagg.protocol import SecAggClient, SecAggParams, SecAggServer
from fedtune.privacy.secagg.quantize import FixedPoint
from fedtune.privacy.secagg.wire import packed_size

POINT = FixedPoint(clip=1.0, level_bits=24, modulus_bits=62)  # secagg's default quantization


def _input(client: int, length: int, largest: int) -> np.ndarray:
    """Client `client`'s encoded vector, made again on demand: the benchmark holds no N inputs."""
    return np.random.default_rng(client).integers(0, largest + 1, size=length, dtype=np.uint64)


def measure(n: int, length: int, neighbours: int | None, examples: int) -> dict[str, Any]:
    """One round of `n` clients of `examples` examples each, in the modulus secure_aggregate gives it.
    Masked inputs reach the server one at a time (its running sum), as `simulation` sends them."""
    before_mb = reset_peak()
    bits = POINT.bits_for(n * examples)
    params = SecAggParams(threshold=max(2, (neighbours or n) // 2 + 1), modulus_bits=bits, neighbours=neighbours)
    params.check(n)
    largest = examples * (POINT.levels - 1)  # an encoded coordinate: weight x quantization level
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

    adverts = [timed(clients[c].advertise) for c in clients]
    start = time.perf_counter()
    roster = server.collect_keys(adverts)
    server_seconds += time.perf_counter() - start
    shares = [timed(lambda c=c: clients[c].share_keys(roster)) for c in clients]
    sent += 64 * n + sum(len(ct) for m in shares for ct in m.ciphertexts.values())
    start = time.perf_counter()
    deliveries = server.route_shares(shares)
    server_seconds += time.perf_counter() - start
    alive = [c for c in clients if c not in dropped]
    expected = np.zeros(length, dtype=np.uint64)

    outside = 0.0  # the clients' and the benchmark's own work inside the server's loop below

    def masked() -> Any:
        nonlocal sent, expected, client_seconds, outside
        for c in alive:
            made = time.perf_counter()
            vector = _input(c, length, largest)
            expected += vector
            begun = time.perf_counter()
            message = clients[c].masked_input(deliveries[c], vector)
            done = time.perf_counter()
            client_seconds += done - begun
            outside += done - made
            sent += packed_size(message.vector.shape[0], message.bits)  # as `wire` sends it
            yield message

    start = time.perf_counter()
    request = server.collect_masked(masked())
    server_seconds += time.perf_counter() - start - outside
    responses = [timed(lambda c=c: clients[c].unmask(request)) for c in alive]
    sent += sum(len(json.dumps([r.seed_shares, r.key_shares], default=str)) for r in responses)
    start = time.perf_counter()
    total = server.unmask(request, responses)
    server_seconds += time.perf_counter() - start
    assert np.array_equal(total, expected & params.modulus_mask), "the sum is wrong"
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
        "peak_rss_mb": peak_mb(),
        "round_mb": peak_mb() - before_mb,  # the round's peak above the process's memory before it
    }


def flower(python: str, row: dict[str, Any], threshold: int, memory_gb: float, timeout_s: float) -> dict[str, Any]:
    """The same round through Flower's SecAgg+ (num_shares counts the client itself)."""
    command = [python, str(Path(__file__).with_name("flower_secaggplus.py"))]
    command += ["--clients", str(row["clients"]), "--length", str(row["length"])]
    command += ["--shares", str(row["neighbours"] + 1), "--threshold", str(threshold)]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    cap = int(memory_gb * 2**30)

    def limit() -> None:  # RLIMIT_DATA covers the heap and anonymous maps: a MemoryError, not the OOM killer
        resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))

    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, preexec_fn=limit, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"flower_unfinished": f"not done in {timeout_s:g} s"}
    if done.returncode and "MemoryError" in done.stderr:
        return {"flower_unfinished": f"out of memory ({memory_gb:g} GB)"}
    if done.returncode:
        raise RuntimeError(f"Flower's SecAgg+ failed:\n{done.stderr[-3000:]}")
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["dropped"] == row["dropped"], "both sides must drop the same clients"
    return {f"flower_{key}": value for key, value in measured.items() if key not in ("clients", "length", "dropped")}


def one_row(n: int, length: int, neighbours: int | None, examples: int) -> dict[str, Any]:
    """`measure` in a fresh Python process, so that its peak memory is its own."""
    command = [sys.executable, __file__, "--one", str(n), str(length), str(neighbours or 0), str(examples)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _cell(row: dict[str, Any], key: str, spec: str) -> str:
    return row["flower_unfinished"] if "flower_unfinished" in row else format(row[key], spec)


def main() -> None:
    parser = argparse.ArgumentParser(description="secure aggregation cost")
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--length", type=int, nargs="+", default=[460_800])
    parser.add_argument("--neighbours", type=int, default=10, help="SecAgg+ k for more than 10 clients")
    parser.add_argument("--examples", type=int, default=500, help="each client's example count (its weight)")
    parser.add_argument("--flower", help="a Python with flwr installed: compare with Flower's SecAgg+")
    parser.add_argument("--flower-memory-gb", type=float, default=16.0, help="Flower's data memory cap")
    parser.add_argument("--flower-timeout-s", type=float, default=1200.0, help="Flower's time limit per row")
    parser.add_argument("--one", type=int, nargs=4, help=argparse.SUPPRESS)  # one row, in this process
    args = parser.parse_args()
    if args.one:
        n, length, neighbours, examples = args.one
        measure(3, 16, None, examples)  # warm-up, as flower_secaggplus.py does
        print(json.dumps(measure(n, length, neighbours or None, examples)))
        return
    rows = []
    for length in args.length:
        for n in args.clients:
            neighbours = None if n <= 10 else args.neighbours
            row = one_row(n, length, neighbours, args.examples)
            if args.flower:
                threshold = max(2, (neighbours or n) // 2 + 1)
                row |= flower(args.flower, row, threshold, args.flower_memory_gb, args.flower_timeout_s)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    save_results("secagg_cost", rows)
    header = "| clients | coordinates | neighbours | dropped | modulus bits | client ms | server ms | round MB "
    header += "| bytes / client | x plain |"
    rule = "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    if args.flower:
        header += " Flower client ms | Flower server ms | Flower round MB | Flower bytes / client |"
        rule += " --- | --- | --- | --- |"
    print(header)
    print(rule)
    for r in rows:
        ratio = r["bytes_per_client"] / r["plain_float32_bytes"]
        line = (
            f"| {r['clients']} | {r['length']:,} | {r['neighbours']} | {r['dropped']} | {r['modulus_bits']} "
            f"| {r['client_ms_mean']:.0f} | {r['server_ms']:.0f} | {r['round_mb']:,.0f} "
            f"| {r['bytes_per_client']:,.0f} | {ratio:.2f} |"
        )
        if args.flower:
            cells = [("flower_client_ms_mean", ".0f"), ("flower_server_ms", ".0f"), ("flower_round_mb", ",.0f")]
            cells.append(("flower_bytes_per_client", ",.0f"))
            line += "".join(f" {_cell(r, key, spec)} |" for key, spec in cells)
        print(line)


if __name__ == "__main__":
    main()
