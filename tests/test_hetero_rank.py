"""Heterogeneous LoRA ranks (HetLoRA zero padding): a low-rank client computes exactly the global
adapter's leading components, sends its own rank, and the server pads before averaging."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedtune.adapters import load_state
from fedtune.config import ConfigError, build_config
from fedtune.data.partition import read_split
from fedtune.hetero_rank import client_section, pad, truncate
from fedtune.runtime import build_peft_model, initial_adapter_state
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
    with pytest.raises(ConfigError, match=r"client_ranks \{0: 9\}: each rank must be in 1..r \(8\)"):
        build_config({"peft": {"client_ranks": {0: 9}}})
    with pytest.raises(ConfigError, match=r"clients \[7\] are not among the 3 partitions"):
        build_config({"peft": {"client_ranks": {7: 2}}})
    with pytest.raises(ConfigError, match="heterogeneous ranks are for lora"):
        build_config({"peft": {"method": "ia3", "client_ranks": {0: 2}}})


def test_a_federation_of_three_ranks_averages_the_zero_padded_updates(tmp_path, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    from flows.federated_finetune import federated_finetune

    overrides = tiny_overrides(tmp_path, tiny_model_dir)
    overrides["peft"] |= {"r": 4, "client_ranks": {0: 1, 2: 2}}
    overrides["federation"] |= {"rounds": 1, "clients_per_round": 3}
    overrides["eval"] |= {"generation_samples": 0}
    config = build_config(overrides)
    federated_finetune(config=config)
    out = Path(config.federation.output_dir)
    before = load_state(out / "checkpoints" / "round_0000" / "global.safetensors")
    after = load_state(out / "final_adapter.safetensors")
    files = [out / "rounds" / "round_0001" / f"update_client_{c}.safetensors" for c in range(3)]
    updates = [load_state(f) for f in files]
    a_key = next(k for k in before if ".lora_A." in k)
    assert [u[a_key].shape[0] for u in updates] == [1, 4, 2]  # each sends its own rank
    assert files[0].stat().st_size < files[2].stat().st_size < files[1].stat().st_size
    examples = [len(read_split(config.data.partitions_dir, c, "train")) for c in range(3)]
    total = sum(examples)
    for key, start in before.items():
        mean = sum(n * pad({key: u[key]}, {key: start})[key] for n, u in zip(examples, updates, strict=True)) / total
        assert torch.allclose(after[key], start + mean, atol=1e-6)
