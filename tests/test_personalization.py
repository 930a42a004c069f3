"""FedPer-style personalization: personal tensors never leave their client, the server federates
the rest, and each client's personalized model is evaluated against the global one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from fedtune.config.schema import ConfigError, build_config
from fedtune.core.errors import InputError
from fedtune.hetero.personalization import check_personal_modules
from fedtune.model.adapters import load_state
from fedtune.model.builder import build_peft_model, tokenizer_for
from fedtune.training.evaluation import loss_and_perplexity
from fedtune.training.tokenized import load_encoded
from tests.conftest import tiny_overrides

SECOND_LAYER = r"layers\.1\."


def test_patterns_must_match_something_and_not_everything() -> None:
    state = {"m.layers.0.q.lora_A.weight": torch.zeros(1), "m.layers.1.q.lora_A.weight": torch.zeros(1)}
    check_personal_modules([SECOND_LAYER], state)
    with pytest.raises(InputError, match=r"\['lora_B'\] match no adapter tensor"):
        check_personal_modules(["lora_B"], state)
    with pytest.raises(InputError, match="every adapter tensor would stay local"):
        check_personal_modules(["lora_A"], state)
    with pytest.raises(ConfigError, match="not a regular expression"):
        build_config({"federation": {"personal_modules": ["layers.(1"]}})
    with pytest.raises(ConfigError, match="not combined with secure aggregation"):
        build_config({"federation": {"personal_modules": ["lora_B"]}, "secagg": {"enabled": True}})


def test_a_pattern_the_method_has_no_tensor_for_stops_the_run_before_training(tmp_path, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    from flows.federated_finetune import federated_finetune

    overrides = tiny_overrides(tmp_path, tiny_model_dir)
    overrides["peft"] |= {"method": "ia3", "target_modules": ["k_proj", "v_proj"], "feedforward_modules": []}
    overrides["federation"] |= {"personal_modules": ["lora_B"]}
    with pytest.raises(InputError, match=r"personal_modules: \['lora_B'\] match no adapter tensor"):
        federated_finetune(config=build_config(overrides))
    assert not (tmp_path / "outputs" / "federated" / "rounds").exists()


def test_personal_layers_stay_home_and_are_compared_with_the_global_model(tmp_path, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    from flows.federated_finetune import federated_finetune

    overrides = tiny_overrides(tmp_path, tiny_model_dir)
    overrides["federation"] |= {"rounds": 2, "clients_per_round": 3, "personal_modules": [SECOND_LAYER]}
    overrides["eval"] |= {"generation_samples": 0}
    config = build_config(overrides)
    summary = federated_finetune(config=config)
    out = Path(config.federation.output_dir)

    start = load_state(out / "checkpoints" / "round_0000" / "global.safetensors")
    after_1 = load_state(out / "checkpoints" / "round_0001" / "global.safetensors")
    local = [k for k in start if "layers.1." in k]
    assert local and all(torch.equal(after_1[k], start[k]) for k in local)  # never aggregated
    assert any(not torch.equal(after_1[k], start[k]) for k in start if k not in local)  # the rest is
    for update in (out / "rounds").rglob("update_client_*.safetensors"):
        assert not any("layers.1." in k for k in load_state(update))  # never sent

    mine = {c: load_state(out / "clients" / f"client_{c}" / "personal" / "round_0001.safetensors") for c in range(3)}
    assert set(mine[0]) == set(local) and not torch.equal(mine[0][local[0]], mine[1][local[0]])

    tracking, tokenizer = MlflowClient(config.tracking.tracking_uri), tokenizer_for(config)
    for c in range(3):  # round 2 compared, before training, round 1's global with and without client c's layers
        val = load_encoded(config, tokenizer, c, "val")
        for name, state in (("global", after_1), ("personal", {**after_1, **mine[c]})):
            expected = loss_and_perplexity(
                build_peft_model(config, state), val, batch_size=16, pad_id=tokenizer.pad_token_id
            )
            logged = tracking.get_metric_history(summary["mlflow_run_id"], f"client_{c}/val_loss_{name}")
            assert {m.step: m.value for m in logged}[2] == pytest.approx(expected["loss"], abs=1e-5)
