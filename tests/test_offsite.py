"""Offsite-tuning: the emulator keeps the adaptors and a subset of the middle, the tuned adaptors
plug into the full model at the right layers, and the tuning carries over to the full model."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedtune.config.schema import build_config
from fedtune.core.errors import InputError
from fedtune.hetero.offsite import build_emulator, plan, plug_in
from fedtune.model.adapters import load_state, set_adapter_state
from fedtune.model.builder import build_peft_model, initial_adapter_state
from tests.conftest import build_model, build_tokenizer, tiny_overrides


@pytest.fixture(scope="module")
def six_layer_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("six-layers")
    build_tokenizer(directory)
    return build_model(directory, len(AutoTokenizer.from_pretrained(directory)), layers=6)


def test_the_plan_keeps_both_ends_and_thins_the_middle() -> None:
    assert plan(6, 1, 2) == [0, 1, 3, 5]
    assert plan(12, 2, 3) == [0, 1, 2, 5, 8, 10, 11]
    assert plan(6, 2, 1) == list(range(6))
    with pytest.raises(InputError, match="3 adaptor layers at each end leave no middle in a 6-layer model"):
        plan(6, 3, 1)


def test_the_emulator_is_the_kept_layers_of_the_full_model(tmp_path, six_layer_model) -> None:  # type: ignore[no-untyped-def]
    result = build_emulator(six_layer_model, tmp_path / "emulator", adaptor_layers=1, keep_every=2)
    assert result.kept == [0, 1, 3, 5] and result.adaptors == [0, 3] and result.full_adaptors == [0, 5]
    full = AutoModelForCausalLM.from_pretrained(six_layer_model)
    small = AutoModelForCausalLM.from_pretrained(tmp_path / "emulator")
    assert small.config.num_hidden_layers == 4 and result.emulator_parameters < result.full_parameters
    for j, i in enumerate(result.kept):
        mine, theirs = small.model.layers[j].state_dict(), full.model.layers[i].state_dict()
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    ids = torch.tensor([[5, 6, 7, 8]])
    assert small.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 7)  # KV cache indexing works


def test_plugged_in_adaptors_land_on_their_full_layers(tmp_path, six_layer_model) -> None:  # type: ignore[no-untyped-def]
    """With nothing dropped the emulator is the full model, so the outputs must agree exactly."""
    result = build_emulator(six_layer_model, tmp_path / "emulator", adaptor_layers=2, keep_every=1)
    data = tiny_overrides(tmp_path, six_layer_model)
    emulator_config = build_config(
        data
        | {
            "model": {**data["model"], "name_or_path": str(tmp_path / "emulator")},
            "peft": {**data["peft"], "layers": result.adaptors},
        }
    )
    full_config = build_config(data | {"peft": {**data["peft"], "layers": result.full_adaptors}})
    state, _ = initial_adapter_state(emulator_config)
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=generator) * 0.1 for k, v in state.items()}
    on_emulator = build_peft_model(emulator_config, state).eval()
    on_full = build_peft_model(full_config).eval()
    set_adapter_state(on_full, plug_in(state, result))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    assert torch.allclose(on_emulator(ids).logits, on_full(ids).logits, atol=1e-5)
    with pytest.raises(InputError, match="is not on an adaptor layer"):
        plug_in({"base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight": torch.zeros(1)}, result)


def test_offsite_tuning_flow_improves_the_full_model_it_never_shipped(tmp_path, six_layer_model) -> None:  # type: ignore[no-untyped-def]
    from mlflow import MlflowClient

    from flows.offsite_tuning import offsite_tuning

    data = tiny_overrides(tmp_path, six_layer_model)
    data["federation"] |= {"rounds": 2}
    config = build_config(data)
    summary = offsite_tuning(config=config, adaptor_layers=1, keep_every=2, output_dir=str(tmp_path / "offsite"))
    assert summary["emulator_layers"] == 4 and summary["adaptor_layers_full"] == [0, 5]
    assert summary["client_visible_share"] < 0.9
    assert summary["full_test_loss"] < summary["full_untuned_test_loss"] - 0.05  # the tuning carries over
    plugged = load_state(tmp_path / "offsite" / "full_adapter.safetensors")
    assert plugged and all(".layers.0." in k or ".layers.5." in k for k in plugged)
    artifacts = MlflowClient(config.tracking.tracking_uri).list_artifacts(summary["mlflow_run_id"], "adapters/full")
    assert artifacts
    with pytest.raises(InputError, match="leave no middle"):
        offsite_tuning(config=config, adaptor_layers=3, keep_every=1, output_dir=str(tmp_path / "bad"))


@pytest.mark.parametrize("every_layer", [False, True], ids=["emulator", "smaller-member"])
def test_distilling_the_emulator_moves_its_middle_toward_the_full_model(tmp_path, six_layer_model, every_layer) -> None:  # type: ignore[no-untyped-def]
    from fedtune.data.synthetic import generate
    from fedtune.hetero.offsite import distill_emulator

    result = build_emulator(six_layer_model, tmp_path / "emulator", adaptor_layers=1, keep_every=2)
    before = AutoModelForCausalLM.from_pretrained(tmp_path / "emulator").model.layers
    texts = [f"{r['instruction']} {r['response']}" for r in generate(["add", "sort", "parity"], 20, seed=4)]
    report = distill_emulator(six_layer_model, tmp_path / "emulator", texts, steps=40, lr=1e-3, every_layer=every_layer)
    assert report["kl_last"] < 0.7 * report["kl_first"]
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "emulator").model.layers
    for j in range(len(result.kept)):
        same = all(torch.equal(a, b) for a, b in zip(before[j].parameters(), after[j].parameters(), strict=True))
        # an emulator's adaptors stay the full model's and its middle learns; a smaller member learns everywhere
        assert same == (j in result.adaptors and not every_layer)


def test_emulator_distillation_needs_the_owners_public_data(tmp_path, six_layer_model) -> None:  # type: ignore[no-untyped-def]
    from flows.offsite_tuning import offsite_tuning

    config = build_config(tiny_overrides(tmp_path, six_layer_model))
    with pytest.raises(InputError, match="distill.public_source"):
        offsite_tuning(config=config, distill_steps=5, output_dir=str(tmp_path / "offsite"))
