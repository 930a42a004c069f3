"""FedMKT-style knowledge transfer: clients whose models (and tokenizers) differ teach each other.

No weights are exchanged, since they would not fit each other's models. Each round every client
(1) tunes its own adapter on its private data, (2) sends its top-k logits on a public data set
(a `distillation.message`), the server (3) aligns every sender's message to each receiver's
tokens and fuses them into one teacher distribution per receiver, and each client (4) distills
that into its own adapter on the public data. A client's adapter never leaves its folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedtune.config.schema import FedConfig
from fedtune.core.errors import InputError
from fedtune.core.sampling import client_seed
from fedtune.data.loading import load_records
from fedtune.data.prompts import prompt_messages, reference_answer
from fedtune.model.adapters import get_adapter_state, save_state
from fedtune.model.builder import build_peft_model, initial_adapter_state, tokenizer_for
from fedtune.training.client_feature import own_state
from fedtune.training.distillation import (
    Target,
    TextExample,
    VocabularyBridge,
    align,
    aligned_share,
    attach,
    encode_text,
    fuse,
    message,
    own_tokens,
    targets_bytes,
    top_k,
)
from fedtune.training.loop import local_train, total_steps
from fedtune.training.tokenized import load_encoded

MIN_ALIGNED = 0.25  # below this share of aligned tokens, two tokenizers are refused as unalignable


def client_config(cfg: FedConfig, client: int) -> FedConfig:
    """The config as client `client` runs it: with its own model, if it has one."""
    path = cfg.distill.client_models.get(client)
    if path is None:
        return cfg
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"name_or_path": path, "source": None})})


def public_texts(cfg: FedConfig) -> list[TextExample]:
    """The public rows as one plain text each (the same string for every tokenizer)."""
    if cfg.distill.public_source is None:
        raise InputError("distill.public_source: the knowledge-transfer flow needs a public data set")
    section = cfg.data.model_copy(
        update={
            "source": cfg.distill.public_source,
            "max_examples": cfg.distill.public_examples,
            "partition": cfg.data.partition.model_copy(update={"scheme": "iid"}),
        }
    )
    texts = []
    for record in load_records(section):
        prompt = "\n".join(m["content"] for m in prompt_messages(record, None)) + "\n"
        texts.append(TextExample(prompt + reference_answer(record), len(prompt)))
    return texts


def check_transfer(cfg: FedConfig, texts: list[TextExample]) -> None:
    """Before any training: top_k fits every vocabulary, and every pair of tokenizers aligns."""
    clients = range(cfg.data.partition.num_clients)
    tokenizers = {c: tokenizer_for(client_config(cfg, c)) for c in clients}
    small = {c: len(t) for c, t in tokenizers.items() if cfg.distill.top_k > len(t)}
    if small:
        raise InputError(f"distill.top_k: {cfg.distill.top_k} is larger than the vocabulary of clients {small}")
    sample = texts[:8]
    for receiver, r_tok in tokenizers.items():
        mine = [encode_text(r_tok, t, cfg.data.max_length) for t in sample]
        for sender, s_tok in tokenizers.items():
            if sender == receiver:
                continue
            bridge = VocabularyBridge(s_tok, r_tok)
            if bridge.identity:  # one tokenizer: every token aligns
                continue
            theirs = own_tokens([encode_text(s_tok, t, cfg.data.max_length) for t in sample])
            share = aligned_share([align(m, bridge, r, 1.0) for m, r in zip(theirs, mine, strict=True)])
            if share < MIN_ALIGNED:
                raise InputError(
                    f"distill: the tokenizers of clients {sender} and {receiver} cannot be aligned: only "
                    f"{share:.0%} of the tokens start at the same character with a token both vocabularies share"
                )


def _model(cfg: FedConfig, private_dir: str | Path, round_: int) -> Any:
    """The client's model with its latest adapter (its round-`round_` file once it exists)."""
    state = own_state(private_dir, round_ + 1, "adapter") or initial_adapter_state(cfg)[0]
    return build_peft_model(cfg, state)


def _save(model: Any, private_dir: str | Path, round_: int) -> None:
    save_state(get_adapter_state(model), Path(private_dir) / "adapter" / f"round_{round_:04d}.safetensors")


def train_private(cfg: FedConfig, client: int, round_: int, private_dir: str | Path) -> dict[str, Any]:
    """Step 1: the client tunes its own adapter on its private data."""
    tokenizer = tokenizer_for(cfg)
    train = load_encoded(cfg, tokenizer, client, "train")
    model = _model(cfg, private_dir, round_ - 1)
    seed = client_seed(cfg.train.seed, round_, client)
    steps = total_steps(cfg.train, len(train))
    result = local_train(model, train, cfg.train, pad_id=tokenizer.pad_token_id, seed=seed, steps=steps)
    _save(model, private_dir, round_)
    return {"client": client, "train_loss": result.mean_loss, "steps": result.steps}


def send_logits(cfg: FedConfig, round_: int, private_dir: str | Path, texts: list[TextExample]) -> list[dict]:
    """Step 2: the client's message, its top-k on the public texts."""
    tokenizer = tokenizer_for(cfg)
    encoded = [encode_text(tokenizer, t, cfg.data.max_length) for t in texts]
    model = _model(cfg, private_dir, round_)
    picks = top_k(model, encoded, k=cfg.distill.top_k, pad_id=tokenizer.pad_token_id, batch_size=cfg.eval.batch_size)
    return message(encoded, picks)


def fused_targets(
    cfg: FedConfig, receiver: int, messages: dict[int, list[dict]], texts: list[TextExample]
) -> tuple[list[list[Target]], int]:
    """Step 3, on the server: every sender's message aligned to the receiver's tokens and averaged;
    with the bytes sent back to the receiver."""
    r_tok = tokenizer_for(client_config(cfg, receiver))
    mine = [encode_text(r_tok, t, cfg.data.max_length) for t in texts]
    per_sender = []
    for sender, sent in messages.items():
        bridge = VocabularyBridge(tokenizer_for(client_config(cfg, sender)), r_tok)
        temperature = cfg.train.distill_temperature
        per_sender.append([align(m, bridge, r, temperature) for m, r in zip(sent, mine, strict=True)])
    fused = [fuse(list(rows)) for rows in zip(*per_sender, strict=True)]
    return fused, targets_bytes(fused)


def distill_public(
    cfg: FedConfig,
    client: int,
    round_: int,
    private_dir: str | Path,
    texts: list[TextExample],
    targets: list[list[Target]],
) -> dict[str, Any]:
    """Step 4: the client distills the fused teacher into its own adapter on the public texts."""
    tokenizer = tokenizer_for(cfg)
    encoded = attach([encode_text(tokenizer, t, cfg.data.max_length) for t in texts], targets)
    model = _model(cfg, private_dir, round_)
    seed = client_seed(cfg.train.seed + 1, round_, client)
    steps = cfg.distill.public_steps
    result = local_train(model, encoded, cfg.train, pad_id=tokenizer.pad_token_id, seed=seed, steps=steps)
    _save(model, private_dir, round_)
    return {"client": client, "distill_loss": result.mean_loss, "aligned_share": aligned_share(targets)}
