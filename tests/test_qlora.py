"""QLoRA: the frozen base loaded by bitsandbytes in 4-bit NF4 or 8-bit, LoRA trained on top."""

import math

import pytest
import torch

from fedtune.data.loading import load_records
from fedtune.model.adapters import get_adapter_state
from fedtune.model.builder import build_peft_model, tokenizer_for
from fedtune.training.loop import local_train
from fedtune.training.tokenized import encode_records


@pytest.mark.parametrize(("bits", "layer"), [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_quantized_base_trains_a_lora_adapter(tiny_config, bits, layer) -> None:  # type: ignore[no-untyped-def]
    config = tiny_config.model_copy(update={"model": tiny_config.model.model_copy(update={"quantization": bits})})
    model = build_peft_model(config)
    base_layers = {type(m).__name__ for name, m in model.named_modules() if name.endswith("q_proj.base_layer")}
    assert base_layers == {layer}
    tokenizer = tokenizer_for(config)
    data = encode_records(config, tokenizer, load_records(config.data))
    before = get_adapter_state(model)
    result = local_train(model, data, config.train, pad_id=tokenizer.pad_token_id, seed=0, steps=3)
    after = get_adapter_state(model)
    assert math.isfinite(result.last_loss)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(v.dtype == torch.float32 for v in after.values())
