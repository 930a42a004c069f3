"""Every registered PEFT method in a real federated round on the tiny model: the aggregated adapter
loads with peft and reproduces the logged test loss, and the upload is its serialized size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from peft import PeftModel

from fedtune.config.schema import ConfigError, build_config
from fedtune.data.partition import read_split
from fedtune.model.adapters import load_state, num_parameters, to_bytes
from fedtune.model.builder import tokenizer_for
from fedtune.model.loading import load_base_model
from fedtune.model.peft_methods import load_peft_adapter
from fedtune.training.evaluation import loss_and_perplexity
from fedtune.training.tokenized import encode_records
from tests.conftest import tiny_overrides

METHODS = [
    ("lora", {}),
    ("lora", {"use_dora": True}),
    ("lora", {"use_rslora": True}),
    ("lora", {"quantization": "4bit"}),  # QLoRA: a model option, NF4 base through bitsandbytes
    ("lora", {"quantization": "8bit"}),
    ("ia3", {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}),
    ("prompt_tuning", {"num_virtual_tokens": 4}),
    ("p_tuning", {"num_virtual_tokens": 4, "encoder_hidden_size": 32}),
    ("prefix_tuning", {"num_virtual_tokens": 4}),
]


def _name(method: str, options: dict) -> str:  # type: ignore[type-arg]
    return method + "".join(f"-{v if k == 'quantization' else k}" for k, v in list(options.items())[:1])


@pytest.mark.parametrize(("method", "options"), METHODS, ids=[_name(m, o) for m, o in METHODS])
def test_a_federated_round_with_each_method_gives_an_adapter_peft_loads(
    tmp_path, tiny_model_dir, method, options
) -> None:  # type: ignore[no-untyped-def]
    from flows.federated_finetune import federated_finetune

    overrides = tiny_overrides(tmp_path, tiny_model_dir)
    options = dict(options)
    overrides["model"]["quantization"] = options.pop("quantization", "none")
    overrides["peft"] |= {"method": method, **options}
    overrides["federation"] |= {"rounds": 1, "clients_per_round": 2}
    overrides["train"] |= {"steps_per_round": 3}
    overrides["eval"] |= {"generation_samples": 2, "max_new_tokens": 2}
    config = build_config(overrides)
    summary = federated_finetune(config=config)

    out = Path(config.federation.output_dir)
    final = load_state(out / "final_adapter.safetensors")
    assert final and all(("lora" in k) == (method == "lora") for k in final)
    before = load_state(out / "checkpoints" / "round_0000" / "global.safetensors")
    assert any(not torch.equal(before[k], final[k]) for k in final)  # the round trained this method's weights
    updates = sorted((out / "rounds" / "round_0001").glob("update_client_*.safetensors"))
    assert len(updates) == 2
    for update in updates:  # the upload is exactly the update file: its tensors' bytes plus the envelope
        assert update.stat().st_size - len(to_bytes(load_state(update))) <= 256
        assert num_parameters(load_state(update)) == num_parameters(final)

    tracking = MlflowClient(config.tracking.tracking_uri)
    folder = tracking.download_artifacts(summary["mlflow_run_id"], "adapters/round_0001", str(tmp_path / "dl"))
    resumed = load_peft_adapter(folder)  # what a continual run starts from: the exact trainable state
    assert resumed.keys() == final.keys() and all(torch.equal(resumed[k], final[k]) for k in final)
    model = PeftModel.from_pretrained(load_base_model(config.model), folder)  # QLoRA: the same quantized base
    tokenizer = tokenizer_for(config)
    test = encode_records(config, tokenizer, read_split(config.data.partitions_dir, None, "test"))
    loss = loss_and_perplexity(model, test, batch_size=16, pad_id=tokenizer.pad_token_id)["loss"]
    logged = tracking.get_metric_history(summary["mlflow_run_id"], "test_loss")
    assert loss == pytest.approx(next(m.value for m in logged if m.step == 1), abs=1e-4)


def test_feedforward_modules_must_be_targets() -> None:
    with pytest.raises(ConfigError, match=r"peft.feedforward_modules: \['down_proj'\] must also be in target_modules"):
        build_config({"peft": {"method": "ia3", "feedforward_modules": ["down_proj"]}})


def test_unknown_method_is_named_with_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="unknown PEFT method 'adapterx'; known: ia3, lora, p_tuning"):
        build_config({"peft": {"method": "adapterx"}})
