"""FlexLoRA (Bai et al., NeurIPS 2024): average LoRA *products*, then redistribute by SVD.

FedAvg on LoRA factors averages B and A separately, and mean(B) @ mean(A) is not the mean of the
clients' B_i @ A_i. FlexLoRA forms each client's full-size update W_i = B_i @ A_i (at the shared
LoRA scale: lower-rank clients train at the global scale, see `fedtune.hetero.ranks`), takes their
example-weighted mean W, and factors it back to the global rank r by truncated SVD:
B = U_r diag(S_r), A = V_r^T. The components come ordered by singular value, so a client of rank
r_c that takes the first r_c of them (`hetero_rank.truncate`) starts from the best rank-r_c
approximation of W (Eckart-Young), rather than from whatever the first r_c factor columns
happened to hold, as with zero padding. A keeps orthonormal rows (the scale of a fresh LoRA A)
and B carries the magnitudes, so the next round's gradients are as for LoRA's own init.

Tensors that are not LoRA factor pairs (DoRA's magnitudes, for example) are averaged as FedAvg.
Written here because no maintained library aggregates peft adapters this way (Flower's FlexLoRA
example is a script, not a package).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from fedtune.hetero.ranks import pad, truncate
from fedtune.model.adapters import AdapterState
from fedtune.strategies.base import ClientUpdate, ServerState, StreamingStrategy
from fedtune.strategies.fedavg import WeightedSum
from fedtune.strategies.options import FlexLoRAOptions


def lora_pairs(state: AdapterState) -> dict[str, str]:
    """{lora_A key: lora_B key} for every module whose two factors are both in `state`."""
    return {
        key: key.replace(".lora_A.", ".lora_B.")
        for key in state
        if ".lora_A." in key and key.replace(".lora_A.", ".lora_B.") in state
    }


def factor(product: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) of rank `rank` with B @ A the best rank-`rank` approximation of `product`."""
    u, s, vh = torch.linalg.svd(product, full_matrices=False)
    return (u[:, :rank] * s[:rank]).contiguous(), vh[:rank].contiguous()  # LAPACK output is column-major


class FlexLoRA(StreamingStrategy):
    Options = FlexLoRAOptions
    options: FlexLoRAOptions

    def aggregate_stream(
        self, global_state: AdapterState, updates: Iterable[ClientUpdate], server_state: ServerState
    ) -> tuple[AdapterState, ServerState]:
        pairs = lora_pairs(global_state)
        factored = set(pairs) | set(pairs.values())
        products, others = WeightedSum(), WeightedSum()
        for update in updates:
            trained = self._trained_factors(global_state, update, factored)
            products.add({a: trained[b] @ trained[a] for a, b in pairs.items()}, update.num_examples)
            others.add({k: v for k, v in update.delta.items() if k not in factored}, update.num_examples)
        new = dict(global_state)
        if others.sums:
            new |= {k: global_state[k] + mean for k, mean in others.mean().items()}
        for a, b in pairs.items():
            up, down = factor(products.sums[a] / products.weight, global_state[a].shape[0])
            new[a], new[b] = down.to(global_state[a].dtype), up.to(global_state[b].dtype)
        return new, dict(server_state)

    def _trained_factors(self, global_state: AdapterState, update: ClientUpdate, keys: set[str]) -> AdapterState:
        """The client's factors after training, zero-padded to the global rank (the padding adds
        nothing to B @ A): the global's first r_c components it started from, plus its update."""
        rank = self.options.client_ranks.get(update.client)
        start = global_state if rank is None else pad(truncate(global_state, rank), global_state)
        return {k: start[k].to(torch.float64) + update.delta[k].to(torch.float64) for k in keys}
