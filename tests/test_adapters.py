from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from fedtune.model.adapters import (
    AdapterMismatchError,
    add,
    from_bytes,
    get_adapter_state,
    load_state,
    save_state,
    set_adapter_state,
    subtract,
    to_bytes,
)
from fedtune.model.builder import build_peft_model
from fedtune.model.peft_methods import save_peft_adapter


def test_state_holds_only_adapter_tensors_and_round_trips(tiny_config, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = build_peft_model(tiny_config)
    state = get_adapter_state(model)
    assert state and all("lora_" in key for key in state)
    assert sum(t.numel() for t in state.values()) == model.get_nb_trainable_parameters()[0]
    data = to_bytes(state)
    assert all(torch.equal(state[k], v) for k, v in from_bytes(data).items())
    assert save_state(state, tmp_path / "a.safetensors") == len(data) == (tmp_path / "a.safetensors").stat().st_size
    assert set(load_state(tmp_path / "a.safetensors")) == set(state)


def test_set_state_loads_values_and_rejects_mismatched_keys(tiny_config) -> None:  # type: ignore[no-untyped-def]
    model = build_peft_model(tiny_config)
    state = {k: torch.randn_like(v) for k, v in get_adapter_state(model).items()}
    set_adapter_state(model, state)
    assert all(torch.equal(state[k], v) for k, v in get_adapter_state(model).items())
    missing = dict(list(state.items())[1:])
    with pytest.raises(AdapterMismatchError, match="missing"):
        set_adapter_state(model, missing)
    with pytest.raises(AdapterMismatchError, match="unexpected"):
        set_adapter_state(model, {**state, "base_model.model.extra.lora_A.weight": torch.zeros(1)})


def test_update_arithmetic_is_pure() -> None:
    local, global_ = {"w": torch.tensor([3.0, 1.0])}, {"w": torch.tensor([1.0, 1.0])}
    delta = subtract(local, global_)
    assert torch.equal(delta["w"], torch.tensor([2.0, 0.0]))
    assert torch.equal(add(global_, delta)["w"], local["w"])
    assert torch.equal(global_["w"], torch.tensor([1.0, 1.0]))


def test_peft_format_directory_loads_with_peft(tiny_config, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = build_peft_model(tiny_config)
    state = {k: torch.randn_like(v) for k, v in get_adapter_state(model).items()}
    folder = save_peft_adapter(state, tiny_config.peft, tiny_config.model.name_or_path, tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_config.model.name_or_path)
    loaded = PeftModel.from_pretrained(base, folder)
    assert all(torch.equal(state[k], v) for k, v in get_adapter_state(loaded).items())


def test_an_exported_adapter_loads_by_itself_from_anywhere(tiny_config, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The README's snippet: `AutoPeftModelForCausalLM.from_pretrained(folder)` finds the base model
    the adapter names, though the config gave it relative to the project, and computes what
    fedtune's own model computes."""
    from peft import AutoPeftModelForCausalLM

    from fedtune.model.builder import export_adapter

    model_dir = Path(tiny_config.model.name_or_path)
    monkeypatch.chdir(model_dir.parent)
    relative = tiny_config.model.model_copy(update={"name_or_path": model_dir.name})
    config = tiny_config.model_copy(update={"model": relative})
    state = {k: torch.randn_like(v) for k, v in get_adapter_state(build_peft_model(config)).items()}
    folder = export_adapter(config, state, tmp_path / "adapter")
    monkeypatch.chdir(tmp_path)  # elsewhere: the relative path no longer resolves
    loaded = AutoPeftModelForCausalLM.from_pretrained(folder).eval()
    ours = build_peft_model(tiny_config, state).eval()
    tokens = torch.tensor([[5, 9, 17, 33]])
    with torch.no_grad():
        assert torch.allclose(loaded(tokens).logits, ours(tokens).logits, atol=1e-5)
