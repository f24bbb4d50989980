"""The experimenter's commands: evaluation, baselines, audits, the report and the demo."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from flexmoe.cli.common import (
    DATA_HELP,
    BiasOpt,
    CacheOpt,
    DataOpt,
    DeviceOpt,
    EmbedderOpt,
    ExcludeOpt,
    ForceOpt,
    IdFieldOpt,
    IncludeOpt,
    JsonOpt,
    LicenseOpt,
    LogDirOpt,
    SeedOpt,
    TextFieldOpt,
    data_specs,
    emit,
    say,
    token_cache,
    train_summary,
    training_options,
    use_bias,
)
from flexmoe.data.documents import DataSpec
from flexmoe.errors import FlexMoEError
from flexmoe.merge import DEFAULT_TOP_K
from flexmoe.training.config import UNRESTRICTED_LEAVE_OUT, UNRESTRICTED_TRAINING, TrainConfig

eval_app = typer.Typer(help="Evaluation.", no_args_is_help=True)
baseline_app = typer.Typer(help="Baselines that need training.", no_args_is_help=True)
audit_app = typer.Typer(help="Audits of what a model gives away.", no_args_is_help=True)

SeqLenOpt = Annotated[int | None, typer.Option(help="context per block [default: the model's]")]


def _split(split: str) -> None:
    from flexmoe.data.split import Split

    if split not in {s.value for s in Split}:
        raise FlexMoEError("--split", f"unknown split {split!r}; choose train, validation or test")


@eval_app.command("ppl")
def eval_ppl(
    model: Annotated[Path, typer.Argument(help="model directory (anchor or merged)")],
    data: DataOpt,
    split: Annotated[str, typer.Option(help="train, validation or test")] = "test",
    seq_len: SeqLenOpt = None,
    as_json: JsonOpt = False,
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

    _split(split)
    selection = None
    if exclude or include or license:
        selection = Selection(
            include=frozenset(include or ()),
            exclude=frozenset(exclude or ()),
            licenses=frozenset(license or ()),
        )
    scores = evaluate_model(
        model,
        data_specs(data, text_field, id_field),
        split=Split(split),
        device=pick_device(device),
        cache_dir=token_cache(cache_dir),
        seq_len=seq_len,
        selection=selection,
        use_bias=use_bias(bias),
    )
    emit(as_json, [asdict(s) for s in scores], lambda: format_table(scores))


@eval_app.command("baselines")
def eval_baselines(
    anchor: Annotated[Path, typer.Option(help="the anchor directory")],
    expert: Annotated[list[str], typer.Option("--expert", help="expert package (repeatable)")],
    merged: Annotated[Path, typer.Argument(help="the merged model directory")],
    data: DataOpt,
    out: Annotated[Path, typer.Option(help="JSON file to write the scores to")],
    unrestricted: Annotated[
        Path | None, typer.Option(help="jointly trained model (flexmoe baseline unrestricted)")
    ] = None,
    tuned: Annotated[Path | None, typer.Option(help="the merged model after router tune")] = None,
    fedavg: Annotated[
        Path | None, typer.Option(help="the FedAvg dense model (flexmoe baseline fedavg)")
    ] = None,
    federated: Annotated[
        Path | None, typer.Option(help="the merged model after flexmoe fed simulate")
    ] = None,
    only: Annotated[
        list[str] | None, typer.Option(help="score only these registry names (repeatable)")
    ] = None,
    max_documents: Annotated[int | None, typer.Option(help="per domain")] = None,
    max_bytes: Annotated[int | None, typer.Option(help="text per domain, in bytes")] = None,
    seq_len: SeqLenOpt = None,
    device: DeviceOpt = "auto",
    cache_dir: CacheOpt = None,
    text_field: TextFieldOpt = "text",
    id_field: IdFieldOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Score the merged model, its variants and the paper's baselines on the same held-out text.

    Registry names: anchor, specialist:NAME, soup, btm, seq-route, unrestricted, fedavg,
    flexmoe, flexmoe:top-K, flexmoe:bias, flexmoe:no-bias, flexmoe:without-NAME,
    flexmoe:prefix-P (document-level routing), flexmoe:tuned, flexmoe:federated.
    """
    from flexmoe.device import pick_device
    from flexmoe.evaluate.suite import run_suite
    from flexmoe.io import write_json

    if out.suffix != ".json":
        raise FlexMoEError(out, "--out must name a .json file")
    results = run_suite(
        anchor_dir=anchor,
        package_dirs=[Path(e) for e in expert],
        merged_dir=merged,
        data=data_specs(data, text_field, id_field),
        device=pick_device(device),
        cache_dir=token_cache(cache_dir),
        unrestricted_dir=unrestricted,
        tuned_dir=tuned,
        extra_models={
            **({"fedavg": fedavg} if fedavg else {}),
            **({"flexmoe:federated": federated} if federated else {}),
        },
        only=only,
        max_documents=max_documents,
        max_bytes=max_bytes,
        seq_len=seq_len,
        log=say,
    )
    found = results.model_dump(mode="json", exclude_unset=True)
    write_json(out, found)
    domains = results.domains

    def table() -> str:
        lines = [f"{'model':<28}" + "".join(f"{d:>12}" for d in domains) + f"{'average':>12}"]
        for name in results.models:
            cells = "".join(f"{results.bpb(name, d):>12.4f}" for d in domains)
            lines.append(f"{name:<28}{cells}{results.average(name):>12.4f}")
        return "\n".join([*lines, f"bits per byte; all scores -> {out}"])

    emit(as_json, found, table)


@baseline_app.command("unrestricted")
@training_options(
    UNRESTRICTED_TRAINING,
    leave_out=UNRESTRICTED_LEAVE_OUT,
)
def baseline_unrestricted(
    anchor: Annotated[Path, typer.Option(help="the anchor directory")],
    data: Annotated[
        list[str], typer.Option("--data", help="every owner's documents: " + DATA_HELP)
    ],
    out: Annotated[Path, typer.Option(help="model directory to write")],
    training: TrainConfig,
    public_data: Annotated[
        list[str] | None,
        typer.Option(help="the public corpus, FILES as for --data [default: the anchor's]"),
    ] = None,
    top_k: Annotated[int, typer.Option(help="experts per token, as in the merged model")] = (
        DEFAULT_TOP_K
    ),
    public_fraction: Annotated[float, typer.Option(help="share of public tokens")] = 0.25,
    embedder: EmbedderOpt = None,
    device: DeviceOpt = "auto",
    cache_dir: CacheOpt = None,
    text_field: TextFieldOpt = "text",
    id_field: IdFieldOpt = None,
    log_dir: LogDirOpt = None,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
) -> None:
    """Train the upper bound that pools all data: the merged model's shape on every domain.

    --steps counts the total over all domains: the sum of the experts' steps.
    """
    from flexmoe.cli.owner import public_specs
    from flexmoe.device import pick_device
    from flexmoe.expert.unrestricted import train_unrestricted

    result = train_unrestricted(
        anchor_dir=anchor,
        data=data_specs(data, text_field, id_field),
        public_data=public_specs(anchor, public_data, text_field, id_field),
        out=out,
        cfg=training,
        top_k=top_k,
        device=pick_device(device),
        cache_dir=token_cache(cache_dir),
        public_fraction=public_fraction,
        embedder=embedder,
        overwrite=force,
        log_dir=log_dir,
    )
    emit(
        as_json,
        train_summary(out, result),
        f"unrestricted -> {out}: {result.steps} steps, {result.tokens:,} tokens, "
        f"val loss {result.final_val_loss}",
    )


@audit_app.command("extraction")
def audit_extraction_cmd(
    model: Annotated[list[Path], typer.Argument(help="model directories (anchor, merged, ...)")],
    data: Annotated[
        list[str], typer.Option("--data", "--docs", help="the training documents: " + DATA_HELP)
    ],
    anchor: Annotated[Path | None, typer.Option(help="the anchor (with --specialist)")] = None,
    specialist: Annotated[
        list[Path] | None, typer.Option(help="expert package audited as its 2-expert model")
    ] = None,
    split: Annotated[str, typer.Option(help="which split of --data to sample")] = "train",
    documents: Annotated[int, typer.Option(help="documents to sample")] = 100,
    samples: Annotated[int, typer.Option(help="continuations per document")] = 4,
    prefix_tokens: Annotated[int, typer.Option(help="tokens of each prompt")] = 32,
    suffix_tokens: Annotated[int, typer.Option(help="tokens generated and compared")] = 32,
    threshold: Annotated[float, typer.Option(help="normalised Levenshtein similarity")] = 0.9,
    seed: SeedOpt = 0,
    as_json: JsonOpt = False,
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

    _split(split)
    if specialist and anchor is None:
        raise FlexMoEError("--specialist", "needs --anchor")
    settings = AuditSettings(
        documents=documents,
        samples=samples,
        prefix_tokens=prefix_tokens,
        suffix_tokens=suffix_tokens,
        threshold=threshold,
        seed=seed,
    )
    specs = data_specs(data, text_field, id_field, default_domain="audit")
    paths = tuple(p for s in specs for p in s.paths)  # one pool, whatever the domains
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
        from flexmoe.expert.package import load_package
        from flexmoe.expert.specialist import build_specialist

        base = load_anchor(anchor)
        for package_dir in specialist:
            package = load_package(package_dir, base)
            results.append(
                audit_extraction(
                    build_specialist(base, package),
                    tokenizer,
                    passages,
                    settings,
                    name=f"specialist:{package.manifest.name}",
                    device=chosen,
                )
            )
    emit(as_json, [asdict(r) for r in results], lambda: format_audit(results))
