import torch

from fedtune.core.sampling import sample_clients
from fedtune.round.checkpoints import Checkpoint, checkpoint_dir, latest_checkpoint, save_checkpoint


def test_sampling_is_a_pure_function_of_seed_and_round() -> None:
    assert sample_clients(10, 4, seed=1, round_=3) == sample_clients(10, 4, seed=1, round_=3)
    draws = {tuple(sample_clients(10, 4, seed=1, round_=r)) for r in range(1, 20)}
    assert len(draws) > 10
    assert all(len(set(d)) == 4 and max(d) < 10 for d in draws)
    assert sample_clients(3, 3, seed=0, round_=1) == [0, 1, 2]


def _checkpoint(round_: int) -> Checkpoint:
    return Checkpoint(
        round_, {"w": torch.full((3,), float(round_))}, {"m": torch.ones(2)}, [{"round": round_}], {"id": "x"}
    )


def test_checkpoint_round_trip_and_damaged_latest_is_skipped(tmp_path) -> None:  # type: ignore[no-untyped-def]
    for r in (1, 2):
        save_checkpoint(_checkpoint(r), tmp_path)
    loaded = latest_checkpoint(tmp_path)
    assert loaded is not None and loaded.round == 2 and torch.equal(loaded.global_state["w"], torch.full((3,), 2.0))
    assert loaded.meta == {"id": "x"} and torch.equal(loaded.server_state["m"], torch.ones(2))
    damaged = checkpoint_dir(tmp_path, 2) / "global.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-7])  # truncated write
    fallback = latest_checkpoint(tmp_path)
    assert fallback is not None and fallback.round == 1
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


def test_no_checkpoint_means_none(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert latest_checkpoint(tmp_path) is None
