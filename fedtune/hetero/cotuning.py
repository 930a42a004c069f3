"""FedCoLLM (FATE-LLM): a server-side larger model and the clients' small one teach each other.

Clients federate LoRA on a small model as usual. After each aggregation the server, on public
data, (1) distills the aggregated small model into its own large model's adapter and then (2)
distills the large model back into the aggregated small adapter, which becomes the round's
global: clients receive a small model improved by the large one, and never see the large one.
Both directions use the messages of `distillation` (top-k logits aligned by characters), so the
two models need not share a tokenizer. The large model's adapter stays in the server's folder,
one file per round (a repeated round starts from the previous one's).
"""

from __future__ import annotations

from pathlib import Path

from fedtune.config.schema import FedConfig
from fedtune.hetero.knowledge_transfer import public_texts
from fedtune.model.adapters import AdapterState, get_adapter_state, save_state
from fedtune.model.builder import build_peft_model, initial_adapter_state, tokenizer_for
from fedtune.training.client_feature import own_state
from fedtune.training.distillation import (
    VocabularyBridge,
    align,
    aligned_share,
    attach,
    encode_text,
    message,
    top_k,
)
from fedtune.training.loop import local_train


def server_config(cfg: FedConfig) -> FedConfig:
    path = cfg.distill.server_model
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"name_or_path": path, "source": None})})


def co_tune(
    cfg: FedConfig, global_state: AdapterState, server_dir: str | Path, round_: int
) -> tuple[AdapterState, dict[str, float]]:
    """The round's global after mutual distillation with the server's model; the server's adapter
    is saved in `server_dir`."""
    texts = public_texts(cfg)
    large_cfg = server_config(cfg)
    small = build_peft_model(cfg, global_state)
    large = build_peft_model(
        large_cfg, own_state(server_dir, round_, "server_adapter") or initial_adapter_state(large_cfg)[0]
    )
    small_tok, large_tok = tokenizer_for(cfg), tokenizer_for(large_cfg)
    small_enc = [encode_text(small_tok, t, cfg.data.max_length) for t in texts]
    large_enc = [encode_text(large_tok, t, cfg.data.max_length) for t in texts]
    metrics = {}
    for name, (teacher, t_tok, t_enc), (student, s_tok, s_enc), seed in (
        ("server", (small, small_tok, small_enc), (large, large_tok, large_enc), 1),
        ("global", (large, large_tok, large_enc), (small, small_tok, small_enc), 2),
    ):
        picks = top_k(teacher, t_enc, k=cfg.distill.top_k, pad_id=t_tok.pad_token_id, batch_size=cfg.eval.batch_size)
        bridge = VocabularyBridge(t_tok, s_tok)
        targets = [
            align(m, bridge, e, cfg.train.distill_temperature)
            for m, e in zip(message(t_enc, picks), s_enc, strict=True)
        ]
        result = local_train(
            student,
            attach(s_enc, targets),
            cfg.train,
            pad_id=s_tok.pad_token_id,
            seed=cfg.train.seed + 1000 * round_ + seed,
            steps=cfg.distill.public_steps,
            desc=f"co-tune {name}",
        )
        metrics[f"cotune/{name}_distill_loss"] = result.mean_loss
        metrics[f"cotune/{name}_aligned_share"] = aligned_share(targets)
    save_state(get_adapter_state(large), Path(server_dir) / "server_adapter" / f"round_{round_:04d}.safetensors")
    return get_adapter_state(small), metrics
