import pytest
import torch

from fedtune.core.catalog import STRATEGIES
from fedtune.strategies.base import ClientUpdate
from fedtune.strategies.fedavg import FedAvg, weighted_average


def test_weighted_average_hand_computed() -> None:
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.0]])}
    b = {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([[4.0]])}
    out = weighted_average([a, b], [1, 3])  # (1*a + 3*b) / 4
    assert torch.equal(out["w"], torch.tensor([2.5, 5.0]))
    assert torch.equal(out["b"], torch.tensor([[3.0]]))


def test_fedavg_adds_example_weighted_mean_update_and_leaves_inputs_alone() -> None:
    global_state = {"w": torch.tensor([10.0, 10.0])}
    updates = [
        ClientUpdate(0, {"w": torch.tensor([1.0, -1.0])}, num_examples=100),
        ClientUpdate(1, {"w": torch.tensor([4.0, 2.0])}, num_examples=50),
    ]
    new, server = FedAvg().aggregate(global_state, updates, {})
    # mean update = (100*[1,-1] + 50*[4,2]) / 150 = [2, 0]
    assert torch.allclose(new["w"], torch.tensor([12.0, 10.0]))
    assert torch.equal(global_state["w"], torch.tensor([10.0, 10.0]))
    assert torch.equal(updates[0].delta["w"], torch.tensor([1.0, -1.0]))
    assert server == {}


def test_weighted_average_rejects_bad_weights() -> None:
    with pytest.raises(ValueError):
        weighted_average([], [])
    with pytest.raises(ValueError):
        weighted_average([{"w": torch.zeros(1)}], [0])


def test_registry_rejects_unknown_names() -> None:
    assert STRATEGIES.get("fedavg") is FedAvg
    with pytest.raises(ValueError, match="unknown strategy 'fedadgrad'"):
        STRATEGIES.get("fedadgrad")
