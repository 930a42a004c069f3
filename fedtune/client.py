"""One client's part of a round: start from the global adapter, train locally, emit the update.

Only the update (local - global) leaves this function, as a safetensors file whose length is
the upload cost; the client's data never does.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from fedtune.adapters import (
    AdapterState,
    add,
    get_adapter_state,
    load_state,
    save_state,
    set_adapter_state,
    subtract,
)
from fedtune.client_secret import private_seed
from fedtune.compression import compress
from fedtune.config import FedConfig
from fedtune.evaluation import loss_and_perplexity
from fedtune.faults import crash_point
from fedtune.federation import client_seed
from fedtune.hetero_rank import client_section, rank_of, truncate
from fedtune.personalization import personal, shared
from fedtune.record_dp import DPSGD, Ledger
from fedtune.runtime import build_peft_model, load_encoded, tokenizer_for
from fedtune.strategies import build_strategy
from fedtune.teachers import with_teacher_targets
from fedtune.training import local_train, total_steps
from fedtune.validation import write_update
from fedtune.watermark import Combined, WatermarkTerm, bit_error_rate, owner_key


def own_state(private_dir: str | Path, round_: int, kind: str = "strategy") -> AdapterState | None:
    """The client's state of `kind` (its strategy's, or compression's residual) after its latest
    round before `round_` (one file per round, so a round that is run again starts from the same
    state), or None before its first."""
    files = sorted(Path(private_dir).glob(f"{kind}/round_*.safetensors"))
    earlier = [f for f in files if int(f.stem.removeprefix("round_")) < round_]
    return load_state(earlier[-1]) if earlier else None


def _own_file(private_dir: str | Path, kind: str, round_: int) -> Path:
    return Path(private_dir) / kind / f"round_{round_:04d}.safetensors"


def _personalized_start(
    cfg: FedConfig, model: Any, global_state: AdapterState, private_dir: str | Path, round_: int, val: Any, pad_id: int
) -> tuple[AdapterState, dict[str, float]]:
    """The global adapter with this client's own personal tensors put back (from its latest round),
    and, on its validation split before training, that personalized model against the global one."""
    tick = time.perf_counter()
    mine = own_state(private_dir, round_, "personal") or {}
    start = {**global_state, **mine}
    batch = cfg.eval.batch_size
    scores = {"val_loss_global": loss_and_perplexity(model, val, batch_size=batch, pad_id=pad_id)["loss"]}
    if mine:
        set_adapter_state(model, start)
        scores["val_loss_personal"] = loss_and_perplexity(model, val, batch_size=batch, pad_id=pad_id)["loss"]
    else:  # before its first round a client has nothing of its own yet
        scores["val_loss_personal"] = scores["val_loss_global"]
    return start, {**scores, "val_seconds": time.perf_counter() - tick}


def _on_the_wire(
    cfg: FedConfig, update: AdapterState, private_dir: str | Path, round_: int, client: int
) -> AdapterState:
    """The update as compressed for sending; top-k's left-out part waits in the client's folder
    and joins its next update (error feedback)."""
    section = cfg.compression
    if section.method == "none":
        return update
    residual = own_state(private_dir, round_, "residual")
    target = add(update, residual) if residual else update
    generator = torch.Generator().manual_seed(client_seed(cfg.train.seed, round_, client))
    sent, left = compress(target, section.method, fraction=section.topk_fraction, generator=generator)
    if left:
        save_state(left, _own_file(private_dir, "residual", round_))
    return sent


def train_client(
    cfg: FedConfig,
    *,
    client: int,
    round_: int,
    global_path: str | Path,
    update_path: str | Path,
    private_dir: str | Path,
    server_view_path: str | Path | None = None,
) -> dict[str, Any]:
    """`private_dir` is the client's own folder (its secret, its privacy ledger, its strategy
    state); `server_view_path` what the strategy shares of the server's state (`client_view`)."""
    rank = rank_of(cfg.peft, client)
    lower = rank < cfg.peft.r
    if lower:  # HetLoRA: this client trains the leading components only, at the global scale
        cfg = cfg.model_copy(update={"peft": client_section(cfg.peft, rank)})
    tokenizer = tokenizer_for(cfg)
    train = load_encoded(cfg, tokenizer, client, "train")
    val = load_encoded(cfg, tokenizer, client, "val")
    if client in cfg.distill.teachers:  # the mentee route: this client's own model teaches the mentee
        train = with_teacher_targets(cfg, client, train, tokenizer.pad_token_id)
    steps = total_steps(cfg.train, len(train))
    privacy: dict[str, float] = {}
    dp = None
    if cfg.record_dp.enabled:
        ledger = Ledger.load(private_dir)
        rate = DPSGD.sample_rate(cfg.train.batch_size, len(train))
        ledger.charge(cfg.record_dp, (cfg.record_dp.noise_multiplier, rate, steps), client)
        dp = (cfg.record_dp, private_seed(private_dir, round_, "dp-sgd"))
        privacy = {"record_epsilon": ledger.epsilon(cfg.record_dp)}
    global_state = load_state(global_path)
    if lower:
        global_state = truncate(global_state, rank)
    view = load_state(server_view_path) if server_view_path else {}
    strategy, own = build_strategy(cfg), own_state(private_dir, round_)
    model = build_peft_model(cfg, global_state)
    compared: dict[str, float]
    start, compared = global_state, {}
    if cfg.federation.personal_modules:
        start, compared = _personalized_start(
            cfg, model, global_state, private_dir, round_, val, tokenizer.pad_token_id
        )
    objective = strategy.local_objective(start, view, own)
    key = None
    if client in cfg.watermark.clients:  # an owner signs what it trains
        key = owner_key(private_dir, start, cfg.watermark)
        objective = Combined(objective, WatermarkTerm(key, cfg.watermark, start))
    result = local_train(
        model,
        train,
        cfg.train,
        pad_id=tokenizer.pad_token_id,
        seed=client_seed(cfg.train.seed, round_, client),
        steps=steps,
        objective=objective,
        desc=f"round {round_} client {client}",
        dp=dp,
    )
    crash_point("training", round_)  # after the optimizer steps, before the update exists
    local_state = get_adapter_state(model)
    extras, next_own = strategy.client_step(start, local_state, view, own, steps, cfg.train.lr)
    delta = subtract(local_state, start)
    if cfg.federation.personal_modules:  # the personal tensors stay here; only the shared ones travel
        save_state(personal(local_state, cfg.federation.personal_modules), _own_file(private_dir, "personal", round_))
        delta = shared(delta, cfg.federation.personal_modules)
    update = _on_the_wire(cfg, delta, private_dir, round_, client)
    bytes_up = write_update(update, update_path, round_=round_, client=client, extras=extras)
    if next_own:
        save_state(next_own, _own_file(private_dir, "strategy", round_))
    tick = time.perf_counter()
    val_metrics = loss_and_perplexity(model, val, batch_size=cfg.eval.batch_size, pad_id=tokenizer.pad_token_id)
    val_seconds = time.perf_counter() - tick + compared.pop("val_seconds", 0.0)
    if key is not None:
        compared["watermark_ber_local"] = bit_error_rate(local_state, key)
    return {
        "client": client,
        "round": round_,
        "update_path": str(update_path),
        "num_examples": len(train),
        "bytes_up": bytes_up,
        "bytes_down": Path(global_path).stat().st_size,
        "train_loss": result.mean_loss,
        "train_loss_first": result.first_loss,
        "train_loss_last": result.last_loss,
        "val_loss": val_metrics["loss"],
        "steps": result.steps,
        "tokens": result.tokens,
        "seconds": result.seconds,
        "val_seconds": val_seconds,
        **compared,
        **privacy,
    }
