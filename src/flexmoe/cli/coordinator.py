"""The coordinator's commands: merge, the router, the owners' standing, keys and tokens, serving,
the usage ledger and generation."""

from __future__ import annotations

import json
import tempfile
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from flexmoe.cli.common import (
    DATA_HELP,
    BiasOpt,
    CacheOpt,
    DeviceOpt,
    ExcludeOpt,
    ForceOpt,
    IdFieldOpt,
    IncludeOpt,
    JsonOpt,
    LicenseOpt,
    LogDirOpt,
    RegistryOpt,
    SeedOpt,
    TextFieldOpt,
    data_specs,
    emit,
    open_registry,
    token_cache,
    train_summary,
    training_options,
    use_bias,
)
from flexmoe.errors import FlexMoEError, printable
from flexmoe.merge import DEFAULT_TOP_K
from flexmoe.training.config import ROUTER_TUNING, TrainConfig

if TYPE_CHECKING:
    from flexmoe.merge.slots import Federation

merge_app = typer.Typer(help="Merge experts into one model; add or remove one later.")
router_app = typer.Typer(help="The merged model's router.", no_args_is_help=True)
members_app = typer.Typer(
    help="The experts a merged model holds and each owner's standing choice (opt-out, opt-in).",
    no_args_is_help=True,
)
keys_app = typer.Typer(
    help="Signing keys: an owner's key pair and the coordinator's registry of public keys.",
    no_args_is_help=True,
)
tokens_app = typer.Typer(
    help="Bearer tokens: each owner's, for the server's usage page, opt-out and opt-in.",
    no_args_is_help=True,
)

ModelArg = Annotated[Path, typer.Argument(help="merged model directory")]
ExpertArg = Annotated[str, typer.Argument(help="expert name")]
EditOutOpt = Annotated[
    Path | None, typer.Option(help="write the changed model here (default: replace MODEL)")
]
RegistryArg = Annotated[Path, typer.Argument(help="the key registry (an SQLite file)")]


@merge_app.callback(invoke_without_command=True)
def merge(
    ctx: typer.Context,
    anchor: Annotated[Path | None, typer.Option(help="the anchor directory")] = None,
    expert: Annotated[
        list[Path] | None, typer.Option("--expert", help="expert package (repeatable)")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="merged model directory to write")] = None,
    top_k: Annotated[
        int | None,
        typer.Option(
            help="experts active per token",
            show_default=f"{DEFAULT_TOP_K}, or every expert when fewer",
        ),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the plan only")] = False,
    no_rivals: Annotated[
        bool,
        typer.Option("--no-rivals", help="leave out the public rival experts the anchor ships"),
    ] = False,
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
) -> None:
    """Merge the anchor and expert packages into one FlexOlmo MoE checkpoint.

    The public rival experts the anchor ships (`flexmoe anchor rivals`) become slots too,
    unless --no-rivals. `flexmoe merge add` and `flexmoe merge remove` then change one slot of
    a merged model.
    """
    if ctx.invoked_subcommand is not None:
        return
    from flexmoe.expert.manifest import read_manifest
    from flexmoe.expert.package import rival_mismatch, rival_versions
    from flexmoe.expert.rivals import shipped_rivals
    from flexmoe.merge.build import build_merged
    from flexmoe.merge.plan import format_plan, plan_dict, plan_merge

    if anchor is None or out is None:
        raise FlexMoEError("--anchor/--out", "both are required to merge")
    rivals = [] if no_rivals else shipped_rivals(anchor)
    shipped = {r.resolve() for r in rivals}  # a rival also named with --expert is one slot
    owners = [p for p in expert or [] if Path(p).resolve() not in shipped]
    versions = rival_versions(rivals)
    for path in owners if rivals else []:  # trained against other rivals: merged, with a warning
        why = rival_mismatch(read_manifest(path), versions)
        if why is not None:
            warnings.warn(
                f"{path}: {why}; the merge keeps the anchor's (--no-rivals: none)", stacklevel=1
            )
    if out.exists() and not force and not dry_run:
        raise FlexMoEError(out, "already exists; choose another --out or pass --force")
    with open_registry(registry) as keys:
        plan = plan_merge(anchor, [*rivals, *owners], top_k=top_k, registry=keys)
    if not as_json:
        typer.echo(format_plan(plan))
    if not dry_run:
        build_merged(plan, out, overwrite=force)
    if as_json:
        emit(True, {**plan_dict(plan), "out": None if dry_run else str(out)}, "")
    elif not dry_run:
        typer.echo(f"merged model -> {out}")


@merge_app.command("add")
def merge_add(
    model: ModelArg,
    package: Annotated[Path, typer.Argument(help="expert package to add as a new slot")],
    out: EditOutOpt = None,
    registry: RegistryOpt = None,
    replace: Annotated[
        str | None,
        typer.Option(
            "--replace",
            help="a newer version of this expert (same name, same owner) takes its slot",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Add one expert to a merged model, without reading the other owners' packages."""
    from flexmoe.merge.edit import add_expert

    with open_registry(registry) as keys:
        written = add_expert(model, package, out=out, registry=keys, replace=replace)
    done = f"{replace} replaced" if replace else "the new expert"
    found = {"out": str(written), **({"replaced": replace} if replace else {})}
    emit(as_json, found, f"model with {done} -> {written}")


@merge_app.command("remove")
def merge_remove(
    model: ModelArg,
    name: Annotated[str, typer.Argument(help="expert to remove")],
    out: EditOutOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Remove one expert (its FFN and router row) from a merged model."""
    from flexmoe.merge.edit import remove_expert

    written = remove_expert(model, name, out=out)
    emit(as_json, {"out": str(written), "removed": name}, f"model without {name} -> {written}")


@router_app.command("tune")
@training_options(
    ROUTER_TUNING, leave_out=frozenset({"checkpoint_every", "activation_checkpointing", "fsdp"})
)
def router_tune(
    model: ModelArg,
    out: Annotated[Path, typer.Option(help="tuned model directory to write")],
    training: TrainConfig,
    data: Annotated[
        list[str] | None, typer.Option("--data", help="proxy text per expert: " + DATA_HELP)
    ] = None,
    proxies: Annotated[
        list[Path] | None,
        typer.Option("--proxies", help="an owner's proxies.json (repeatable); needs --public-data"),
    ] = None,
    public_data: Annotated[
        list[str] | None, typer.Option(help="the public corpus the proxies' hashes refer to")
    ] = None,
    bias: BiasOpt = None,
    device: DeviceOpt = "auto",
    cache_dir: CacheOpt = None,
    text_field: TextFieldOpt = "text",
    id_field: IdFieldOpt = None,
    log_dir: LogDirOpt = None,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
) -> None:
    """Train only the router rows on small proxy data (everything else frozen); write a new model.

    The slot table records the tuning; it weakens strict opt-out, and `flexmoe members list`
    says so.
    """
    from flexmoe.device import pick_device
    from flexmoe.merge.tune import proxy_specs, tune_router

    with tempfile.TemporaryDirectory() as work:
        specs = data_specs(data, text_field, id_field)
        if proxies:
            public = data_specs(
                public_data, text_field, id_field, default_domain="public", option="--public-data"
            )
            paths = tuple(p for s in public for p in s.paths)
            specs += proxy_specs(proxies, paths, Path(work), text_field, id_field)
        result = tune_router(
            model,
            specs,
            out=out,
            cfg=training,
            device=pick_device(device),
            cache_dir=token_cache(cache_dir),
            use_bias=use_bias(bias),
            overwrite=force,
            log_dir=log_dir,
        )
    val = result.train.final_val_loss
    emit(
        as_json,
        train_summary(result.out, result.train),
        f"router tuned: {result.train.steps} steps, {result.train.tokens:,} tokens, final train "
        f"loss {result.train.final_train_loss:.4f}"
        + (f", validation {val:.4f}" if val is not None else "")
        + f" -> {result.out}",
    )


def generate(
    model: ModelArg,
    prompt: Annotated[str, typer.Argument(help="the prompt")],
    exclude: ExcludeOpt = None,
    include: IncludeOpt = None,
    license: LicenseOpt = None,
    attribution: Annotated[bool, typer.Option("--attribution", help="print who answered")] = False,
    per_token: Annotated[bool, typer.Option("--per-token", help="attribution per token")] = False,
    max_new_tokens: Annotated[int, typer.Option(help="tokens to generate at most")] = 64,
    temperature: Annotated[float, typer.Option(help="sampling temperature (0: greedy)")] = 1.0,
    top_p: Annotated[float, typer.Option(help="nucleus sampling: keep this much mass")] = 0.95,
    seed: SeedOpt = 0,
    bias: BiasOpt = None,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Generate text from a merged model with a per-call expert selection and attribution."""
    from flexmoe.data.tokenizer import load_tokenizer
    from flexmoe.device import pick_device
    from flexmoe.inference.generate import format_attribution
    from flexmoe.inference.generate import generate as run
    from flexmoe.inference.selection import Selection
    from flexmoe.merge.layout import load_merged, read_slots
    from flexmoe.merge.standing import standing_exclusions

    slots = read_slots(model)
    net = load_merged(model, use_bias=use_bias(bias), device=pick_device(device))
    selection = Selection(
        include=frozenset(include or ()),
        exclude=frozenset(exclude or ()),
        licenses=frozenset(license or ()),
        opted_out=standing_exclusions(model),
    )
    result = run(
        net,
        load_tokenizer(model),
        prompt,
        slots=slots,
        selection=selection,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        per_token=per_token,
    )
    if as_json:
        emit(True, asdict(result), "")
        return
    typer.echo(prompt + result.text)
    if attribution or per_token:
        typer.echo("")
        typer.echo(format_attribution(result, slots))
    if per_token and result.per_token:
        typer.echo(json.dumps(result.per_token))


@members_app.command("list")
def members_list(model: ModelArg, as_json: JsonOpt = False) -> None:
    """Each expert's owner, license and standing (in or out); whether routing was tuned."""
    from flexmoe.merge.standing import StandingStore

    with StandingStore(model) as store:
        statuses = store.statuses()
        table = store.model.table()
    tuned, federation = table.router_tuning, table.federation
    if as_json:
        rows = [
            {**asdict(s.slot), "opted_out": s.opted_out, "reason": s.reason, "updated": s.updated}
            for s in statuses
        ]
        record = tuned.model_dump(mode="json") if tuned else None
        versions = None
        if federation is not None:
            router = federation.router_versions[federation.current_router]
            versions = {
                "router": router.model_dump(mode="json"),
                "slots": federation.current_slots,
                "trunk": federation.current_trunk,
                "rounds": len(federation.rounds),
            }
        emit(True, {"experts": rows, "router_tuning": record, "versions": versions}, "")
        return
    typer.echo(
        f"{'slot':<5} {'expert':<14} {'owner':<28} {'license':<22} {'signed by':<18} "
        f"{'DP eps':<8} {'status':<8} reason"
    )
    for s in statuses:
        status = "out" if s.opted_out else "in"
        slot = s.slot
        owner, license_id = printable(slot.owner, 64), printable(slot.license, 64)
        signer = printable(slot.signer[:16]) if slot.signer else "-"
        epsilon = f"{slot.epsilon:.3g}" if slot.epsilon is not None else "-"
        typer.echo(
            f"{slot.index:<5} {printable(slot.name, 64):<14} {owner:<28} {license_id:<22} "
            f"{signer:<18} {epsilon:<8} {status:<8} {printable(s.reason, 200)}"
        )
    if tuned:
        on = ", ".join(f"{name} ({docs} documents)" for name, docs in tuned.data.items())
        typer.echo(
            f"routing tuned after merging on {tuned.time}: {tuned.steps} steps on {on}. "
            "Every router row was trained together, so an opt-out here is not as strict as in "
            "an untuned merge."
        )
    else:
        typer.echo("routing tuned after merging: no")
    if federation is not None:
        router = federation.router_versions[federation.current_router]
        shaped = ", ".join(router.shaped_by) or "no owner's text"
        typer.echo(
            f"federated rounds: {len(federation.rounds)}; router version {router.version} "
            f"(round {router.round}, depends on {shaped}); slot versions "
            f"{_versions(federation.current_slots)}; {_trunk_said(federation)}"
        )


def _trunk_said(federation: Federation) -> str:
    if not federation.trunk_versions:
        return "trunk as merged"
    trunk = federation.trunk_versions[federation.current_trunk]
    shaped = ", ".join(trunk.shaped_by) or "no owner's text"
    return f"trunk version {trunk.version} (round {trunk.round}, depends on {shaped})"


def _set_standing(model: Path, name: str, opted_out: bool, reason: str, as_json: bool) -> None:
    from flexmoe.merge.layout import MergedModel
    from flexmoe.merge.standing import StandingStore

    with StandingStore(model) as store:
        store.set(name, opted_out=opted_out, reason=reason)
    state = "opted out" if opted_out else "opted in"
    payload: dict[str, object] = {"expert": name, "opted_out": opted_out}
    text = f"{name}: {state}"
    if opted_out and MergedModel.open(model).table().federation is not None:
        from flexmoe.federated.rounds import revert_for_opt_out

        record = revert_for_opt_out(model)
        if record is not None:
            payload["router_version"] = record.current_router
            payload["slot_versions"] = record.current_slots
            payload["trunk_version"] = record.current_trunk
            text += (
                f"; the model is back at router version {record.current_router}, slot "
                f"versions {_versions(record.current_slots)} and trunk version "
                f"{record.current_trunk}, which {name} never shaped "
                "(`flexmoe fed simulate` without it rebuilds them)"
            )
    emit(as_json, payload, text)


def _versions(slots: dict[str, int]) -> str:
    return ", ".join(f"{n} v{v}" for n, v in slots.items())


@members_app.command("opt-out")
def members_opt_out(
    model: ModelArg,
    name: ExpertArg,
    reason: Annotated[str, typer.Option(help="why (kept in the audit log)")] = "",
    as_json: JsonOpt = False,
) -> None:
    """Stop using an expert from the next request on; recorded with a timestamp."""
    _set_standing(model, name, True, reason, as_json)


@members_app.command("opt-in")
def members_opt_in(model: ModelArg, name: ExpertArg, as_json: JsonOpt = False) -> None:
    """Use an expert again from the next request on; recorded with a timestamp."""
    _set_standing(model, name, False, "", as_json)


def serve(
    model: ModelArg,
    listen: Annotated[str, typer.Option(help="HOST:PORT to listen on")] = "127.0.0.1:8000",
    host: Annotated[str | None, typer.Option(hidden=True, help="old: the host of --listen")] = None,
    port: Annotated[int | None, typer.Option(hidden=True, help="old: the port of --listen")] = None,
    max_batch: Annotated[int, typer.Option(help="requests generated together at most")] = 8,
    admin_token_file: Annotated[
        Path | None,
        typer.Option(help="file with the admin token (mode 600); else $FLEXMOE_ADMIN_TOKEN"),
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="model id in the API (default: dir name)")
    ] = None,
    bias: BiasOpt = None,
    device: DeviceOpt = "auto",
    threads: Annotated[
        int | None,
        typer.Option(help="CPU threads for generation [default: the usable cores less one]"),
    ] = None,
    max_body_bytes: Annotated[
        int, typer.Option(help="larger request bodies are refused with 413")
    ] = 1 << 20,
) -> None:
    """Serve the merged model over an OpenAI-compatible HTTP API (needs the serve extra)."""
    import torch

    address = _listen(listen, host, port)

    from flexmoe.device import pick_device, serving_threads
    from flexmoe.serve.auth import read_admin_token

    if threads is not None and threads < 1:
        raise FlexMoEError("--threads", "must be at least 1")
    if max_body_bytes < 1024:
        raise FlexMoEError("--max-body-bytes", "must be at least 1024")
    torch.set_num_threads(threads or serving_threads())

    try:
        import uvicorn

        from flexmoe.serve.app import create_app
        from flexmoe.serve.http import server_config
    except ImportError as e:
        raise FlexMoEError(
            "serve", f"needs the serve extra: pip install 'flexmoe[serve]' ({e})"
        ) from e
    if max_batch < 1:
        raise FlexMoEError("--max-batch", "must be at least 1")
    app_ = create_app(
        model,
        device=pick_device(device),
        admin_token=read_admin_token(admin_token_file),
        max_batch=max_batch,
        name=name,
        use_bias=use_bias(bias),
        max_body_bytes=max_body_bytes,
    )
    uvicorn.Server(server_config(app_, host=address[0], port=address[1])).run()


def _listen(listen: str, host: str | None, port: int | None) -> tuple[str, int]:
    """``--listen HOST:PORT``, or the old ``--host``/``--port`` (one release more, warned)."""
    from flexmoe.io import parse_address

    address = parse_address(listen, "--listen")
    if host is None and port is None:
        return address
    said = "--host and --port are now --listen HOST:PORT; the old spelling goes in the next release"
    warnings.warn(said, FutureWarning, stacklevel=2)
    return parse_address(f"{host or address[0]}:{port or address[1]}", "--port")


@keys_app.command("generate")
def keys_generate(
    owner: Annotated[str, typer.Option(help="the owning organisation, as in its manifests")],
    out: Annotated[
        Path, typer.Option(help="private key file to write; the public key goes to *.pub.json")
    ],
    as_json: JsonOpt = False,
    force: ForceOpt = False,
) -> None:
    """Make an owner's Ed25519 signing key pair. Keep the private key; send the .pub.json file
    to the coordinator (encrypted when FLEXMOE_KEY_PASSPHRASE is set)."""
    from flexmoe.expert.signing import generate_key, public_key_path

    public = generate_key(out, owner, force=force)
    emit(
        as_json,
        {
            "private_key": str(out),
            "public_key": str(public_key_path(out)),
            "fingerprint": public.fingerprint,
        },
        f"private key -> {out} (keep it; readable by you only)\n"
        f"public key  -> {public_key_path(out)} (send it to the coordinator)\n"
        f"fingerprint {public.fingerprint}",
    )


@keys_app.command("register")
def keys_register(
    registry: RegistryArg,
    public_key: Annotated[Path, typer.Argument(help="an owner's .pub.json file")],
    as_json: JsonOpt = False,
) -> None:
    """Register an owner's public key (the registry is made if missing, requiring signatures)."""
    from flexmoe.expert.registry import KeyRegistry
    from flexmoe.expert.signing import read_public_key

    key = read_public_key(public_key)
    with KeyRegistry(registry, create=True) as keys:
        info = keys.register(key)
    emit(
        as_json, asdict(info), f"registered key {info.fingerprint} for {printable(info.owner, 64)}"
    )


@keys_app.command("revoke")
def keys_revoke(
    registry: RegistryArg,
    fingerprint: Annotated[str, typer.Argument(help="the key's fingerprint (8+ hex digits)")],
    as_json: JsonOpt = False,
) -> None:
    """Revoke a signing key: every package it signed is refused from now on."""
    from flexmoe.expert.registry import KeyRegistry

    with KeyRegistry(registry) as keys:
        info = keys.revoke(fingerprint)
    emit(as_json, asdict(info), f"revoked key {info.fingerprint} of {printable(info.owner, 64)}")


@keys_app.command("list")
def keys_list(
    registry: RegistryArg,
    require: Annotated[
        bool | None,
        typer.Option(
            "--require-signatures/--allow-unsigned",
            help="change the policy: refuse unsigned packages, or take them",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """The registered keys (fingerprint, owner, added, revoked) and the signature policy."""
    from flexmoe.expert.registry import KeyRegistry

    with KeyRegistry(registry) as keys:
        if require is not None:
            keys.set_require_signatures(require)
        rows, required = keys.list(), keys.require_signatures

    def table() -> str:
        lines = [f"{'fingerprint':<18} {'owner':<28} {'added':<26} revoked"]
        lines += [
            f"{k.fingerprint[:16]:<18} {printable(k.owner, 28):<28} {k.added:<26} "
            f"{k.revoked or '-'}"
            for k in rows
        ]
        return "\n".join([*lines, f"unsigned packages: {'refused' if required else 'taken'}"])

    emit(as_json, {"keys": [asdict(k) for k in rows], "require_signatures": required}, table)


@tokens_app.command("add")
def tokens_add(model: ModelArg, name: ExpertArg, as_json: JsonOpt = False) -> None:
    """Make a bearer token for the owner of expert NAME; printed once, only its hash is kept."""
    from flexmoe.serve.auth import OwnerTokens

    with OwnerTokens(model) as tokens:
        token = tokens.add(name)
    emit(as_json, {"expert": name, "token": token}, token)
    typer.echo(
        f"(the token for {name}'s owner; it is not stored and cannot be shown again)", err=True
    )


@tokens_app.command("revoke")
def tokens_revoke(
    model: ModelArg,
    name: ExpertArg,
    token_id: Annotated[int | None, typer.Option("--id", help="one token (default: all)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Revoke the tokens of expert NAME's owner (all, or one by --id)."""
    from flexmoe.serve.auth import OwnerTokens

    with OwnerTokens(model) as tokens:
        count = tokens.revoke(name, token_id)
    if token_id is not None and count == 0:
        raise FlexMoEError("--id", f"no live token {token_id} for {name}")
    emit(as_json, {"expert": name, "revoked": count}, f"revoked {count} token(s) of {name}")


@tokens_app.command("list")
def tokens_list(model: ModelArg, as_json: JsonOpt = False) -> None:
    """The tokens made for each owner (id, created, revoked); never the tokens themselves."""
    from flexmoe.serve.auth import OwnerTokens

    with OwnerTokens(model) as tokens:
        rows = tokens.list()

    def table() -> str:
        lines = [f"{'id':<5} {'expert':<16} {'created':<26} revoked"]
        lines += [f"{r.id:<5} {r.expert:<16} {r.created:<26} {r.revoked or '-'}" for r in rows]
        return "\n".join(lines)

    emit(as_json, [asdict(r) for r in rows], table)


def ledger(
    model: ModelArg,
    by: Annotated[str, typer.Option(help="day or expert")] = "expert",
    as_json: JsonOpt = False,
) -> None:
    """Summarise the server's usage ledger: responses and tokens per day or per expert."""
    from flexmoe.serve.ledger import Ledger

    if by not in ("day", "expert"):
        raise FlexMoEError("--by", f"expected day or expert, got {by!r}")
    with Ledger(model, create=False) as book:
        rows = book.summary(by)

    def table() -> str:
        tokens = "tokens (weighted)" if by == "expert" else "completion tokens"
        lines = [f"{by:<16} {'responses':>10} {tokens:>18} {'prompt tokens':>14}"]
        lines += [
            f"{r.key:<16} {r.responses:>10} {r.completion_tokens:>18.1f} {r.prompt_tokens:>14}"
            for r in rows
        ]
        return "\n".join(lines)

    emit(as_json, [asdict(r) for r in rows], table)
