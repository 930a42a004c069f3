"""Run Flower's own server strategies on given client updates; run with Flower's Python.

    .venv-flower/bin/python tests/flower_reference.py IN.npz SPEC.json OUT.npz

Flower lives in its own virtual environment (its pinned web stack conflicts with Prefect's), so
tests/test_server_opt.py calls this script there. IN holds `init_<t>` (the initial global
tensors) and, for every round r and client c, `delta_r<r>_c<c>_<t>` and `examples_r<r>_c<c>`.
Each client's parameters are Flower's current global plus its delta, as a client that trained
from that global would send. SPEC: {"strategy": class name, "options": {...}, "rounds": R,
"clients": K, "tensors": T, "round_offset": o} (Flower is told round r + o). OUT gets
`global_r<r>_<t>` after every round.
"""

from __future__ import annotations

import json
import sys

import numpy as np
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import strategy as flower


def main(source: str, spec_path: str, target: str) -> None:
    data = np.load(source, allow_pickle=False)
    with open(spec_path) as handle:
        spec = json.load(handle)
    tensors = range(spec["tensors"])
    current = [data[f"init_{t}"] for t in tensors]
    strategy = getattr(flower, spec["strategy"])(initial_parameters=ndarrays_to_parameters(current), **spec["options"])
    out = {}
    for r in range(1, spec["rounds"] + 1):
        results = []
        for c in range(spec["clients"]):
            params = [current[t] + data[f"delta_r{r}_c{c}_{t}"] for t in tensors]
            fit = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(params), int(data[f"examples_r{r}_c{c}"]), {})
            results.append((None, fit))
        aggregated, _ = strategy.aggregate_fit(r + spec["round_offset"], results, [])
        current = parameters_to_ndarrays(aggregated)
        out |= {f"global_r{r}_{t}": current[t] for t in tensors}
    np.savez(target, **out)


if __name__ == "__main__":
    main(*sys.argv[1:4])
