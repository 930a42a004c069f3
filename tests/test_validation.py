"""Every kind of bad update is refused with an error naming the client (and tensor)."""

import pytest
import torch

from fedtune.config.schema import build_config
from fedtune.model.adapters import save_state
from fedtune.round.envelope import RoundAborted, UpdateRejected, UpdateValidator, write_update
from fedtune.round.server import aggregate_reports

GLOBAL = {"layer.lora_A.weight": torch.zeros(4, 8), "layer.lora_B.weight": torch.zeros(8, 4)}


def _update(scale: float = 1.0) -> dict[str, torch.Tensor]:
    return {k: torch.full_like(v, scale) for k, v in GLOBAL.items()}


def _validator() -> UpdateValidator:
    return UpdateValidator(GLOBAL, round=3, max_bytes=4096, max_examples=1000)


def _rejected(tmp_path, state, *, round_=3, client=1, examples=10, validator=None):  # type: ignore[no-untyped-def]
    path = tmp_path / "u.safetensors"
    write_update(state, path, round_=round_, client=client)
    with pytest.raises(UpdateRejected) as info:
        (validator or _validator()).check(1, path, examples)
    assert info.value.client == 1
    return info.value


def test_a_well_formed_update_passes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "u.safetensors"
    write_update(_update(0.5), path, round_=3, client=1)
    assert torch.equal(_validator().check(1, path, 10)["layer.lora_A.weight"], torch.full((4, 8), 0.5))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_name_the_tensor(tmp_path, bad) -> None:  # type: ignore[no-untyped-def]
    state = _update()
    state["layer.lora_B.weight"][2, 1] = bad
    error = _rejected(tmp_path, state)
    assert error.tensor == "layer.lora_B.weight" and "NaN or Inf" in str(error)


def test_shape_dtype_and_key_problems(tmp_path) -> None:  # type: ignore[no-untyped-def]
    wrong_shape = {**_update(), "layer.lora_A.weight": torch.zeros(4, 9)}
    assert "shape (4, 9)" in str(_rejected(tmp_path, wrong_shape))
    wrong_dtype = {**_update(), "layer.lora_A.weight": torch.zeros(4, 8, dtype=torch.float16)}
    assert "dtype torch.float16" in str(_rejected(tmp_path, wrong_dtype))
    missing = {"layer.lora_A.weight": torch.zeros(4, 8)}
    assert _rejected(tmp_path, missing).tensor == "layer.lora_B.weight"
    extra = {**_update(), "layer.base.weight": torch.zeros(2)}
    assert "unexpected tensor" in str(_rejected(tmp_path, extra))


def test_example_counts_and_payload_size(tmp_path) -> None:  # type: ignore[no-untyped-def]
    for examples in (0, -5, 10**9):
        assert "example count" in str(_rejected(tmp_path, _update(), examples=examples))
    big = {k: torch.zeros(64, 64) for k in GLOBAL}
    assert "exceeds the limit" in str(_rejected(tmp_path, big))
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(UpdateRejected, match="unreadable payload"):
        _validator().check(1, tmp_path / "junk.safetensors", 10)


def test_stale_misaddressed_and_replayed_updates(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert "for round 2, not 3" in str(_rejected(tmp_path, _update(), round_=2))
    assert "signed for client 4" in str(_rejected(tmp_path, _update(), client=4))
    validator = _validator()
    path = tmp_path / "u.safetensors"
    write_update(_update(), path, round_=3, client=1)
    validator.check(1, path, 10)
    with pytest.raises(UpdateRejected, match="replayed nonce"):
        validator.check(1, path, 10)  # the same file sent twice
    save_state(_update(), tmp_path / "plain.safetensors")  # no envelope at all
    with pytest.raises(UpdateRejected, match="round None"):
        validator.check(1, tmp_path / "plain.safetensors", 10)


def test_round_goes_on_with_enough_valid_updates_and_aborts_otherwise(tmp_path) -> None:  # type: ignore[no-untyped-def]
    reports = []
    for client, scale in enumerate([1.0, 3.0, float("nan")]):
        path = tmp_path / f"c{client}.safetensors"
        write_update(_update(scale), path, round_=3, client=client)
        reports.append({"client": client, "update_path": str(path), "num_examples": 10})
    config = build_config({"federation": {"min_fit_clients": 2}})
    new_global, _, left_out = aggregate_reports(config, 3, GLOBAL, reports, {}, ["client 5: training failed"])
    assert torch.allclose(new_global["layer.lora_A.weight"], torch.full((4, 8), 2.0))  # mean of 1 and 3
    assert left_out[0] == "client 5: training failed" and "client 2 tensor" in left_out[1]
    strict = build_config({"federation": {"min_fit_clients": 3}})
    with pytest.raises(RoundAborted, match="2 valid updates, federation.min_fit_clients is 3"):
        aggregate_reports(strict, 3, GLOBAL, reports, {})
