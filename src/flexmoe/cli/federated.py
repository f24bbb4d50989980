"""The federated commands: rounds in which the owners improve the merged model on their own
text, and only their updates leave (Flower)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from flexmoe.cli.common import (
    DATA_HELP,
    DEBUG,
    CacheOpt,
    DeviceOpt,
    ForceOpt,
    IdFieldOpt,
    JsonOpt,
    RegistryOpt,
    SeedOpt,
    TextFieldOpt,
    data_specs,
    emit,
    open_registry,
    say,
    token_cache,
)
from flexmoe.errors import FlexMoEError
from flexmoe.federated.privacy import CLIP
from flexmoe.federated.server import FEDERATED_SERVER
from flexmoe.training.config import (
    EXPERT_TRAINING,
    FEDERATED_ROUTER,
    FEDERATED_SLOT,
    FEDERATED_TRUNK,
    TrainConfig,
)

if TYPE_CHECKING:
    from flexmoe.federated.flower import RoundPlan
    from flexmoe.federated.owner import OwnerText
    from flexmoe.federated.run import RoundsSummary

fed_app = typer.Typer(
    help="Federated rounds on Flower: owners improve the merged model on their own text.",
    no_args_is_help=True,
)

ROUNDS, RECIPE = 50, "trunk"
SERVER = FEDERATED_SERVER
OwnerOpt = Annotated[
    list[str],
    typer.Option("--data", help="an owner's own text, named by its expert: NAME=FILES; repeatable"),
]
SharePublicOpt = Annotated[
    list[str] | None,
    typer.Option(help="public text mixed into each owner's training: " + DATA_HELP),
]
ShareOpt = Annotated[
    float, typer.Option(help="share of each owner's training tokens that is public text")
]


def _owner_option(values: list[str] | None, option: str) -> dict[str, str]:
    """``NAME=VALUE`` pairs."""
    found: dict[str, str] = {}
    for value in values or []:
        name, sep, rest = value.partition("=")
        if not sep or not name.strip() or not rest.strip():
            raise FlexMoEError(option, f"expected NAME=VALUE, got {value!r}")
        found.setdefault(name.strip(), "")
        found[name.strip()] = ",".join(p for p in (found[name.strip()], rest.strip()) if p)
    return found


def _owner_texts(
    owner: list[str],
    key: list[str] | None,
    public_data: list[str] | None,
    public_fraction: float,
    text_field: str,
    id_field: str | None,
) -> list[OwnerText]:
    """The owners of ``--data NAME=FILES`` with the public share and their signing keys."""
    from flexmoe.federated.owner import OwnerText

    keys = _owner_option(key, "--signing-key")
    public = data_specs(
        public_data, text_field, id_field, default_domain="public", option="--public-data"
    )
    texts = []
    for name, files in _owner_option(owner, "--data").items():
        specs = data_specs([f"{name}={files}"], text_field, id_field, option="--data")
        found = Path(keys.pop(name)) if name in keys else None
        texts.append(OwnerText(name, tuple(specs), tuple(public), public_fraction, found))
    if keys:
        raise FlexMoEError("--signing-key", f"{next(iter(keys))} is not one of the --data names")
    return texts


RoundsOpt = Annotated[int, typer.Option(help="federated rounds")]
RecipeOpt = Annotated[
    str, typer.Option(help="each round's phases, in order, of trunk, slot and router")
]
SlotStepsOpt = Annotated[int, typer.Option(help="each owner's steps on its own slot per round")]
RouterStepsOpt = Annotated[
    int, typer.Option(help="each owner's steps on the router rows per round")
]
SlotLrOpt = Annotated[float, typer.Option(help="learning rate of the slot phase")]
RouterLrOpt = Annotated[float, typer.Option(help="learning rate of the router phase")]
BatchOpt = Annotated[int, typer.Option(help="sequences per local step")]
SeqLenOpt = Annotated[int, typer.Option(help="tokens per sequence")]
RouterOptimizerOpt = Annotated[
    str, typer.Option(help="the router phase's local optimiser: sgd (FedAvg's) or adamw")
]
DpOwnerEpsilonOpt = Annotated[
    float | None,
    typer.Option(
        help="owner-level DP on the updates: each owner clips and noises every update it sends "
        "so that all of them together cost it at most this epsilon"
    ),
]
DpOwnerDeltaOpt = Annotated[float, typer.Option(help="the delta of --dp-owner-epsilon")]
DpClipOpt = Annotated[
    list[str] | None,
    typer.Option(
        help="with --dp-owner-epsilon: the L2 norm an update is clipped to, PART=NORM for router "
        "and trunk (repeatable) [default: router=0.5, trunk=1.0]"
    ),
]
SecAggOpt = Annotated[
    bool,
    typer.Option(
        "--secagg",
        help="router phases under Flower's SecAgg+: the coordinator sees only the average",
    ),
]


TrunkStepsOpt = Annotated[
    int, typer.Option(help="each owner's steps on the shared trunk per round (trunk phases)")
]
TrunkLrOpt = Annotated[
    float, typer.Option(help="learning rate of the trunk phase's local optimiser")
]
ServerOptimizerOpt = Annotated[
    str,
    typer.Option(
        help="how the coordinator applies a trunk phase's average: fedavg (adds it), fedadam or "
        "fedyogi (a pseudo-gradient step, its state kept with each trunk version)"
    ),
]
ServerLrOpt = Annotated[float, typer.Option(help="the server optimiser's learning rate")]
ServerTauOpt = Annotated[
    float, typer.Option(help="fedadam and fedyogi: the constant added to sqrt(v) (adaptivity)")
]
TrunkEmbeddingsOpt = Annotated[
    str | None,
    typer.Option(
        help="the vocabulary's tensors in the trunk: none, output (the output layer) or all "
        "(the input embeddings too, whose update tells which tokens a batch held: use --secagg); "
        "default: as the model's trunk versions hold them, else output",
        show_default=False,
    ),
]
TrunkOptimizerOpt = Annotated[
    str,
    typer.Option(help="the trunk phase's local optimiser: adamw, or sgd (FedOpt's, for fedadam)"),
]
LoraRankOpt = Annotated[
    int,
    typer.Option(
        help="trunk phases train and send rank-R factors of the trunk's matrices (0: in full)"
    ),
]


@dataclass(frozen=True)
class PhaseOptions:
    """Each phase's local training and the coordinator's settings, as the command gives them."""

    slot_steps: int
    router_steps: int
    trunk_steps: int
    slot_lr: float
    router_lr: float
    trunk_lr: float
    batch_size: int
    seq_len: int
    seed: int
    server_optimizer: str
    server_lr: float
    server_tau: float
    lora_rank: int
    trunk_optimizer: str
    trunk_embeddings: str | None

    @classmethod
    def of(cls, options: Mapping[str, object]) -> PhaseOptions:
        """The fields of a command's options (its ``locals()``), by name (typer has parsed each
        to its field's type)."""
        return cls(**{f.name: options[f.name] for f in fields(cls)})  # type: ignore[arg-type]

    def local(self, cfg: TrainConfig, kind: str) -> TrainConfig:
        steps, lr = getattr(self, f"{kind}_steps"), getattr(self, f"{kind}_lr")
        return replace(
            cfg,
            steps=steps,
            lr=lr,
            seed=self.seed,
            batch_size=self.batch_size,
            seq_len=self.seq_len,
        )


def _plan(
    rounds: int,
    recipe: str,
    options: PhaseOptions,
    secagg: bool,
    dp_epsilon: float | None = None,
    dp_delta: float = 1e-5,
    dp_clip: list[str] | None = None,
) -> RoundPlan:
    """The rounds' plan from the command's options."""
    from flexmoe.federated.flower import RoundPlan
    from flexmoe.federated.privacy import UpdatePrivacy
    from flexmoe.federated.server import ServerOptimizer

    phases = tuple(p.strip() for p in recipe.split(",") if p.strip())
    server = ServerOptimizer.from_dict(
        {"name": options.server_optimizer, "lr": options.server_lr, "tau": options.server_tau}
    )
    if options.trunk_optimizer not in ("sgd", "adamw"):
        raise FlexMoEError(
            "--trunk-optimizer", f"must be sgd or adamw, got {options.trunk_optimizer!r}"
        )
    plan = RoundPlan(
        rounds=rounds,
        phases=phases,  # type: ignore[arg-type]
        slot=options.local(FEDERATED_SLOT, "slot"),
        router=options.local(FEDERATED_ROUTER, "router"),
        trunk=options.local(FEDERATED_TRUNK, "trunk"),
        server=server,
        lora_rank=options.lora_rank,
        trunk_sgd=options.trunk_optimizer == "sgd",
        trunk_embeddings=options.trunk_embeddings,
        secagg=secagg,
    )
    if dp_epsilon is None:
        return plan
    clip = _clip_norms(dp_clip or [])
    privacy = UpdatePrivacy.for_budget(dp_epsilon, plan.releases(), delta=dp_delta, clip=clip)
    return replace(plan, privacy=privacy)


def _clip_norms(given: list[str]) -> dict[str, float]:
    """``--dp-clip PART=NORM`` (repeatable) as each part's clip norm; the rest keep theirs."""
    norms = dict(CLIP)
    for item in given:
        part, eq, norm = item.partition("=")
        if not eq or part not in CLIP:
            raise FlexMoEError("--dp-clip", f"expected router=NORM or trunk=NORM, got {item!r}")
        try:
            norms[part] = float(norm)
        except ValueError:
            raise FlexMoEError("--dp-clip", f"{part}: not a number: {norm!r}") from None
    return norms


def _router_sgd(optimizer: str) -> bool:
    if optimizer not in ("sgd", "adamw"):
        raise FlexMoEError("--router-optimizer", f"must be sgd or adamw, got {optimizer!r}")
    return optimizer == "sgd"


@fed_app.command("simulate")
def fed_simulate(
    model: Annotated[Path, typer.Argument(help="merged model directory (read, never changed)")],
    owner: OwnerOpt,
    out: Annotated[Path, typer.Option(help="the new model directory to write")],
    public_data: SharePublicOpt = None,
    public_fraction: ShareOpt = 0.25,
    rounds: RoundsOpt = ROUNDS,
    recipe: RecipeOpt = RECIPE,
    slot_steps: SlotStepsOpt = FEDERATED_SLOT.steps,
    router_steps: RouterStepsOpt = FEDERATED_ROUTER.steps,
    trunk_steps: TrunkStepsOpt = FEDERATED_TRUNK.steps,
    slot_lr: SlotLrOpt = FEDERATED_SLOT.lr,
    router_lr: RouterLrOpt = FEDERATED_ROUTER.lr,
    trunk_lr: TrunkLrOpt = FEDERATED_TRUNK.lr,
    batch_size: BatchOpt = FEDERATED_SLOT.batch_size,
    seq_len: SeqLenOpt = FEDERATED_SLOT.seq_len,
    router_optimizer: RouterOptimizerOpt = "sgd",
    server_optimizer: ServerOptimizerOpt = SERVER.name.value,
    server_lr: ServerLrOpt = SERVER.lr,
    server_tau: ServerTauOpt = SERVER.tau,
    lora_rank: LoraRankOpt = 0,
    trunk_optimizer: TrunkOptimizerOpt = "sgd",
    trunk_embeddings: TrunkEmbeddingsOpt = None,
    secagg: SecAggOpt = False,
    dp_owner_epsilon: DpOwnerEpsilonOpt = None,
    dp_owner_delta: DpOwnerDeltaOpt = 1e-5,
    dp_clip: DpClipOpt = None,
    key: Annotated[
        list[str] | None,
        typer.Option(
            "--signing-key", help="an owner's signing key for its slot packages: NAME=PATH"
        ),
    ] = None,
    registry: RegistryOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    cache_dir: CacheOpt = None,
    text_field: TextFieldOpt = "text",
    id_field: IdFieldOpt = None,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
) -> None:
    """Run federated rounds with every owner a Flower client on this machine (Flower's
    simulation runtime). Each owner's text is read only by its own client; the coordinator
    receives slot packages and router updates, and writes a new model with every version."""
    from flexmoe.device import pick_device
    from flexmoe.federated.run import federate

    options = PhaseOptions.of(locals())
    plan = _plan(rounds, recipe, options, secagg, dp_owner_epsilon, dp_owner_delta, dp_clip)
    texts = _owner_texts(owner, key, public_data, public_fraction, text_field, id_field)
    with open_registry(registry) as known:
        result = federate(
            model,
            texts,
            plan,
            out,
            device=pick_device(device),
            cache_dir=token_cache(cache_dir),
            registry=known,
            overwrite=force,
            log=say,
            debug=DEBUG["on"],
            router_sgd=_router_sgd(router_optimizer),
        )
    _summary(as_json, result.summary(rounds), recipe, len(texts))


def _summary(as_json: bool, summary: RoundsSummary, recipe: str, owners: int) -> None:
    versions = ", ".join(f"{n} v{v}" for n, v in summary.slot_versions.items())
    spent = ""
    if summary.epsilon:
        each = ", ".join(
            f"{n} {e if e is not None else 'unbounded'}" for n, e in summary.epsilon.items()
        )
        spent = f"; epsilon at delta {summary.delta:g}: {each}"
    emit(
        as_json,
        summary.model_dump(mode="json"),
        f"{len(summary.rounds)} federated rounds ({recipe}) with {owners} owners: router "
        f"version {summary.router_version}, slot versions {versions}{spent} -> {summary.out}",
    )


@fed_app.command("serve")
def fed_serve(
    model: Annotated[Path, typer.Argument(help="merged model directory (read, never changed)")],
    out: Annotated[Path, typer.Option(help="the new model directory to write")],
    listen: Annotated[
        str, typer.Option(help="HOST:PORT the owners' `fed join` connect to")
    ] = "0.0.0.0:9092",
    owners: Annotated[
        int | None,
        typer.Option(help="owners each phase waits for (default: every owner not opted out)"),
    ] = None,
    wait: Annotated[
        float, typer.Option(help="seconds each phase waits for them; then it goes on")
    ] = 600.0,
    rounds: RoundsOpt = ROUNDS,
    recipe: RecipeOpt = RECIPE,
    slot_steps: SlotStepsOpt = FEDERATED_SLOT.steps,
    router_steps: RouterStepsOpt = FEDERATED_ROUTER.steps,
    trunk_steps: TrunkStepsOpt = FEDERATED_TRUNK.steps,
    slot_lr: SlotLrOpt = FEDERATED_SLOT.lr,
    router_lr: RouterLrOpt = FEDERATED_ROUTER.lr,
    trunk_lr: TrunkLrOpt = FEDERATED_TRUNK.lr,
    batch_size: BatchOpt = FEDERATED_SLOT.batch_size,
    seq_len: SeqLenOpt = FEDERATED_SLOT.seq_len,
    router_optimizer: RouterOptimizerOpt = "sgd",
    server_optimizer: ServerOptimizerOpt = SERVER.name.value,
    server_lr: ServerLrOpt = SERVER.lr,
    server_tau: ServerTauOpt = SERVER.tau,
    lora_rank: LoraRankOpt = 0,
    trunk_optimizer: TrunkOptimizerOpt = "sgd",
    trunk_embeddings: TrunkEmbeddingsOpt = None,
    secagg: SecAggOpt = False,
    dp_owner_epsilon: DpOwnerEpsilonOpt = None,
    dp_owner_delta: DpOwnerDeltaOpt = 1e-5,
    dp_clip: DpClipOpt = None,
    ca: Annotated[Path | None, typer.Option(help="TLS: the CA certificate (PEM)")] = None,
    cert: Annotated[Path | None, typer.Option(help="TLS: this server's certificate")] = None,
    cert_key: Annotated[Path | None, typer.Option(help="TLS: its private key")] = None,
    node_key: Annotated[
        list[str] | None,
        typer.Option(
            "--node-key",
            help="an owner's public node key (`flexmoe fed keygen`): NAME=PATH; repeatable. "
            "Then only SuperNodes with these keys may join, each for its own owner",
        ),
    ] = None,
    registry: RegistryOpt = None,
    seed: SeedOpt = 0,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
) -> None:
    """Coordinate federated rounds over the network (Flower's deployment runtime): a SuperLink
    that the owners' `flexmoe fed join` connect to, and the rounds' ServerApp. Each owner's text
    stays on its machine; the new model, with every version, is written to --out."""
    from flexmoe.federated.deploy import Tls, serve

    options = PhaseOptions.of(locals())
    plan = _plan(rounds, recipe, options, secagg, dp_owner_epsilon, dp_owner_delta, dp_clip)
    given = [x for x in (ca, cert, cert_key) if x is not None]
    if given and len(given) != 3:
        raise FlexMoEError("--ca/--cert/--cert-key", "TLS needs all three, or none")
    tls = Tls(ca, cert, cert_key) if ca and cert and cert_key else None
    status = serve(
        model,
        plan,
        out,
        listen=listen,
        owners=owners,
        wait_s=wait,
        registry=registry,
        tls=tls,
        node_keys={n: Path(v) for n, v in _owner_option(node_key, "--node-key").items()},
        overwrite=force,
        log=say,
        debug=DEBUG["on"],
        router_sgd=_router_sgd(router_optimizer),
    )
    _summary(as_json, status, recipe, len(status.owners()))


@fed_app.command("join")
def fed_join(
    model: Annotated[
        Path, typer.Argument(help="this owner's copy of the merged model the coordinator serves")
    ],
    owner: Annotated[
        str, typer.Option("--data", help="this owner's own text, named by its expert: NAME=FILES")
    ],
    coordinator: Annotated[str, typer.Option(help="HOST:PORT of the coordinator's `fed serve`")],
    public_data: SharePublicOpt = None,
    public_fraction: ShareOpt = 0.25,
    key: Annotated[
        Path | None,
        typer.Option("--signing-key", help="this owner's signing key for its slot packages"),
    ] = None,
    ca: Annotated[
        Path | None, typer.Option(help="TLS: the CA certificate the coordinator's is signed by")
    ] = None,
    node_key: Annotated[
        Path | None,
        typer.Option(
            "--node-key", help="this owner's private node key, when the coordinator asks for one"
        ),
    ] = None,
    once: Annotated[
        bool,
        typer.Option("--once", help="leave after the last phase of the coordinator's rounds"),
    ] = False,
    device: DeviceOpt = "auto",
    cache_dir: CacheOpt = None,
    text_field: TextFieldOpt = "text",
    id_field: IdFieldOpt = None,
) -> None:
    """Take part in a coordinator's federated rounds as one owner (a Flower SuperNode): the
    work is done here on this owner's text, and only its slot package and router updates are
    sent. Runs until interrupted, or with --once until the rounds end."""
    from flexmoe.device import pick_device
    from flexmoe.federated.deploy import join

    name = owner.partition("=")[0].strip()
    keys = [f"{name}={key}"] if key else None
    (text,) = _owner_texts([owner], keys, public_data, public_fraction, text_field, id_field)
    try:
        join(
            model,
            text,
            coordinator,
            device=pick_device(device),
            cache_dir=token_cache(cache_dir),
            ca=ca,
            node_key=node_key,
            once=once,
            log=say,
            debug=DEBUG["on"],
        )
    except KeyboardInterrupt:
        say(f"{text.name}: left the coordinator")


@fed_app.command("keygen")
def fed_keygen(
    out: Annotated[
        Path, typer.Option(help="private node key file to write; the public key goes to *.pub")
    ],
    as_json: JsonOpt = False,
    force: ForceOpt = False,
) -> None:
    """Make an owner's node key pair for `fed join --node-key` (EC P-384, OpenSSH format, as
    Flower's SuperNode authentication takes it). Keep the private key; send the .pub file to
    the coordinator, who names it in `fed serve --node-key NAME=PATH`."""
    from flexmoe.federated.nodes import generate_node_key

    public = generate_node_key(out, force=force)
    emit(
        as_json,
        {"private_key": str(out), "public_key": str(public)},
        f"private node key -> {out} (keep it; readable by you only)\n"
        f"public node key  -> {public} (send it to the coordinator)",
    )


def baseline_fedavg(
    anchor: Annotated[Path, typer.Option(help="the anchor directory (every owner holds it)")],
    owner: OwnerOpt,
    out: Annotated[Path, typer.Option(help="the dense model directory to write")],
    public_data: SharePublicOpt = None,
    public_fraction: ShareOpt = 0.25,
    rounds: Annotated[int, typer.Option(help="FedAvg rounds")] = 4,
    steps: Annotated[
        int,
        typer.Option(
            help="each owner's local steps per round (rounds x steps: as many as "
            "an expert's training)"
        ),
    ] = EXPERT_TRAINING.steps // 4,
    lr: Annotated[float, typer.Option(help="local learning rate")] = EXPERT_TRAINING.lr,
    batch_size: Annotated[int, typer.Option(help="sequences per local step")] = (
        EXPERT_TRAINING.batch_size
    ),
    seq_len: Annotated[int, typer.Option(help="tokens per sequence")] = EXPERT_TRAINING.seq_len,
    secagg: Annotated[
        bool, typer.Option("--secagg", help="under Flower's SecAgg+: only the average is seen")
    ] = False,
    server_optimizer: Annotated[
        str,
        typer.Option(
            help="how the coordinator applies the average: fedavg (adds it; with --server-lr 1, "
            "FedAvg), fedadam or fedyogi (the merged model's trunk recipe, on the dense model)"
        ),
    ] = "fedavg",
    server_lr: ServerLrOpt = 1.0,
    server_tau: ServerTauOpt = SERVER.tau,
    local_optimizer: Annotated[
        str, typer.Option(help="each owner's optimiser: adamw, or sgd (FedOpt's, for fedadam)")
    ] = "adamw",
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    cache_dir: CacheOpt = None,
    text_field: TextFieldOpt = "text",
    id_field: IdFieldOpt = None,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
) -> None:
    """The classic federated baseline: the anchor's dense model trained by FedAvg on Flower,
    every owner training every parameter on its own text at home (a simulation on this
    machine). Score it with `flexmoe eval baselines --fedavg DIR`. `--rounds 60 --steps 1
    --local-optimizer sgd --server-optimizer fedadam --server-lr 0.003` trains it with the
    merged model's trunk recipe instead."""
    from flexmoe.device import pick_device
    from flexmoe.federated.flower import RoundPlan
    from flexmoe.federated.run import fedavg
    from flexmoe.federated.server import ServerOptimizer

    if local_optimizer not in ("sgd", "adamw"):
        raise FlexMoEError("--local-optimizer", f"must be sgd or adamw, got {local_optimizer!r}")
    server = ServerOptimizer.from_dict(
        {"name": server_optimizer, "lr": server_lr, "tau": server_tau}
    )

    local = replace(
        EXPERT_TRAINING,
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        seq_len=seq_len,
        seed=seed,
        warmup_steps=max(1, steps // 10),
        eval_every=0,
        checkpoint_every=0,
        z_loss=0.0,
    )
    plan = RoundPlan(rounds, ("dense",), local, local, secagg=secagg, dense=local)
    texts = _owner_texts(owner, None, public_data, public_fraction, text_field, id_field)
    written = fedavg(
        anchor,
        texts,
        plan,
        out,
        device=pick_device(device),
        cache_dir=token_cache(cache_dir),
        overwrite=force,
        log=say,
        debug=DEBUG["on"],
        server=server,
        local_sgd=local_optimizer == "sgd",
    )
    emit(
        as_json,
        {"out": str(written), "rounds": rounds, "steps": steps, "owners": len(texts)},
        f"fedavg: {rounds} rounds of {steps} local steps with {len(texts)} owners -> {written}",
    )
