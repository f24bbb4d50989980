"""Federated rounds on Flower: the owners' ClientApp, the coordinator's ServerApp, and the
simulation that runs every owner as a Flower client on this machine.

Each phase of a round is one Flower fit round. The coordinator's strategy sends the model's
state (every router row and the slots refined so far, as arrays; the task as config); each
owner's client does its work at home (:mod:`flexmoe.federated.owner`) and replies with its
update and, as metrics, its expert's name, its token count and the bytes it sent. A router
phase may run under Flower's SecAgg+ workflow, with Flower's ``secaggplus_mod`` on the client:
the coordinator then receives only the token-weighted average of the row changes.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.client import Client, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import (
    FitIns,
    FitRes,
    GetPropertiesIns,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.constant import MessageTypeLegacy
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common.recorddict_compat import getpropertiesins_to_recorddict
from flwr.server import ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.server.workflow.default_workflows import default_fit_workflow
from flwr.serverapp import Grid, ServerApp

from flexmoe.anchor import load_anchor
from flexmoe.errors import FlexMoEError
from flexmoe.federated.dense import dense_update
from flexmoe.federated.messages import (
    KINDS,
    Config,
    check_model,
    decode_dense,
    decode_task,
    encode_trunk_update,
    package_arrays,
    read_task,
    write_package_arrays,
)
from flexmoe.federated.owner import (
    Kind,
    OwnerText,
    RoundTask,
    router_update,
    slot_update,
    trunk_update,
)
from flexmoe.federated.privacy import UpdatePrivacy
from flexmoe.federated.server import FEDERATED_SERVER, ServerOptimizer
from flexmoe.federated.trunk import EMBEDDINGS
from flexmoe.merge.layout import MergedModel
from flexmoe.merge.slots import FederatedRound, RoundPrivacy
from flexmoe.model.checkpoint import stored_dtype
from flexmoe.training.config import FEDERATED_TRUNK, TrainConfig
from flexmoe.training.loop import TrainResult


@dataclass(frozen=True)
class RoundPlan:
    """How many rounds, which phases each has, each phase's local training, and how the
    coordinator applies a trunk phase's average."""

    rounds: int
    phases: tuple[Kind, ...]
    slot: TrainConfig
    router: TrainConfig
    secagg: bool = False
    dense: TrainConfig | None = None  # the fedavg baseline's local training
    privacy: UpdatePrivacy | None = None  # every update clipped and noised at home
    trunk: TrainConfig = FEDERATED_TRUNK
    server: ServerOptimizer = FEDERATED_SERVER
    lora_rank: int = 0  # > 0: trunk phases train and send rank-R factors of the matrices
    trunk_sgd: bool = True  # trunk phases step with plain SGD (FedOpt's local optimiser)
    # the vocabulary's tensors in the trunk (none, output, all); None: as the model's trunk
    # versions hold them, else output
    trunk_embeddings: str | None = None

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise FlexMoEError("--rounds", f"must be at least 1, got {self.rounds}")
        if not self.phases or any(p not in KINDS for p in self.phases):
            raise FlexMoEError(
                "--recipe", f"phases must be slot, router, trunk or dense: {self.phases}"
            )
        if self.trunk_embeddings not in (None, *EMBEDDINGS):
            raise FlexMoEError("--trunk-embeddings", f"must be one of {', '.join(EMBEDDINGS)}")
        if self.lora_rank < 0:
            raise FlexMoEError("--lora-rank", f"must be 0 (full) or positive, got {self.lora_rank}")
        if self.privacy is not None and not set(self.phases) <= {"router", "trunk"}:
            raise FlexMoEError(
                "--dp-owner-epsilon",
                "only router and trunk phases take noise (--recipe router or trunk): the noise on "
                "a slot's or a dense model's change, millions of values, swamps it at any epsilon "
                "(an owner protects its documents in its expert with `expert train "
                "--dp-record-epsilon`)",
            )

    def cfg(self, kind: Kind) -> TrainConfig:
        if kind == "dense":
            return self.dense or self.router
        return {"slot": self.slot, "trunk": self.trunk}.get(kind, self.router)

    def to_dict(self) -> dict[str, object]:
        return {
            "rounds": self.rounds,
            "phases": list(self.phases),
            "slot": self.slot.to_dict(),
            "router": self.router.to_dict(),
            "trunk": self.trunk.to_dict(),
            "server": self.server.to_dict(),
            "lora_rank": self.lora_rank,
            "trunk_sgd": self.trunk_sgd,
            "trunk_embeddings": self.trunk_embeddings,
            "secagg": self.secagg,
            "dense": self.dense.to_dict() if self.dense else None,
            "privacy": self.privacy.to_dict() if self.privacy else None,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> RoundPlan:
        """The inverse of :meth:`to_dict`, every field checked (pydantic reads the nested
        configurations; a field left out takes its default)."""
        from pydantic import TypeAdapter

        return TypeAdapter(cls).validate_python(dict(data))

    def releases(self) -> int:
        """How many updates each owner sends in all: one per phase of every round."""
        return self.rounds * len(self.phases)

    def max_tokens(self) -> int:
        """The most tokens one owner trains on in an averaged phase (SecAgg+'s weight bound)."""
        cfgs = [self.cfg(k) for k in self.phases if k != "slot"] or [self.router]
        return max(c.steps * c.batch_size * c.seq_len for c in cfgs)


# --- the owner's side -------------------------------------------------------------------


FINAL = "leaving"  # how an owner's line ends once the coordinator's rounds are over
DONE_KEY = "flexmoe-done"


class OwnerClient(NumPyClient):
    """One owner: its copy of the merged model and its own text, neither of which leaves."""

    def __init__(
        self, model: Path, text: OwnerText, device: torch.device, cache_dir: Path | None
    ) -> None:
        self.model, self.text, self.device, self.cache_dir = Path(model), text, device, cache_dir
        self.log: Callable[[str], None] | None = None  # a line per task, on the owner's side

    def fit(
        self, parameters: list[np.ndarray], config: dict[str, Scalar]
    ) -> tuple[list[np.ndarray], int, dict[str, Scalar]]:
        task = read_task(config)
        said = f"round {task.round} {task.kind}"
        try:
            arrays, tokens, metrics = self._fit(parameters, config, task)
        except Exception as e:
            if self.log:
                self.log(f"{said}: failed: {e}")
            raise
        if self.log:
            sent = sum(a.nbytes for a in arrays) / 1e6
            self.log(f"{said}: trained on {tokens:,} tokens, sent {sent:.2f} MB")
        return arrays, tokens, metrics

    def get_properties(self, config: dict[str, Scalar]) -> dict[str, Scalar]:
        """The coordinator's word that its rounds are over (see :func:`say_done`)."""
        if config.get(DONE_KEY) and self.log:
            self.log(f"the coordinator's rounds are over; {FINAL}")
        return {}

    def _fit(
        self, parameters: list[np.ndarray], config: dict[str, Scalar], task: RoundTask
    ) -> tuple[list[np.ndarray], int, dict[str, Scalar]]:
        name = self.text.name
        if name in task.excluded:
            return [], 0, {"owner": name, "skipped": 1}
        if task.kind == "dense":
            anchor = load_anchor(self.model)
            changes, result = dense_update(
                anchor,
                decode_dense(parameters, config),
                task,
                self.text,
                device=self.device,
                cache_dir=self.cache_dir,
            )
            arrays = [changes[k].numpy() for k in sorted(changes)]
        else:
            arrays, result = self._merged_work(parameters, config)
        metrics: dict[str, Scalar] = {
            "owner": name,
            "loss": result.final_train_loss,
            "bytes": sum(a.nbytes for a in arrays),
        }
        return arrays, result.tokens, metrics

    def _merged_work(
        self, parameters: list[np.ndarray], config: dict[str, Scalar]
    ) -> tuple[list[np.ndarray], TrainResult]:
        """A router update or the owner's slot, on its copy of the merged model."""
        merged = MergedModel.open(self.model)
        check_model(config, merged)
        state, task = decode_task(parameters, config, stored_dtype(merged.config()))
        if task.kind == "router":
            change, result = router_update(
                merged, state, task, self.text, device=self.device, cache_dir=self.cache_dir
            )
            return [change.numpy()], result
        if task.kind == "trunk":
            changes, result = trunk_update(
                merged, state, task, self.text, device=self.device, cache_dir=self.cache_dir
            )
            return encode_trunk_update(changes), result
        with tempfile.TemporaryDirectory() as work:
            package = Path(work) / "package"
            result = slot_update(
                merged,
                state,
                task,
                self.text,
                package,
                device=self.device,
                cache_dir=self.cache_dir,
            )
            return package_arrays(package), result


def secagg_when_asked(msg: Message, context: Context, call_next: Callable[..., Message]) -> Message:
    """Flower's SecAgg+ client mod for the messages of a SecAgg+ round; others pass through."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def owner_app(
    model: Path, texts: list[OwnerText], device: torch.device, cache_dir: Path | None
) -> ClientApp:
    """The ClientApp of a simulation: node ``i`` is owner ``texts[i]``."""

    def client_fn(context: Context) -> Client:
        index = int(context.node_config["partition-id"])
        return OwnerClient(model, texts[index], device, cache_dir).to_client()

    return ClientApp(client_fn=client_fn, mods=[secagg_when_asked])


# --- the coordinator's side -------------------------------------------------------------


class RoundCoordinator(Protocol):
    """What the rounds need of the coordinator's state: the merged model's
    (:class:`~flexmoe.federated.rounds.Coordinator`) or the dense baseline's
    (:class:`~flexmoe.federated.dense.DenseCoordinator`)."""

    excluded: frozenset[str]

    @property
    def model_path(self) -> Path: ...

    @property
    def first_round(self) -> int: ...

    def task(self, kind: Kind, round: int, cfg: TrainConfig) -> RoundTask: ...

    def message(self, task: RoundTask) -> tuple[list[np.ndarray], Config]: ...

    def take_updates(
        self, round: int, kind: Kind, updates: dict[str, tuple[list[np.ndarray], int]]
    ) -> None: ...

    def take_average(
        self, round: int, kind: Kind, average: list[np.ndarray], participants: list[str]
    ) -> None: ...

    def take_slots(self, round: int, packages: dict[str, Path]) -> None: ...

    def log_round(self, entry: FederatedRound) -> None: ...


class RoundStrategy(FedAvg):
    """Sends each phase's task to every owner that is there and takes what comes back."""

    def __init__(
        self,
        coordinator: RoundCoordinator,
        plan: RoundPlan,
        owners: int,
        *,
        wait_s: float = 60.0,
        nodes: dict[int, str] | None = None,
    ) -> None:
        super().__init__(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=1,
            min_evaluate_clients=0,
            min_available_clients=1,
            accept_failures=True,
        )
        self.coordinator, self.plan, self.owners, self.wait_s = coordinator, plan, owners, wait_s
        self.nodes = nodes  # node id -> the owner its registered key is for (None: no keys)
        self.phase: tuple[Kind, int] = ("slot", 0)
        self.replies: dict[str, list[str]] = {}
        self.failures: dict[str, int] = {}
        self.sent: dict[str, int] = {}
        self.tokens: dict[str, int] = {}
        self.reasons: dict[str, list[str]] = {}

    def __repr__(self) -> str:
        return "RoundStrategy"

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        kind, number = self.phase
        client_manager.wait_for(self.owners, timeout=int(self.wait_s))
        clients = list(client_manager.all().values())
        if not clients:
            raise FlexMoEError("round", f"round {number}: no owner is connected")
        task = self.coordinator.task(kind, number, self.plan.cfg(kind))
        if self.plan.privacy is not None:
            privacy = self.plan.privacy
            task = replace(task, dp_clip=privacy.clip[kind], dp_noise=privacy.noise_multiplier)
        arrays, config = self.coordinator.message(task)
        fit = FitIns(ndarrays_to_parameters(arrays), config)
        return [(client, fit) for client in clients]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        kind, number = self.phase
        replies, refused = self._authentic(results)
        owners = sorted(str(r.metrics["owner"]) for r in replies)
        self.replies[kind], self.failures[kind] = owners, len(failures) + len(refused)
        self.reasons[kind] = [_reason(f) for f in failures] + refused
        for reply in replies:
            owner = str(reply.metrics["owner"])
            self.sent[owner] = self.sent.get(owner, 0) + int(reply.metrics.get("bytes", 0))
            self.tokens[owner] = self.tokens.get(owner, 0) + int(reply.num_examples)
        if not replies:
            first = f" (first: {self.reasons[kind][0]})" if self.reasons[kind] else ""
            raise FlexMoEError("round", f"round {number} ({kind}): every owner failed{first}")
        arrays = {str(r.metrics["owner"]): parameters_to_ndarrays(r.parameters) for r in replies}
        if kind == "slot":
            with tempfile.TemporaryDirectory() as work:
                packages = {
                    owner: write_package_arrays(found, Path(work) / owner)
                    for owner, found in arrays.items()
                }
                self.coordinator.take_slots(number, packages)
        elif self.plan.secagg:  # every reply holds the same: the average
            self.coordinator.take_average(number, kind, arrays[owners[0]], owners)
        else:
            tokens = {str(r.metrics["owner"]): r.num_examples for r in replies}
            self.coordinator.take_updates(
                number, kind, {owner: (found, tokens[owner]) for owner, found in arrays.items()}
            )
        return None, {}

    def _authentic(
        self, results: list[tuple[ClientProxy, FitRes]]
    ) -> tuple[list[FitRes], list[str]]:
        """The replies that are not skipped, and why each reply from a node that answered for
        another owner than its registered key's was refused."""
        replies, refused = [], []
        for proxy, reply in results:
            if reply.metrics.get("skipped"):
                continue
            claimed = str(reply.metrics["owner"])
            known = claimed if self.nodes is None else self.nodes.get(int(proxy.node_id))
            if known != claimed:
                refused.append(
                    f"node {proxy.node_id}, whose key is registered for {known}, answered for "
                    f"{claimed}: refused"
                )
                continue
            replies.append(reply)
        return replies, refused


def _reason(failure: object) -> str:
    """One line of why an owner's reply failed (Flower wraps the owner's error)."""
    inner = failure.args[0] if isinstance(failure, BaseException) and failure.args else failure
    text = str(getattr(inner, "reason", inner))
    text = text.rsplit("Message: ", 1)[-1].strip().removesuffix("'>").strip()
    return text.splitlines()[0] if text else "unknown"


def coordinator_app(
    coordinator: RoundCoordinator,
    plan: RoundPlan,
    owners: int,
    log: Callable[[str], None],
    errors: list[BaseException],
) -> ServerApp:
    """The ServerApp: ``plan.rounds`` rounds of ``plan.phases`` over ``owners`` owners; an
    error is put in ``errors`` (Flower's runtime only logs it)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            coordinate(grid, context, coordinator, plan, owners, log)
        except BaseException as e:
            errors.append(e)
            raise

    return app


def coordinate(
    grid: Grid,
    context: Context,
    coordinator: RoundCoordinator,
    plan: RoundPlan,
    owners: int,
    log: Callable[[str], None],
    *,
    wait_s: float = 60.0,
    farewell: bool = False,
    nodes: dict[int, str] | None = None,
) -> None:
    """The rounds, inside a ServerApp's main: each phase waits up to ``wait_s`` for ``owners``
    owners to be connected and goes on with those that are; with ``farewell``, the owners are
    told when the rounds are over; with ``nodes`` (node id -> owner), a node's replies count
    only for the owner its key was registered for."""
    strategy = RoundStrategy(coordinator, plan, owners, wait_s=wait_s, nodes=nodes)
    legacy = LegacyContext(
        context=context, config=ServerConfig(num_rounds=plan.rounds), strategy=strategy
    )
    thread, stop, registered = start_update_client_manager_thread(grid, legacy.client_manager)
    registered.wait()
    try:
        _run_rounds(grid, legacy, strategy, coordinator, plan, log)
    finally:
        stop.set()
        thread.join()
    if farewell:
        say_done(grid)


def say_done(grid: Grid, timeout_s: float = 30.0) -> None:
    """Tell every connected owner that the rounds are over, so that an owner's SuperNode
    leaves only after the coordinator has taken its last reply (a node that leaves earlier
    turns that reply into an error). Their answers do not matter."""
    content = getpropertiesins_to_recorddict(GetPropertiesIns({DONE_KEY: 1}))
    messages = [
        Message(content, dst_node_id=node, message_type=MessageTypeLegacy.GET_PROPERTIES)
        for node in grid.get_node_ids()
    ]
    grid.send_and_receive(messages, timeout=timeout_s)


def _run_rounds(
    grid: Grid,
    legacy: LegacyContext,
    strategy: RoundStrategy,
    coordinator: RoundCoordinator,
    plan: RoundPlan,
    log: Callable[[str], None],
) -> None:
    legacy.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    config = ConfigRecord({Key.START_TIME: time.time()})
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = config
    secagg = SecAggPlusWorkflow(
        num_shares=1.0, reconstruction_threshold=0.5, max_weight=float(plan.max_tokens())
    )
    step, first = 0, coordinator.first_round
    for number in range(first, first + plan.rounds):
        strategy.replies, strategy.failures, strategy.sent, strategy.tokens = {}, {}, {}, {}
        for kind in plan.phases:
            step += 1
            config[Key.CURRENT_ROUND] = step
            strategy.phase = (kind, number)
            started = time.perf_counter()
            if kind != "slot" and plan.secagg:
                secagg(grid, legacy)
            else:
                default_fit_workflow(grid, legacy)
            if kind not in strategy.replies:
                raise FlexMoEError("round", f"round {number} ({kind}) did not complete")
            log(
                f"round {number} ({number - first + 1}/{plan.rounds}) {kind}: "
                f"{len(strategy.replies[kind])} owners"
                + (f", {strategy.failures[kind]} failed" if strategy.failures[kind] else "")
                + f" ({time.perf_counter() - started:.0f} s)"
            )
            for reason in strategy.reasons[kind]:
                log(f"  an owner failed: {reason}")
        coordinator.log_round(
            FederatedRound(
                round=number,
                phases=list(plan.phases),
                participants=dict(strategy.replies),
                failures=dict(strategy.failures),
                bytes_sent=dict(strategy.sent),
                secure_aggregation=plan.secagg,
                steps={k: plan.cfg(k).steps for k in plan.phases},
                tokens=dict(strategy.tokens),
                privacy=_round_privacy(plan),
            )
        )


def _round_privacy(plan: RoundPlan) -> RoundPrivacy | None:
    if plan.privacy is None:
        return None
    clip = {str(k): plan.privacy.clip[k] for k in plan.phases}
    return RoundPrivacy(
        noise_multiplier=plan.privacy.noise_multiplier, clip=clip, delta=plan.privacy.delta
    )


# --- the simulation ---------------------------------------------------------------------


def simulate(
    coordinator: RoundCoordinator,
    texts: list[OwnerText],
    plan: RoundPlan,
    *,
    device: torch.device,
    cache_dir: Path | None,
    log: Callable[[str], None] = print,
    debug: bool = False,
) -> None:
    """Every owner a Flower client on this machine (Flower's simulation runtime, on Ray)."""
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # quiets a Ray warning
    from flwr.simulation import run_simulation

    errors: list[BaseException] = []
    server = coordinator_app(coordinator, plan, len(texts), log, errors)
    client = owner_app(coordinator.model_path, texts, device, cache_dir)
    gpus = 1.0 if device.type == "cuda" else 0.0
    backend = {
        "client_resources": {"num_cpus": 1, "num_gpus": gpus},
        "init_args": {"logging_level": logging.ERROR, "log_to_driver": debug},
    }
    with _quiet_flower(debug):
        try:
            run_simulation(
                server_app=server,
                client_app=client,
                num_supernodes=len(texts),
                backend_config=backend,  # type: ignore[arg-type]
            )
        except Exception as e:  # Flower re-raises the ServerApp's error; ours says more
            if errors:
                raise errors[0] from e
            raise
    if errors:
        raise errors[0]


@contextmanager
def _quiet_flower(debug: bool) -> Iterator[None]:
    """Flower's and Ray's logs off (``--debug`` keeps them): an owner's failure is reported
    in one line by the rounds themselves."""
    loggers = [] if debug else [logging.getLogger(n) for n in ("flwr", "ray")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
