"""Record-level DP-SGD inside a client: Opacus per-example gradients through our loss, clipping,
noise calibration, and the client's privacy ledger."""

import pytest
import torch

from fedtune.config.schema import ConfigError, RecordDPSection, build_config
from fedtune.data.loading import load_records
from fedtune.data.prompts import collate
from fedtune.model.adapters import get_adapter_state
from fedtune.model.builder import build_peft_model, tokenizer_for
from fedtune.privacy.accounting import epsilon_of
from fedtune.privacy.record_dp import Ledger, PrivacyBudgetExhausted
from fedtune.training.dpsgd import DPSGD
from fedtune.training.loop import local_train
from fedtune.training.losses import per_example_loss
from fedtune.training.tokenized import encode_records


def _setup(config):  # type: ignore[no-untyped-def]
    tokenizer = tokenizer_for(config)
    data = encode_records(config, tokenizer, load_records(config.data))
    model = build_peft_model(config)
    return model, data, tokenizer.pad_token_id


def _engine(model, clip: float, z: float, batch_size: int = 4) -> DPSGD:  # type: ignore[no-untyped-def]
    params = [p for p in model.parameters() if p.requires_grad]
    settings = RecordDPSection(enabled=True, noise_multiplier=z, max_grad_norm=clip)
    return DPSGD(model, torch.optim.SGD(params, lr=0.0), settings, batch_size, seed=7)


def test_per_example_gradients_match_one_example_at_a_time(tiny_config) -> None:  # type: ignore[no-untyped-def]
    model, data, pad = _setup(tiny_config)
    examples = data[:3]
    engine = _engine(model, clip=1.0, z=1.0)
    per_example_loss(model, collate(examples, pad)).mean().backward()
    samples = {n: p.grad_sample.clone() for n, p in model.named_parameters() if p.requires_grad}
    engine.close()
    for i, example in enumerate(examples):
        model.zero_grad(set_to_none=True)
        per_example_loss(model, collate([example], pad)).sum().backward()
        for name, p in model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(samples[name][i], p.grad, rtol=1e-3, atol=1e-6)


def test_each_example_is_clipped_and_the_noise_has_std_z_c_over_batch(tiny_config) -> None:  # type: ignore[no-untyped-def]
    model, data, pad = _setup(tiny_config)
    params = [p for p in model.parameters() if p.requires_grad]
    clip, batch_size = 1e-3, 4
    engine = _engine(model, clip=clip, z=1e-9, batch_size=batch_size)
    per_example_loss(model, collate(data[:batch_size], pad)).mean().backward()
    engine.optimizer.pre_step()  # clip, sum, noise, divide by the expected batch size
    norm = torch.cat([p.grad.flatten() for p in params]).norm()
    assert float(norm) <= clip * (1 + 1e-4)
    engine.optimizer.zero_grad(set_to_none=True)
    engine.close()

    z, clip = 1.5, 0.8
    engine = _engine(model, clip=clip, z=z, batch_size=batch_size)
    noise = []
    while sum(t.numel() for t in noise) < 100_000:  # noise-only steps on empty Poisson samples
        for p in params:
            p.grad_sample = torch.zeros((0, *p.shape))
        engine.optimizer.pre_step()
        noise += [p.grad.flatten().clone() for p in params]
        engine.optimizer.zero_grad(set_to_none=True)
    engine.close()
    assert float(torch.cat(noise).std()) == pytest.approx(z * clip / batch_size, rel=0.01)


def test_ledger_matches_opacus_charges_before_training_and_declines_beyond_the_target(tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings = RecordDPSection(enabled=True, noise_multiplier=1.1, target_epsilon=3.0)
    ledger = Ledger.load(tmp_path)
    phase = (1.1, 8 / 200, 20)
    rounds = 0
    with pytest.raises(PrivacyBudgetExhausted, match="client 4: .* above record_dp.target_epsilon 3.0"):
        while True:
            Ledger.load(tmp_path).charge(settings, phase, client=4)  # reloaded each round, as a client would
            rounds += 1
    reloaded = Ledger.load(tmp_path)
    assert rounds > 1 and reloaded.history == [phase] * rounds
    assert reloaded.epsilon(settings) == pytest.approx(epsilon_of([(1.1, 8 / 200, 20 * rounds)], 1e-5))
    assert reloaded.epsilon(settings) <= 3.0 < reloaded.epsilon(settings, phase)
    assert ledger.history == []


def test_dp_sgd_training_runs_seeded_and_grad_accumulation_is_refused(tiny_config) -> None:  # type: ignore[no-untyped-def]
    settings = RecordDPSection(enabled=True, noise_multiplier=0.5, max_grad_norm=1.0)
    model, data, pad = _setup(tiny_config)
    start = get_adapter_state(model)
    finals = []
    for seed in (11, 11, 12):
        model = build_peft_model(tiny_config, start)
        result = local_train(model, data, tiny_config.train, pad_id=pad, seed=0, steps=4, dp=(settings, seed))
        finals.append(torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad]))
        assert result.steps == 4 and result.examples > 0
        assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters())
    assert torch.equal(finals[0], finals[1]) and not torch.equal(finals[0], finals[2])  # the private seed decides
    with pytest.raises(ConfigError, match="train.grad_accum: record_dp.enabled: .* must be 1"):
        build_config({"record_dp": {"enabled": True}, "train": {"grad_accum": 2}})
