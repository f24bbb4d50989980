"""Router tuning after merging (paper section 3.3.3): train only the router, on proxy data.

Every expert and every other tensor stays frozen; only the router rows (and, when the owners'
biases are in use, the biases, kept <= 0) change. The result is a new model directory whose slot
table records that routing was tuned, on what data (domain names, document counts and a hash of
the documents, never the text or its paths) and for how long. Tuning weakens strict opt-out: an
expert's router row was tuned together with the others', so `flexmoe members list` says so.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

from flexmoe.data.documents import DataSpec, Document, write_jsonl
from flexmoe.data.packing import pack_documents
from flexmoe.data.split import load_splits
from flexmoe.errors import FlexMoEError
from flexmoe.expert.proxies import read_proxies, resolve_proxies
from flexmoe.expert.train import project_biases, router_z_loss
from flexmoe.merge.edit import with_router_rows
from flexmoe.merge.layout import APPLY_BIAS, MergedModel
from flexmoe.merge.slots import RouterTuning
from flexmoe.model.checkpoint import moe_layers
from flexmoe.training.config import TrainConfig
from flexmoe.training.loop import TrainResult, train


@dataclass(frozen=True)
class TuneResult:
    out: Path
    train: TrainResult
    record: RouterTuning


def proxy_sample(
    docs: list[Document], *, max_bytes: int, window: int = 2000, seed: int = 0
) -> list[Document]:
    """A small proxy set: one window of at most ``window`` characters from each document, at a
    seeded random offset (not always the title page), until ``max_bytes`` of UTF-8 text.

    The windows keep their document's id, so the proxy falls in the same split as its source.
    """
    if max_bytes <= 0 or window <= 0:
        raise FlexMoEError("proxy", "max_bytes and window must be positive")
    picked: list[Document] = []
    total = 0
    for doc in docs:
        if total >= max_bytes:
            break
        rng = random.Random(f"{seed}:{doc.domain}:{doc.doc_id}")
        start = rng.randrange(max(1, len(doc.text) - window + 1))
        text = doc.text[start : start + window]
        text = text.encode()[: max_bytes - total].decode("utf-8", errors="ignore")
        if text.strip():
            picked.append(Document(doc.domain, doc.doc_id, text))
            total += len(text.encode())
    return picked


def proxy_specs(
    proxies: list[Path],
    public_paths: tuple[str, ...],
    workdir: Path,
    text_field: str = "text",
    id_field: str | None = None,
) -> list[DataSpec]:
    """The coordinator's side of the owners' ``proxies.json`` files: each resolved against the
    training split of the public corpus at ``public_paths`` into a jsonl of public documents in
    ``workdir`` (named after the expert), one data spec each."""
    if not public_paths:
        raise FlexMoEError("--public-data", "--proxies needs the public corpus they refer to")
    public = load_splits([DataSpec("public", public_paths, text_field, id_field)]).train
    specs = []
    for path in proxies:
        choice = read_proxies(path)
        docs = resolve_proxies(choice, public, path)
        target = Path(workdir) / f"{choice.expert}.jsonl"
        write_jsonl(target, ((d.doc_id, d.text) for d in docs))
        specs.append(DataSpec(choice.expert, (str(target),), id_field="id"))
    return specs


def tune_router(
    model_dir: Path,
    data: list[DataSpec],
    *,
    out: Path,
    cfg: TrainConfig,
    device: torch.device,
    cache_dir: Path | None,
    use_bias: bool = APPLY_BIAS,
    overwrite: bool = False,
    progress: bool = True,
    log_dir: Path | None = None,
) -> TuneResult:
    """Tune the router of the merged model at ``model_dir`` on the training split of ``data``
    (its validation split scores it); write it to ``out``."""
    if not data:
        raise FlexMoEError("--data", "give at least one NAME=FILES of proxy data")
    splits = load_splits(data)
    return tune_router_on(
        model_dir,
        splits.train,
        splits.validation,
        out=out,
        cfg=cfg,
        device=device,
        cache_dir=cache_dir,
        use_bias=use_bias,
        overwrite=overwrite,
        progress=progress,
        where=",".join(p for s in data for p in s.paths),
        log_dir=log_dir,
    )


def tune_router_on(
    model_dir: Path,
    train_docs: list[Document],
    val_docs: list[Document],
    *,
    out: Path,
    cfg: TrainConfig,
    device: torch.device,
    cache_dir: Path | None,
    use_bias: bool = APPLY_BIAS,
    overwrite: bool = False,
    progress: bool = True,
    where: str = "proxy data",
    log_dir: Path | None = None,
) -> TuneResult:
    """Tune the router of the merged model at ``model_dir`` on ``train_docs`` as they are (no
    split); ``where`` names them in errors."""
    model_dir, out = Path(model_dir), Path(out)
    if out.resolve() == model_dir.resolve():
        raise FlexMoEError(out, "write the tuned model to a new directory, not over the original")
    if out.exists() and not overwrite:
        raise FlexMoEError(out, "already exists; choose another --out or pass --force")
    if not train_docs:
        raise FlexMoEError(where, "no training documents")
    merged = MergedModel.open(model_dir)
    table = merged.table()
    config, sources = merged.config(table), merged.sources()
    tokenizer = merged.tokenizer()
    train_stream = pack_documents(train_docs, tokenizer, cache_dir=cache_dir)
    if train_stream.num_blocks(cfg.seq_len) == 0:
        raise FlexMoEError(where, f"proxy data is shorter than one block of {cfg.seq_len} tokens")
    val_stream = None
    if val_docs:
        val_stream = pack_documents(val_docs, tokenizer, cache_dir=cache_dir)
        val_stream = val_stream if val_stream.num_blocks(cfg.seq_len) else None

    model = merged.load(use_bias=use_bias)
    for param in model.parameters():
        param.requires_grad_(False)
    for moe in moe_layers(model):
        moe.router.rows.requires_grad_(True)
        moe.router.biases.requires_grad_(use_bias)
    result = train(
        model,
        train_stream=train_stream,
        val_stream=val_stream,
        cfg=cfg,
        device=device,
        progress=progress,
        desc="router tune",
        log_dir=log_dir,
        aux_loss=router_z_loss(cfg.z_loss) if cfg.z_loss > 0 else None,
        after_step=project_biases,
    )
    model.cpu()
    layers = moe_layers(model)
    tuned_sources = with_router_rows(sources, [moe.router.weight.clone() for moe in layers])
    record = _tuning_record(train_docs, result, cfg, use_bias)
    slots = list(table.slots)
    if use_bias:
        for index, slot in enumerate(slots[1:], start=1):
            bias = [float(moe.router.biases[index - 1].detach().clamp(max=0)) for moe in layers]
            slots[index] = slot.model_copy(update={"bias": bias})
    new_table = table.model_copy(update={"slots": slots, "router_tuning": record})
    merged.write(out, sources=tuned_sources, config=config, table=new_table, progress=progress)
    return TuneResult(out=out, train=result, record=record)


def _tuning_record(
    train_docs: list[Document], result: TrainResult, cfg: TrainConfig, use_bias: bool
) -> RouterTuning:
    """What the slot table says of a tuning: counts and a hash of the documents, never text."""
    digest = hashlib.sha256()
    counts: dict[str, int] = {}
    for doc in train_docs:
        digest.update(doc.text_sha256.encode())
        counts[doc.domain] = counts.get(doc.domain, 0) + 1
    return RouterTuning(
        time=datetime.now(UTC).isoformat(timespec="seconds"),
        data=counts,
        documents_sha256=digest.hexdigest(),
        steps=result.steps,
        tokens=result.tokens,
        final_train_loss=result.final_train_loss,
        final_val_loss=result.final_val_loss,
        biases_tuned=use_bias,
        hyperparameters=cfg.to_dict(),
    )
