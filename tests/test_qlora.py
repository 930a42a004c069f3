"""QLoRA's promise on its own: the frozen base is stored quantized by bitsandbytes (NF4 4-bit or
LLM.int8 8-bit) and only the LoRA weights, in float32, train. That a quantized round federates and
its adapter loads with peft is tests/test_peft_methods.py's `lora-4bit` and `lora-8bit` cases."""

import pytest
import torch

from fedtune.model.builder import build_peft_model


@pytest.mark.parametrize(
    ("bits", "layer", "stored"), [("4bit", "Linear4bit", torch.uint8), ("8bit", "Linear8bitLt", torch.int8)]
)
def test_the_frozen_base_is_stored_quantized_and_only_lora_trains(tiny_config, bits, layer, stored) -> None:  # type: ignore[no-untyped-def]
    config = tiny_config.model_copy(update={"model": tiny_config.model.model_copy(update={"quantization": bits})})
    full, model = build_peft_model(tiny_config), build_peft_model(config)
    bases = {name: m for name, m in model.named_modules() if name.endswith("_proj.base_layer")}
    assert bases and {type(m).__name__ for m in bases.values()} == {layer}
    assert all(m.weight.dtype == stored and not m.weight.requires_grad for m in bases.values())
    if bits == "4bit":  # NF4, the QLoRA paper's data type (Dettmers et al. 2023, sec. 3), not FP4
        assert {m.weight.quant_type for m in bases.values()} == {"nf4"}
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name and p.dtype == torch.float32 for name, p in trainable.items())
    linear = sum(m.weight.numel() for name, m in full.named_modules() if name.endswith("_proj.base_layer"))
    saved = full.get_memory_footprint() - model.get_memory_footprint()
    assert saved >= linear * (4 - (0.5 if bits == "4bit" else 1)) * 0.9  # float32 -> NF4 / int8 (+ scales)
