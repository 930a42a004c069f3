"""Heterogeneous LoRA ranks: a low-rank client computes exactly the global adapter's leading
components and sends its own rank; the server zero-pads before averaging (HetLoRA) or averages the
clients' products and re-factors them by SVD (FlexLoRA)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from fedtune.config.schema import ConfigError, build_config
from fedtune.data.partition import read_split
from fedtune.hetero.ranks import client_section, pad, truncate
from fedtune.model.adapters import load_state
from fedtune.model.builder import build_peft_model, initial_adapter_state
from fedtune.strategies.base import ClientUpdate
from fedtune.strategies.fedavg import FedAvg
from fedtune.strategies.flexlora import FlexLoRA
from tests.conftest import tiny_overrides


@pytest.mark.parametrize("rslora", [False, True])
def test_a_truncated_adapter_at_the_rescaled_alpha_computes_the_globals_leading_components(
    tmp_path, tiny_model_dir, rslora
) -> None:  # type: ignore[no-untyped-def]
    overrides = tiny_overrides(tmp_path, tiny_model_dir)
    overrides["peft"] |= {"r": 4, "use_rslora": rslora}
    config = build_config(overrides)
    state, _ = initial_adapter_state(config)
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=generator) * 0.3 for k, v in state.items()}  # B not zero
    leading = {k: v.clone() for k, v in state.items()}
    for k, v in leading.items():  # the global adapter without its components 2 and 3
        if ".lora_A." in k:
            v[2:] = 0
        elif ".lora_B." in k:
            v[:, 2:] = 0
    low = config.model_copy(update={"peft": client_section(config.peft, 2)})
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        expected = build_peft_model(config, leading)(input_ids=ids).logits
        got = build_peft_model(low, truncate(state, 2))(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, build_peft_model(config, state)(input_ids=ids).logits.detach(), atol=1e-3)


def test_truncate_then_pad_keeps_the_leading_components_and_zeros_the_rest() -> None:
    state = {"x.lora_A.weight": torch.arange(12.0).view(4, 3), "x.lora_B.weight": torch.arange(8.0).view(2, 4)}
    back = pad(truncate(state, 1), state)
    assert (
        torch.equal(back["x.lora_A.weight"][0], state["x.lora_A.weight"][0]) and not back["x.lora_A.weight"][1:].any()
    )
    assert torch.equal(back["x.lora_B.weight"][:, 0], state["x.lora_B.weight"][:, 0])
    assert not back["x.lora_B.weight"][:, 1:].any()


def test_ranks_are_checked_with_the_config() -> None:
    with pytest.raises(ConfigError, match=r"peft.client_ranks: \{0: 9\}: each rank must be in 1..r \(8\)"):
        build_config({"peft": {"client_ranks": {0: 9}}})
    with pytest.raises(ConfigError, match=r"clients \[7\] are not among the 3 partitions"):
        build_config({"peft": {"client_ranks": {7: 2}}})
    with pytest.raises(ConfigError, match="heterogeneous ranks are for lora"):
        build_config({"peft": {"method": "ia3", "client_ranks": {0: 2}}})


def _one_round_of_three_ranks(tmp_path: Path, tiny_model_dir: Path, **federation: Any) -> tuple[Any, ...]:
    """A round of clients at ranks 1, 4 (= r) and 2: (config, global before, global after, the
    update files, each client's train examples)."""
    from flows.federated_finetune import federated_finetune

    overrides = tiny_overrides(tmp_path, tiny_model_dir)
    overrides["peft"] |= {"r": 4, "client_ranks": {0: 1, 2: 2}}
    overrides["federation"] |= {"rounds": 1, "clients_per_round": 3, **federation}
    overrides["eval"] |= {"generation_samples": 0}
    config = build_config(overrides)
    federated_finetune(config=config)
    out = Path(config.federation.output_dir)
    before = load_state(out / "checkpoints" / "round_0000" / "global.safetensors")
    after = load_state(out / "final_adapter.safetensors")
    files = [out / "rounds" / "round_0001" / f"update_client_{c}.safetensors" for c in range(3)]
    examples = [len(read_split(config.data.partitions_dir, c, "train")) for c in range(3)]
    return config, before, after, files, examples


def test_a_federation_of_three_ranks_averages_the_zero_padded_updates(tmp_path, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    _, before, after, files, examples = _one_round_of_three_ranks(tmp_path, tiny_model_dir)
    updates = [load_state(f) for f in files]
    a_key = next(k for k in before if ".lora_A." in k)
    assert [u[a_key].shape[0] for u in updates] == [1, 4, 2]  # each sends its own rank
    assert files[0].stat().st_size < files[2].stat().st_size < files[1].stat().st_size
    total = sum(examples)
    for key, start in before.items():
        mean = sum(n * pad({key: u[key]}, {key: start})[key] for n, u in zip(examples, updates, strict=True)) / total
        assert torch.allclose(after[key], start + mean, atol=1e-6)


def _factors(shapes: dict[str, tuple[int, ...]], seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=generator, dtype=torch.float64) * scale for k, shape in shapes.items()}


def _product(state: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    return state[f"{module}.lora_B.weight"] @ state[f"{module}.lora_A.weight"]


def test_flexlora_averages_the_clients_products_and_orders_components_by_singular_value() -> None:
    """Ranks 1, 1 and 2 under a rank-4 global: the mean of the three products has rank <= 4, so
    FlexLoRA's new global reproduces it exactly, where FedAvg on zero-padded factors does not; the
    first k components are the best rank-k approximation; other tensors are averaged."""
    ranks, examples = {0: 1, 1: 1, 2: 2}, {0: 30, 1: 10, 2: 20}
    shapes = {"m.lora_A.weight": (4, 6), "m.lora_B.weight": (5, 4), "m.lora_magnitude_vector": (5,)}
    global_state = _factors(shapes, seed=0)
    updates, trained = [], []
    for client, rank in ranks.items():
        delta = truncate(_factors(shapes, seed=client + 1, scale=0.5), rank)
        trained.append({k: truncate(global_state, rank)[k] + d for k, d in delta.items()})
        updates.append(ClientUpdate(client, pad(delta, global_state), examples[client]))
    total = sum(examples.values())
    mean = sum(examples[c] * _product(trained[c], "m") for c in ranks) / total

    new, _ = FlexLoRA(client_ranks=ranks).aggregate(global_state, updates, {})
    assert torch.allclose(_product(new, "m"), mean, atol=1e-10)
    fedavg, _ = FedAvg().aggregate(global_state, updates, {})
    assert (_product(fedavg, "m") - mean).norm() > 0.1 * mean.norm()
    a = new["m.lora_A.weight"]
    assert torch.allclose(a @ a.T, torch.eye(4, dtype=a.dtype), atol=1e-10)  # orthonormal rows, B carries scale
    singular = torch.linalg.svdvals(mean)
    for k in (1, 2, 3):
        error = (mean - _product(truncate(new, k), "m")).norm()
        assert torch.isclose(error, singular[k:].norm())  # Eckart-Young: the best rank-k approximation
    magnitude = (
        sum(examples[c] * u.delta["m.lora_magnitude_vector"] for c, u in zip(ranks, updates, strict=True)) / total
    )
    assert torch.allclose(new["m.lora_magnitude_vector"], global_state["m.lora_magnitude_vector"] + magnitude)


def test_flexlora_refuses_what_it_cannot_aggregate() -> None:
    flex = {"federation": {"strategy": "flexlora"}}
    with pytest.raises(ConfigError, match="flexlora aggregates LoRA factor products; peft.method is 'ia3'"):
        build_config(flex | {"peft": {"method": "ia3"}})
    with pytest.raises(ConfigError, match="personal_modules would split pairs"):
        build_config({"federation": {"strategy": "flexlora", "personal_modules": ["lora_B"]}})
    with pytest.raises(ConfigError, match="'flexlora' needs each client's update"):
        build_config(flex | {"secagg": {"enabled": True}})


def test_a_flexlora_federation_of_three_ranks_refactors_the_mean_product(tmp_path, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    config, before, after, files, examples = _one_round_of_three_ranks(tmp_path, tiny_model_dir, strategy="flexlora")
    updates = [load_state(f) for f in files]
    modules = sorted(k.removesuffix(".lora_A.weight") for k in before if k.endswith(".lora_A.weight"))
    assert modules
    gaps = []
    for module in modules:
        products = []
        for client, update in enumerate(updates):
            start = truncate(before, config.peft.client_ranks.get(client, 4))
            products.append(_product({k: start[k].double() + update[k].double() for k in update}, module))
        mean = sum(n * p for n, p in zip(examples, products, strict=True)) / sum(examples)
        best = torch.linalg.svd(mean, full_matrices=False)
        rank4 = best.U[:, :4] * best.S[:4] @ best.Vh[:4]
        assert torch.allclose(_product({k: v.double() for k, v in after.items()}, module), rank4, atol=1e-5)
        padded = [pad(u, before) for u in updates]  # what zero padding would have made of the same updates
        fedavg = {
            k: v.double() + sum(n * p[k] for n, p in zip(examples, padded, strict=True)) / sum(examples)
            for k, v in before.items()
        }
        gaps.append((_product(fedavg, module) - rank4).abs().max().item())
    assert max(gaps) > 1e-4, gaps  # the check above tells the two aggregations apart
