"""The shared trunk's parts alone: which tensors it holds, the server optimiser against Flower's
own strategies, and low-rank updates that average exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAdam, FedYogi

from flexmoe.errors import FlexMoEError
from flexmoe.federated.server import ServerOptimizer, ServerOptimizerName
from flexmoe.federated.trunk import LowRank, LowRankDelta, shared_slots, trunk_keys
from flexmoe.merge.slots import SlotRecord, SlotTable


def _table(owners: list[str]) -> SlotTable:
    slots = [
        SlotRecord(
            slot=i,
            name=f"e{i}",
            owner=owner,
            license="CC0-1.0",
            package_sha256=None,
            bias=[0.0],
            manifest=None,
            signer=None,
        )
        for i, owner in enumerate(owners)
    ]
    return SlotTable(anchor_fingerprint="a", tokenizer_fingerprint="t", slots=slots)


def test_the_trunk_is_what_every_owner_shares() -> None:
    """Attention, norms, the public expert and the coordinator's rivals; never an owner's
    expert, the router, the embeddings or the output layer."""
    table = _table(["public", "coordinator", "Law Firm", "coordinator"])
    assert shared_slots(table) == [0, 1, 3]
    names = [
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.norm.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.q_norm.weight",
        "model.layers.0.post_attention_layernorm.weight",
        "model.layers.0.mlp.gate.weight",
        "model.layers.0.mlp.router.rows.2",
        *(f"model.layers.0.mlp.experts.{e}.up_proj.weight" for e in range(4)),
    ]
    assert trunk_keys(names, table) == sorted(
        [
            "model.norm.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.self_attn.q_norm.weight",
            "model.layers.0.post_attention_layernorm.weight",
            "model.layers.0.mlp.experts.0.up_proj.weight",
            "model.layers.0.mlp.experts.1.up_proj.weight",
            "model.layers.0.mlp.experts.3.up_proj.weight",
        ]
    )
    with_embeddings = trunk_keys(names, table, embeddings="all")
    assert set(with_embeddings) - set(trunk_keys(names, table)) == {
        "model.embed_tokens.weight",
        "lm_head.weight",
    }
    assert set(trunk_keys(names, table, embeddings="output")) - set(trunk_keys(names, table)) == {
        "lm_head.weight"
    }
    with pytest.raises(FlexMoEError, match="--trunk-embeddings"):
        trunk_keys(names, table, embeddings="some")


def _fit(weights: list[np.ndarray]) -> FitRes:
    status = Status(code=Code.OK, message="")
    return FitRes(status, ndarrays_to_parameters(weights), num_examples=1, metrics={})


@pytest.mark.parametrize(("name", "flower"), [("fedadam", FedAdam), ("fedyogi", FedYogi)])
def test_the_server_optimiser_steps_as_flowers_strategies(name: str, flower: type) -> None:
    """Three server steps on the same averages give Flower's weights. Flower's FedAdam
    corrects its bias with the round number plus one, ours with the step from 1: our step t is
    Flower's round t - 1."""
    rng = np.random.default_rng(0)
    start = [
        rng.standard_normal((3, 4)).astype(np.float32),
        rng.standard_normal(5).astype(np.float32),
    ]
    ours = ServerOptimizer(ServerOptimizerName(name), lr=0.05, beta1=0.9, beta2=0.99, tau=1e-3)
    strategy = flower(
        initial_parameters=ndarrays_to_parameters(start),
        eta=0.05,
        beta_1=0.9,
        beta_2=0.99,
        tau=1e-3,
    )
    weights = {str(i): torch.from_numpy(w.copy()) for i, w in enumerate(start)}
    state: dict[str, torch.Tensor] = {}
    current = start
    for t in range(1, 4):
        target = [w + 0.1 * rng.standard_normal(w.shape).astype(np.float32) for w in current]
        change = {str(i): torch.from_numpy(target[i] - current[i]) for i in range(len(target))}
        weights, state = ours.step(weights, change, state, t)
        found, _ = strategy.aggregate_fit(t - 1, [(None, _fit(target))], [])
        current = parameters_to_ndarrays(found)
        for i, array in enumerate(current):
            np.testing.assert_allclose(weights[str(i)].numpy(), array, rtol=1e-5, atol=1e-6)
    assert set(state) == {"m.0", "v.0", "m.1", "v.1"}


def test_server_optimiser_settings_are_checked_and_round_trip() -> None:
    adam = ServerOptimizer(ServerOptimizerName.FEDADAM, lr=3e-3)
    assert ServerOptimizer.from_dict(adam.to_dict()) == adam
    assert ServerOptimizer.of(adam.record(4)) == adam
    with pytest.raises(FlexMoEError, match="--server-lr"):
        ServerOptimizer(lr=0)
    with pytest.raises(FlexMoEError, match="--server-optimizer: must be one of fedavg"):
        ServerOptimizer.from_dict({"name": "fedsgd"})
    fedavg = ServerOptimizer()
    new, state = fedavg.step({"w": torch.ones(2)}, {"w": torch.full((2,), 0.5)}, {}, 1)
    assert torch.equal(new["w"], torch.full((2,), 1.5)) and not state


def test_low_rank_updates_average_exactly() -> None:
    """Every owner holds the same frozen A, so the mean of the owners' B @ A is mean(B) @ A:
    what secure aggregation of the factors gives is the mean of the products."""
    low = LowRank(rank=2, round=3)
    shape = (6, 5)
    a = low.factor("w", shape)
    assert torch.equal(a, LowRank(rank=2, round=3).factor("w", shape))
    assert not torch.equal(a, LowRank(rank=2, round=4).factor("w", shape))
    bs = [torch.randn(6, 2) for _ in range(3)]
    mean = low.dense("w", torch.stack(bs).mean(0), shape)
    torch.testing.assert_close(mean, torch.stack([b @ a for b in bs]).mean(0))
    assert torch.linalg.matrix_rank(mean) <= 2
    assert torch.equal(low.dense("norm", torch.ones(5), (5,)), torch.ones(5))
    with pytest.raises(FlexMoEError, match="a low-rank factor of shape"):
        low.dense("w", torch.zeros(6, 3), shape)
    delta = LowRankDelta(a, 6)
    assert torch.equal(delta(torch.ones(shape)), torch.ones(shape))  # B starts at zero


def test_a_node_answers_only_for_the_owner_its_key_is_registered_for(tmp_path: Path) -> None:
    """`fed keygen` makes a key pair Flower's SuperNode takes; the coordinator refuses a reply
    that claims another owner than the registered key's (the loopback test in
    test_federated.py runs the registration itself)."""
    from types import SimpleNamespace

    from flexmoe.federated.flower import RoundPlan, RoundStrategy
    from flexmoe.federated.nodes import (
        check_private_node_key,
        check_public_node_key,
        generate_node_key,
    )
    from flexmoe.training.config import FEDERATED_ROUTER

    public = generate_node_key(tmp_path / "upper.key")
    check_public_node_key(public)
    check_private_node_key(tmp_path / "upper.key")
    assert oct((tmp_path / "upper.key").stat().st_mode & 0o777) == "0o600"
    with pytest.raises(FlexMoEError, match="already exists"):
        generate_node_key(tmp_path / "upper.key")
    with pytest.raises(FlexMoEError, match="not an OpenSSH public key"):
        check_public_node_key(tmp_path / "upper.key")

    plan = RoundPlan(rounds=1, phases=("router",), slot=FEDERATED_ROUTER, router=FEDERATED_ROUTER)
    strategy = RoundStrategy(None, plan, 2, nodes={7: "upper", 8: "again"})  # type: ignore[arg-type]

    def reply(owner: str) -> FitRes:
        status = Status(code=Code.OK, message="")
        return FitRes(status, ndarrays_to_parameters([]), 1, {"owner": owner})

    results = [
        (SimpleNamespace(node_id=7), reply("upper")),
        (SimpleNamespace(node_id=8), reply("upper")),
    ]
    replies, refused = strategy._authentic(results)  # type: ignore[arg-type]
    assert [r.metrics["owner"] for r in replies] == ["upper"]
    assert refused == ["node 8, whose key is registered for again, answered for upper: refused"]


def test_the_server_learning_rate_can_decay_along_a_cosine() -> None:
    steady = ServerOptimizer(ServerOptimizerName.FEDADAM, lr=1e-2)
    assert steady.lr_at(1) == steady.lr_at(50) == 1e-2
    decaying = ServerOptimizer(ServerOptimizerName.FEDADAM, lr=1e-2, decay_steps=11)
    assert decaying.lr_at(1) == pytest.approx(1e-2)
    assert decaying.lr_at(6) == pytest.approx(0.55e-2)
    assert decaying.lr_at(11) == decaying.lr_at(40) == pytest.approx(1e-3)
    assert steady.continues(decaying) and not steady.continues(ServerOptimizer())
