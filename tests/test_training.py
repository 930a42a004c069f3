import pytest
import torch

from fedtune.config.schema import ConfigError, load_config
from fedtune.data.loading import load_records
from fedtune.model.adapters import get_adapter_state
from fedtune.model.builder import build_peft_model, tokenizer_for
from fedtune.training.evaluation import exact_match, extract_answer, loss_and_perplexity
from fedtune.training.loop import local_train, total_steps
from fedtune.training.tokenized import encode_records


def _setup(config):  # type: ignore[no-untyped-def]
    tokenizer = tokenizer_for(config)
    records = load_records(config.data)
    return tokenizer, records, encode_records(config, tokenizer, records)


def test_local_training_lowers_the_loss_and_is_seeded(tiny_config) -> None:  # type: ignore[no-untyped-def]
    tokenizer, _, data = _setup(tiny_config)
    model = build_peft_model(tiny_config)
    before = loss_and_perplexity(model, data, batch_size=16, pad_id=tokenizer.pad_token_id)["loss"]
    result = local_train(model, data, tiny_config.train, pad_id=tokenizer.pad_token_id, seed=3, steps=30)
    after = loss_and_perplexity(model, data, batch_size=16, pad_id=tokenizer.pad_token_id)["loss"]
    assert after < 0.9 * before
    assert result.steps == 30 and result.examples == 30 * tiny_config.train.batch_size and result.tokens > 0

    start = get_adapter_state(build_peft_model(tiny_config))
    finals = []
    for seed in (5, 5, 6):
        model = build_peft_model(tiny_config, start)
        local_train(model, data, tiny_config.train, pad_id=tokenizer.pad_token_id, seed=seed, steps=3)
        finals.append(get_adapter_state(model))
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in start)  # same seed, same result
    assert not all(torch.equal(finals[0][k], finals[2][k]) for k in start)  # another seed, another order


def test_the_evaluation_loss_is_the_token_weighted_mean_whatever_the_batches(tiny_config) -> None:  # type: ignore[no-untyped-def]
    """Rows are batched by length to save padding; the loss stays the mean over every response token."""
    from fedtune.data.prompts import collate
    from fedtune.training.losses import response_loss

    tokenizer, _, data = _setup(tiny_config)
    model = build_peft_model(tiny_config).eval()
    with torch.no_grad():
        alone = [response_loss(model, collate([row], tokenizer.pad_token_id)) for row in data[:40]]
    mean = sum(float(total) for total, _ in alone) / sum(count for _, count in alone)
    for batch_size in (1, 7, 16):
        loss = loss_and_perplexity(model, data[:40], batch_size=batch_size, pad_id=tokenizer.pad_token_id)["loss"]
        assert loss == pytest.approx(mean, rel=1e-5)


def test_grad_accumulation_and_epoch_budget(tiny_config) -> None:  # type: ignore[no-untyped-def]
    tokenizer, _, data = _setup(tiny_config)
    cfg = tiny_config.train.model_copy(update={"grad_accum": 2, "steps_per_round": None, "epochs_per_round": 1.0})
    steps = total_steps(cfg, len(data))
    assert steps == -(-len(data) // (cfg.batch_size * 2))
    result = local_train(build_peft_model(tiny_config), data, cfg, pad_id=tokenizer.pad_token_id, seed=0, steps=steps)
    assert result.examples == steps * cfg.batch_size * 2


def test_exact_match_scores_each_batched_answer_as_if_generated_alone(tiny_config) -> None:  # type: ignore[no-untyped-def]
    """References set to the model's own greedy answers (each generated alone) score 1, others 0,
    in left-padded batches of prompts of different lengths: 3 of 5 right is accuracy 0.6, and the
    per-label split says which."""
    skills = ["compare", "sort", "last_letter", "uppercase"]  # what the fixture model was pretrained on:
    synthetic = tiny_config.data.synthetic.model_copy(update={"skills": skills})  # its answers differ
    tokenizer, records, _ = _setup(
        tiny_config.model_copy(update={"data": tiny_config.data.model_copy(update={"synthetic": synthetic})})
    )
    model = build_peft_model(tiny_config)

    def score(chosen, batch_size):  # type: ignore[no-untyped-def]
        return exact_match(model, tokenizer, chosen, system_prompt=None, max_new_tokens=3, batch_size=batch_size)

    first_by_answer = {}  # prompts whose own answers differ, so an answer given to another row shows
    for record in records[:: max(1, len(records) // 40)]:
        first_by_answer.setdefault(score([record], 1)["samples"][0]["answer"], record)
    assert len(first_by_answer) >= 5, first_by_answer.keys()
    # longest first: exact_match batches them shortest first, and must score and show each in its place
    chosen = sorted(first_by_answer.values(), key=lambda r: -len(r["messages"][-2]["content"]))[:5]
    assert len({len(r["messages"][-2]["content"]) for r in chosen}) > 1  # the batch needs padding
    alone = [score([r], 1)["samples"][0]["answer"] for r in chosen]

    def answered(record, answer, label):  # type: ignore[no-untyped-def]
        messages = [*record["messages"][:-1], {"role": "assistant", "content": answer}]
        return {**record, "messages": messages, "label": label}

    mixed = [answered(r, a, "right") for r, a in zip(chosen[:3], alone, strict=False)]
    mixed += [answered(r, a + " 9", "wrong") for r, a in zip(chosen[3:], alone[3:], strict=True)]
    result = score(mixed, 4)
    assert result["accuracy"] == pytest.approx(3 / 5)
    assert result["per_label"] == {"right": 1.0, "wrong": 0.0}
    assert [s["answer"] for s in result["samples"]] == alone
    assert tokenizer.padding_side == "right"  # restored for training


def test_an_answer_pattern_compares_only_the_final_answers() -> None:
    pattern = r"####\s*([-\d.,]+)"
    reference = "48/2 = <<48/2=24>>24 in May.\n48+24 = 72 in all.\n#### 72"
    assert extract_answer(reference, pattern) == "72"
    assert extract_answer("so 70 + 2 gives\n#### 72\n#### 9", pattern) == extract_answer(reference, pattern)
    assert extract_answer("The answer is 72", pattern) is None  # no marker: scored wrong, not guessed
    assert extract_answer(" Sports \n", None) == "Sports"
    assert extract_answer("label: World", r"World|Sports") == "World"  # no group: the whole match
    with pytest.raises(ConfigError, match="eval.answer_pattern"):
        load_config(None, ["eval.answer_pattern=([unclosed"])


def test_windowed_response_loss_equals_the_full_logits_loss(tiny_config) -> None:  # type: ignore[no-untyped-def]
    from fedtune.data.prompts import collate
    from fedtune.training.losses import response_loss

    tokenizer, _, data = _setup(tiny_config)
    model = build_peft_model(tiny_config)
    batch = collate(data[:7], tokenizer.pad_token_id)
    with torch.no_grad():
        total, count = response_loss(model, batch)
        reference = model(**batch).loss  # transformers' own loss over all positions
    assert count == int((batch["labels"][:, 1:] != -100).sum())
    assert float(total / count) == pytest.approx(float(reference), rel=1e-5)


def _step_gradient(model, data, train, pad_id, start, steps=1):  # type: ignore[no-untyped-def]
    """The summed gradient `steps` `local_train` optimizer steps apply (captured by hooks)."""
    from fedtune.model.adapters import set_adapter_state

    set_adapter_state(model, start)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    sums = {n: torch.zeros_like(p) for n, p in named.items()}
    hooks = [p.register_hook(lambda g, n=n: sums[n].add_(g)) for n, p in named.items()]
    local_train(model, data, train, pad_id=pad_id, seed=0, steps=steps)
    for hook in hooks:
        hook.remove()
    return torch.cat([sums[n].flatten() for n in sorted(sums)])


@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_gradient_accumulation_is_the_big_batch_step(tiny_config, objective) -> None:  # type: ignore[no-untyped-def]
    """Batch 4 x accumulation 2 gives batch 8's gradient, also when one micro-batch holds one-token
    answers and the other long ones (the seed-0 order puts records 0-3 in different halves, so the
    lengths are spread by the order itself: case 01)."""
    tokenizer = tokenizer_for(tiny_config)
    order = torch.randperm(8, generator=torch.Generator().manual_seed(0)).tolist()
    answers = ["7", "12", "3", "40"] + [" ".join(str(i * j) for j in range(12)) for i in range(4)]
    slots = [""] * 8
    for position, text in zip(order, answers, strict=True):
        slots[position] = text
    records = [
        {
            "messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": text}],
            "rejected": "no",
        }
        for i, text in enumerate(slots)
    ]
    cfg = tiny_config.model_copy(
        update={"train": tiny_config.train.model_copy(update={"objective": objective, "max_grad_norm": None})}
    )
    data = encode_records(cfg, tokenizer, records)
    assert len(data) == 8
    torch.manual_seed(0)
    model = build_peft_model(cfg)
    start = get_adapter_state(model)
    pad = tokenizer.pad_token_id
    big = _step_gradient(model, data, cfg.train.model_copy(update={"batch_size": 8, "lr": 1e-12}), pad, start)
    accumulated = _step_gradient(
        model, data, cfg.train.model_copy(update={"batch_size": 4, "grad_accum": 2, "lr": 1e-12}), pad, start
    )
    assert float((accumulated - big).norm() / big.norm()) < 1e-5
    # across epochs too: 10 examples give windows of 8 and 2, whatever the micro-batches (review)
    more = encode_records(cfg, tokenizer, records + records[:2])
    big = _step_gradient(model, more, cfg.train.model_copy(update={"batch_size": 8, "lr": 1e-12}), pad, start, 3)
    accumulated = _step_gradient(
        model, more, cfg.train.model_copy(update={"batch_size": 4, "grad_accum": 2, "lr": 1e-12}), pad, start, 3
    )
    assert float((accumulated - big).norm() / big.norm()) < 1e-5
