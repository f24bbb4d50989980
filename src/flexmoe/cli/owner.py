"""A data owner's commands: documents, tokenizers, the anchor, and the owner's expert."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from flexmoe.cli.common import (
    DATA_HELP,
    CacheOpt,
    DataOpt,
    DeviceOpt,
    EmbedderOpt,
    ForceOpt,
    IdFieldOpt,
    JsonOpt,
    LogDirOpt,
    PublicDataOpt,
    RegistryOpt,
    RouterInitOpt,
    SigningKeyOpt,
    StoredDtypeOpt,
    TextFieldOpt,
    as_spec,
    data_specs,
    emit,
    token_cache,
    train_summary,
    training_options,
    with_config,
)
from flexmoe.data.documents import DataSpec
from flexmoe.errors import FlexMoEError, printable
from flexmoe.expert.rivals import RIVAL_TOP_K
from flexmoe.training.config import ANCHOR_TRAINING, EXPERT_TRAINING, TrainConfig

tokenizer_app = typer.Typer(help="Tokenizers.", no_args_is_help=True)
anchor_app = typer.Typer(help="The public anchor model.", no_args_is_help=True)
expert_app = typer.Typer(help="A data owner's expert.", no_args_is_help=True)

PUBLIC = "public"


@tokenizer_app.command("train")
@with_config
def tokenizer_train(
    data: DataOpt,
    out: Annotated[Path, typer.Option(help="tokenizer directory to write")],
    vocab_size: Annotated[int, typer.Option(help="vocabulary size")] = 8192,
    max_length: Annotated[int, typer.Option(help="model_max_length")] = 2048,
    text_field: TextFieldOpt = "text",
    id_field: IdFieldOpt = None,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
) -> None:
    """Train a byte-level BPE on the training split of the given documents."""
    from flexmoe.data.split import load_splits
    from flexmoe.data.tokenizer import train_tokenizer

    docs = load_splits(data_specs(data, text_field, id_field, default_domain=PUBLIC)).train
    tok = train_tokenizer(
        (d.text for d in docs),
        out,
        vocab_size=vocab_size,
        model_max_length=max_length,
        overwrite=force,
    )
    emit(
        as_json,
        {"out": str(out), "vocab_size": len(tok)},
        f"tokenizer with {len(tok)} tokens -> {out}",
    )


@anchor_app.command("train")
@training_options(ANCHOR_TRAINING)
def anchor_train(
    data: DataOpt,
    out: Annotated[Path, typer.Option(help="anchor directory to write")],
    training: TrainConfig,
    preset: Annotated[str, typer.Option(help="size preset: tiny or small")] = "tiny",
    hidden_size: Annotated[int | None, typer.Option(help="override the preset")] = None,
    num_layers: Annotated[int | None, typer.Option(help="override the preset")] = None,
    num_heads: Annotated[int | None, typer.Option(help="override the preset")] = None,
    intermediate_size: Annotated[int | None, typer.Option(help="override the preset")] = None,
    tokenizer: Annotated[Path | None, typer.Option(help="existing tokenizer directory")] = None,
    vocab_size: Annotated[int, typer.Option(help="vocabulary of a newly trained tokenizer")] = 8192,
    device: DeviceOpt = "auto",
    cache_dir: CacheOpt = None,
    text_field: TextFieldOpt = "text",
    id_field: IdFieldOpt = None,
    router_init: RouterInitOpt = "anchor-hidden",
    embedder: EmbedderOpt = None,
    dtype: StoredDtypeOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue from the checkpoint")] = False,
    log_dir: LogDirOpt = None,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
) -> None:
    """Pretrain a dense OLMo-2 anchor from scratch on public documents.

    The anchor records where its public documents are (paths and sha256), so that every
    owner's expert mixes in the same public text by default.
    """
    from flexmoe.anchor import train_anchor
    from flexmoe.device import parse_dtype, pick_device
    from flexmoe.model.config import PRESETS, Preset
    from flexmoe.router_init import parse_method

    if preset not in {p.value for p in Preset}:
        raise FlexMoEError("--preset", f"unknown preset {preset!r}; choose tiny or small")
    dims = PRESETS[Preset(preset)].with_overrides(
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        intermediate_size=intermediate_size,
    )
    manifest, result = train_anchor(
        data=data_specs(data, text_field, id_field, default_domain=PUBLIC),
        out=out,
        dims=dims,
        cfg=training,
        device=pick_device(device),
        cache_dir=token_cache(cache_dir),
        tokenizer_dir=tokenizer,
        vocab_size=vocab_size,
        resume=resume,
        overwrite=force,
        router_init=parse_method(router_init),
        embedder=embedder,
        dtype=parse_dtype(dtype or "float32"),
        log_dir=log_dir,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        emit(
            as_json,
            train_summary(out, result, fingerprint=manifest.fingerprint),
            f"anchor -> {out}: {result.steps} steps, {result.tokens:,} tokens, "
            f"val loss {result.final_val_loss}, fingerprint {manifest.fingerprint[:16]}",
        )


@anchor_app.command("import")
def anchor_import(
    hf_dir: Annotated[Path, typer.Argument(help="transformers OLMo-2 checkpoint directory")],
    out: Annotated[Path, typer.Option(help="anchor directory to write")],
    data: Annotated[
        list[str],
        typer.Option("--data", help="public documents for the router vectors: " + DATA_HELP),
    ],
    device: DeviceOpt = "auto",
    text_field: TextFieldOpt = "text",
    id_field: IdFieldOpt = None,
    router_init: RouterInitOpt = "anchor-hidden",
    embedder: EmbedderOpt = None,
    dtype: StoredDtypeOpt = None,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
) -> None:
    """Adopt an existing OLMo-2 (or one-expert FlexOlmo) checkpoint as the anchor."""
    from flexmoe.anchor import import_anchor
    from flexmoe.device import parse_dtype, pick_device
    from flexmoe.router_init import parse_method

    manifest = import_anchor(
        hf_dir,
        out=out,
        data=data_specs(data, text_field, id_field, default_domain=PUBLIC),
        device=pick_device(device),
        dtype=parse_dtype(dtype) if dtype else None,
        overwrite=force,
        router_init=parse_method(router_init),
        embedder=embedder,
    )
    emit(
        as_json,
        {"out": str(out), "dtype": manifest.dtype, "fingerprint": manifest.fingerprint},
        f"anchor -> {out}: {manifest.dtype}, fingerprint {manifest.fingerprint[:16]}",
    )


@anchor_app.command("rivals")
@training_options(EXPERT_TRAINING)
def anchor_rivals(
    anchor: Annotated[
        Path, typer.Option(help="the anchor directory (rivals go to ANCHOR/rivals/)")
    ],
    license: Annotated[
        str, typer.Option("--license", help="SPDX license identifier of the public text")
    ],
    training: TrainConfig,
    count: Annotated[int, typer.Option(help="how many rivals (clusters of the public text)")] = 2,
    public_data: PublicDataOpt = None,
    device: DeviceOpt = "auto",
    cache_dir: CacheOpt = None,
    text_field: TextFieldOpt = "text",
    id_field: IdFieldOpt = None,
    signing_key: SigningKeyOpt = None,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
) -> None:
    """Train the coordinator's public rival experts and ship them with the anchor.

    The public text is split into --count clusters; one expert is trained on each, as an owner
    trains hers. Owners' `expert train` then trains against them and `merge` keeps them as
    slots (both by default, with --no-rivals to leave them out).
    """
    from flexmoe.device import pick_device
    from flexmoe.expert.manifest import RIVALS_DIR
    from flexmoe.expert.rival_training import train_rivals

    manifests = train_rivals(
        anchor,
        public_specs(anchor, public_data, text_field, id_field),
        count=count,
        license=license,
        cfg=training,
        device=pick_device(device),
        cache_dir=token_cache(cache_dir),
        signing_key=signing_key,
        overwrite=force,
    )
    names = [m.name for m in manifests]
    target = Path(anchor) / RIVALS_DIR
    emit(
        as_json,
        {"out": str(target), "rivals": names},
        f"rivals {', '.join(names)} -> {target}",
    )


def public_specs(
    anchor: Path, given: list[str] | None, text_field: str, id_field: str | None
) -> list[DataSpec]:
    """``--public-data`` as given, or else the public corpus the anchor records."""
    from flexmoe.anchor import ANCHOR_MANIFEST, AnchorManifest
    from flexmoe.data.public import find_public_corpus, warn_if_other_corpus
    from flexmoe.io import read_manifest_model

    manifest = read_manifest_model(Path(anchor) / ANCHOR_MANIFEST, AnchorManifest)
    if not given:
        return find_public_corpus(anchor, manifest.public_data)
    specs = data_specs(given, text_field, id_field, default_domain=PUBLIC, option="--public-data")
    warn_if_other_corpus(specs, manifest.public_data)
    return specs


def _owner_data(
    data: list[str], name: str | None, text_field: str, id_field: str | None
) -> tuple[str, DataSpec]:
    """The expert's name and its one domain of data."""
    specs = data_specs(data, text_field, id_field, default_domain=name)
    if len(specs) != 1:
        raise FlexMoEError(
            "--data",
            f"an expert trains on one domain, got {len(specs)}: "
            + ", ".join(s.domain for s in specs),
        )
    (spec,) = specs
    if name is not None and spec.domain != name:
        raise FlexMoEError("--data", f"domain {spec.domain!r} is not the expert's --name {name!r}")
    return spec.domain, spec


OwnerDataOpt = Annotated[
    list[str],
    typer.Option(
        "--data", help="the owner's documents: " + DATA_HELP + " (DOMAIN is the expert's name)"
    ),
]
ExpertNameOpt = Annotated[
    str | None, typer.Option(help="expert name, also its domain [default: --data's DOMAIN]")
]
NoPublicDataOpt = Annotated[
    bool,
    typer.Option(
        "--no-public-data",
        help="train on the owner's text alone (measured: the merged model does worse, above "
        "all on public text)",
    ),
]
TokensOpt = Annotated[
    int | None, typer.Option(help="train on this many tokens (overrides --steps)")
]
DpRecordEpsilonOpt = Annotated[
    float | None,
    typer.Option(
        help="record-level DP: train with DP-SGD (Opacus) so that any one training block of the "
        "owner's text costs at most this epsilon"
    ),
]
DpClipOpt = Annotated[
    float, typer.Option(help="DP-SGD's per-record gradient clip norm (with --dp-record-epsilon)")
]


@expert_app.command("train")
@training_options(EXPERT_TRAINING)
def expert_train(
    anchor: Annotated[Path, typer.Option(help="the anchor directory")],
    data: OwnerDataOpt,
    owner: Annotated[str, typer.Option(help="the owning organisation")],
    license: Annotated[str, typer.Option("--license", help="SPDX license identifier")],
    out: Annotated[Path, typer.Option(help="package directory to write")],
    training: TrainConfig,
    name: ExpertNameOpt = None,
    description: Annotated[str, typer.Option(help="what the expert knows, for its users")] = "",
    public_data: PublicDataOpt = None,
    no_public_data: NoPublicDataOpt = False,
    public_fraction: Annotated[float, typer.Option(help="share of public tokens")] = 0.25,
    public_sample: Annotated[
        str,
        typer.Option(
            help="which public tokens: prefix (the first, in document-id order) or spread "
            "(pieces over all of them)"
        ),
    ] = "prefix",
    stay_close: Annotated[
        float,
        typer.Option(
            help="weight of a penalty on the expert's squared distance from the public expert, "
            "relative to it (0: none)"
        ),
    ] = 0.0,
    router_objective: Annotated[
        float | None,
        typer.Option(
            help="weight of a loss teaching the router the owner's tokens from the public ones "
            "(default 0.1 where public text is mixed in and DP-SGD is off; 0: none)"
        ),
    ] = None,
    rival: Annotated[
        list[Path] | None,
        typer.Option(
            help="a package of the coordinator's public experts to train against (repeatable; "
            "default: those the anchor ships in ANCHOR/rivals/, where DP-SGD is off)"
        ),
    ] = None,
    no_rivals: Annotated[
        bool,
        typer.Option(
            "--no-rivals",
            help="train against the public expert alone, not the anchor's rivals (measured: "
            "the merged model does worse)",
        ),
    ] = False,
    rival_top_k: Annotated[
        int, typer.Option(help="experts per token when training against rivals (the merge's)")
    ] = RIVAL_TOP_K,
    router_init: RouterInitOpt = "anchor-hidden",
    embedder: EmbedderOpt = None,
    tokens: TokensOpt = None,
    device: DeviceOpt = "auto",
    cache_dir: CacheOpt = None,
    text_field: TextFieldOpt = "text",
    id_field: IdFieldOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue from the checkpoint")] = False,
    signing_key: SigningKeyOpt = None,
    dp_record_epsilon: DpRecordEpsilonOpt = None,
    dp_record_delta: Annotated[
        float, typer.Option(help="DP-SGD's delta (with --dp-record-epsilon)")
    ] = 1e-5,
    dp_clip: DpClipOpt = 1.0,
    log_dir: LogDirOpt = None,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
) -> None:
    """Train one expert alone against the frozen anchor; write its package.

    A share of public text is mixed in (--public-fraction), by default the anchor's own public
    corpus, so that the router also learns what belongs to the public expert.
    """
    from dataclasses import replace

    from flexmoe.device import pick_device
    from flexmoe.expert import spec as parts
    from flexmoe.expert.private import PrivacySettings
    from flexmoe.expert.train import train_expert
    from flexmoe.router_init import parse_method

    name, owned = _owner_data(data, name, text_field, id_field)
    if public_sample not in parts.PublicSample._value2member_map_:
        raise FlexMoEError("--public-sample", f"choose prefix or spread, not {public_sample!r}")
    for option, value in (("--stay-close", stay_close), ("--router-objective", router_objective)):
        if value is not None and value < 0:
            raise FlexMoEError(option, f"must be >= 0, got {value}")
    if public_data and no_public_data:
        raise FlexMoEError("--no-public-data", "contradicts --public-data")
    if rival and no_rivals:
        raise FlexMoEError("--no-rivals", "contradicts --rival")
    public = () if no_public_data else public_specs(anchor, public_data, text_field, id_field)
    if tokens is not None:
        steps = max(1, -(-tokens // (training.batch_size * training.seq_len)))  # ceil
        training = replace(training, steps=steps)
    spec = as_spec(
        parts.ExpertSpec,
        anchor=anchor,
        data=(owned,),
        identity=parts.ExpertIdentity(name, owner, license, description),
        schedule=training,
        public={"data": public or (), "fraction": public_fraction, "sample": public_sample},
        rivals={"packages": () if no_rivals else rival, "top_k": rival_top_k},
        objectives={"stay_close": stay_close, "router": router_objective},
        router={"method": parse_method(router_init), "embedder": embedder},
        privacy=None
        if dp_record_epsilon is None
        else PrivacySettings(dp_record_epsilon, dp_record_delta, dp_clip),
    )
    manifest, result = train_expert(
        spec,
        out=out,
        device=pick_device(device),
        cache_dir=token_cache(cache_dir),
        resume=resume,
        overwrite=force,
        signing_key=signing_key,
        log_dir=log_dir,
    )
    spent = manifest.training.privacy
    emit(
        as_json,
        train_summary(out, result, name=manifest.name, dp_epsilon=spent.epsilon if spent else None),
        f"expert {manifest.name} -> {out}: {result.steps} steps, {result.tokens:,} tokens, "
        f"val loss {result.final_val_loss}"
        + (f", DP epsilon {spent.epsilon:.3g} at delta {spent.delta:g}" if spent else ""),
    )


@expert_app.command("verify")
def expert_verify(
    package: Annotated[Path, typer.Argument(help="expert package directory")],
    anchor: Annotated[Path, typer.Option(help="the anchor directory")],
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Check a package: schema, hashes, signature, fingerprints, tensor names, shapes, dtypes,
    values."""
    from flexmoe.expert.verify import verify_package

    rows = verify_package(package, anchor, registry)

    def table() -> str:
        width = max(len(k) for k, _ in rows)  # no field drives the terminal
        return "\n".join(f"{k:<{width}}  {printable(v, 200)}" for k, v in rows) + (
            "\npackage is sound"
        )

    emit(as_json, {"sound": True, **dict(rows)}, table)


@expert_app.command("sign")
def expert_sign(
    package: Annotated[Path, typer.Argument(help="expert package directory")],
    signing_key: Annotated[
        Path,
        typer.Option("--signing-key", help="the owner's private key (`flexmoe keys generate`)"),
    ],
    as_json: JsonOpt = False,
) -> None:
    """Sign a package's manifest (which pins its tensors' sha256) with the owner's key."""
    from flexmoe.expert.package import load_package, sign_package
    from flexmoe.expert.signing import read_private_key

    private = read_private_key(signing_key)
    load_package(package)  # sign only a package that reads back whole
    signature = sign_package(package, private)
    emit(
        as_json,
        {"package": str(package), "fingerprint": signature.fingerprint},
        f"signed {package} with key {signature.fingerprint[:16]}...",
    )


@expert_app.command("proxies")
def expert_proxies(
    anchor: Annotated[Path, typer.Option(help="the anchor directory")],
    data: Annotated[list[str], typer.Option("--data", help="the owner's documents: " + DATA_HELP)],
    out: Annotated[Path, typer.Option(help="proxies.json to write (hashes only)")],
    name: Annotated[
        str | None, typer.Option(help="the expert's name [default: --data's DOMAIN]")
    ] = None,
    public_data: PublicDataOpt = None,
    count: Annotated[int, typer.Option(help="public documents to pick")] = 24,
    device: DeviceOpt = "auto",
    text_field: TextFieldOpt = "text",
    id_field: IdFieldOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Owner side of router tuning: pick the public documents most like your data; write only
    their sha256 to send to the coordinator (no text of yours leaves)."""
    from flexmoe.anchor import load_anchor
    from flexmoe.data.split import load_splits
    from flexmoe.device import pick_device
    from flexmoe.expert.proxies import choose_proxies, write_proxies

    name, spec = _owner_data(data, name, text_field, id_field)
    own = load_splits([spec]).train
    public = load_splits(public_specs(anchor, public_data, text_field, id_field)).train
    choice = choose_proxies(
        load_anchor(anchor), name, own, public, count=count, device=pick_device(device)
    )
    write_proxies(out, choice)
    accuracy = choice.classifier["train_accuracy"]
    emit(
        as_json,
        {"out": str(out), "documents": len(choice.public_sha256), "accuracy": accuracy},
        f"{len(choice.public_sha256)} public documents chosen (classifier accuracy "
        f"{accuracy:.1%}) -> {out}",
    )


@expert_app.command("eval")
def expert_eval(
    package: Annotated[Path, typer.Argument(help="expert package directory")],
    anchor: Annotated[Path, typer.Option(help="the anchor directory")],
    data: DataOpt,
    as_json: JsonOpt = False,
    device: DeviceOpt = "auto",
    cache_dir: CacheOpt = None,
    text_field: TextFieldOpt = "text",
    id_field: IdFieldOpt = None,
) -> None:
    """Held-out bits per byte of the 2-expert specialist next to the anchor's, per domain."""
    from flexmoe.device import pick_device
    from flexmoe.evaluate.specialist import evaluate_specialist, format_specialist_table

    scores = evaluate_specialist(
        package,
        anchor,
        data_specs(data, text_field, id_field),
        device=pick_device(device),
        cache_dir=token_cache(cache_dir),
    )
    rows = [
        {"domain": s.domain, "anchor": asdict(s.anchor), "specialist": asdict(s.specialist)}
        for s in scores
    ]
    emit(as_json, rows, lambda: format_specialist_table(package.name, scores))
