"""Local training of a PEFT model on one client's data: AdamW, LR schedule, accumulation, clipping.

Seeded: the batch order comes from a local `torch.Generator`, and the global torch seed (used
by dropout) is set from the same seed, so a client's round is reproducible when clients run
one at a time.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from peft import PeftModel
from tqdm.auto import tqdm
from transformers import get_scheduler

from fedtune.config.schema import RecordDPSection, TrainSection
from fedtune.core.catalog import OBJECTIVES
from fedtune.data.prompts import collate
from fedtune.model.adapters import trainable_parameters
from fedtune.training.dpsgd import DPSGD, poisson_sample
from fedtune.training.loss_terms import LocalObjective
from fedtune.training.losses import per_example_loss

Encoded = list[dict[str, list[int]]]


@dataclass(frozen=True)
class TrainResult:
    steps: int
    examples: int  # examples processed, counting repeats
    tokens: int  # non-padding tokens processed
    first_loss: float
    mean_loss: float
    last_loss: float
    seconds: float


def total_steps(cfg: TrainSection, num_examples: int, rounds: int = 1) -> int:
    """Optimizer steps for `rounds` rounds' worth of local training on `num_examples`."""
    if cfg.steps_per_round is not None:
        return cfg.steps_per_round * rounds
    per_epoch = math.ceil(num_examples / (cfg.batch_size * cfg.grad_accum))
    return max(1, math.ceil(per_epoch * (cfg.epochs_per_round or 1.0) * rounds))


def _windows(data: Encoded, batch_size: int, grad_accum: int, generator: torch.Generator):
    """Endless optimizer-step windows of batch_size * grad_accum shuffled examples (a new
    permutation each epoch, whose last window may be short), each cut into micro-batches of
    batch_size: accumulation changes how a step is computed, never which examples it sees."""
    size = batch_size * grad_accum
    while True:
        order = torch.randperm(len(data), generator=generator).tolist()
        for start in range(0, len(order), size):
            chunk = order[start : start + size]
            yield [[data[i] for i in chunk[m : m + batch_size]] for m in range(0, len(chunk), batch_size)]


def local_train(
    model: PeftModel,
    data: Encoded,
    cfg: TrainSection,
    *,
    pad_id: int,
    seed: int,
    steps: int,
    objective: LocalObjective | None = None,
    desc: str = "train",
    dp: tuple[RecordDPSection, int] | None = None,
) -> TrainResult:
    """Train `steps` optimizer steps; with `dp` = (settings, private noise seed), by DP-SGD."""
    if not data:
        raise ValueError("no training examples left after tokenization (check data.max_length)")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    named = trainable_parameters(model)  # keyed as the adapter state is, for the strategies' loss terms
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=steps)
    objective = objective or LocalObjective()
    task = OBJECTIVES.get(cfg.objective)
    if dp is not None:
        if objective.extra_loss(named) is not None:
            raise ValueError("record_dp: the strategy adds a loss on the weights, which DP-SGD cannot clip per example")
        return _dp_train(model, data, cfg, dp, pad_id, generator, steps, scheduler, desc)
    windows = _windows(data, cfg.batch_size, cfg.grad_accum, generator)
    losses: list[float] = []
    examples = tokens = 0
    start = time.perf_counter()
    model.train()
    for _ in tqdm(range(steps), desc=desc, leave=False, mininterval=2.0):
        step_loss = 0.0
        window = next(windows)
        # The step's loss is the mean over all the window's units (label tokens; DPO's pairs), so
        # each micro-batch's mean weighs by its share of them: batch b x accumulation k is the step
        # of batch b*k, however unequal the micro-batches' answers are (transformers#24725).
        # (one micro-batch is its own whole window: no need to count, and collate, twice)
        units = [task.units(batch, pad_id) for batch in window] if len(window) > 1 else [1]
        for examples_in_batch, share in zip(window, [n / max(sum(units), 1) for n in units], strict=True):
            loss, batch_tokens = task.loss(model, examples_in_batch, pad_id, cfg)
            extra = objective.extra_loss(named)  # a term of the step, added once over the window
            total = loss * share if extra is None else loss * share + extra / len(window)
            total.backward()
            step_loss += loss.item() * share
            examples += len(examples_in_batch)
            tokens += batch_tokens
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
    model.eval()
    return _result(steps, examples, tokens, losses, start)


def _result(steps: int, examples: int, tokens: int, losses: list[float], start: float) -> TrainResult:
    losses = losses or [float("nan")]
    return TrainResult(
        steps=steps,
        examples=examples,
        tokens=tokens,
        first_loss=losses[0],
        mean_loss=sum(losses) / len(losses),
        last_loss=losses[-1],
        seconds=time.perf_counter() - start,
    )


def _dp_train(
    model: PeftModel,
    data: Encoded,
    cfg: TrainSection,
    dp: tuple[RecordDPSection, int],
    pad_id: int,
    generator: torch.Generator,
    steps: int,
    scheduler: Any,
    desc: str,
) -> TrainResult:
    """DP-SGD steps: Poisson-sampled batches, per-example clipping and noise (see record_dp)."""
    settings, noise_seed = dp
    engine = DPSGD(model, scheduler.optimizer, settings, cfg.batch_size, noise_seed)
    rate = DPSGD.sample_rate(cfg.batch_size, len(data))
    losses: list[float] = []
    examples = tokens = 0
    start = time.perf_counter()
    model.train()
    try:
        for _ in tqdm(range(steps), desc=desc, leave=False, mininterval=2.0):
            sample = poisson_sample(data, rate, generator)
            batch = collate(sample, pad_id) if sample else None
            loss = engine.step(batch, partial(per_example_loss, model))
            if batch is not None and loss is not None:
                losses.append(loss)
                examples += len(sample)
                tokens += int(batch["attention_mask"].sum())
            scheduler.step()
    finally:
        engine.close()
        model.eval()
    return _result(steps, examples, tokens, losses, start)
