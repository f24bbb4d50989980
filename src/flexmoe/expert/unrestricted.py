"""The ``unrestricted`` upper bound: the merged model's shape, trained on all the data at once
(the joint counterpart of an owner's expert, beside :mod:`flexmoe.expert.train`).

This is what FlexOlmo gives up by never pooling the owners' data, so it needs every domain's
training text in one place and exists for evaluation only. The anchor is upcycled to the merged
model's shape (N + 1 experts, the same top-k), router rows start the way the owners' rows did
(r_0 the anchor's public vector, r_i from domain i's documents), and every parameter trains on a
mix with the same token budget and proportions as the anchor's continuation in all experts
together: each owner domain an equal share, public text the experts' public fraction.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from transformers import FlexOlmoForCausalLM, Olmo2ForCausalLM

from flexmoe.anchor import Anchor, load_anchor
from flexmoe.data.documents import DataSpec, Document
from flexmoe.data.packing import TokenStream, pack_documents
from flexmoe.data.split import load_splits
from flexmoe.data.tokenizer import save_tokenizer
from flexmoe.errors import FlexMoEError
from flexmoe.expert.train import owner_router_rows, router_z_loss
from flexmoe.io import atomic_directory, write_json
from flexmoe.model.checkpoint import moe_layers, save_model, upcycle
from flexmoe.router_init import RouterInitMethod
from flexmoe.training.config import TrainConfig
from flexmoe.training.job import TrainingJob, refuse_existing
from flexmoe.training.loop import TrainResult

RECORD_FILE = "unrestricted.json"


class UnrestrictedRecord(BaseModel):
    """What ``unrestricted.json`` says of the joint model: its data and training."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["unrestricted"] = "unrestricted"
    anchor_fingerprint: str
    domains: list[str]
    public_fraction: float
    steps: int
    tokens: int
    final_train_loss: float
    final_val_loss: float | None
    hyperparameters: dict[str, float | int | str | bool | None]


def _joint_model(
    anchor_model: Olmo2ForCausalLM, rows: list[torch.Tensor], top_k: int
) -> FlexOlmoForCausalLM:
    """The anchor upcycled to ``len(rows)`` experts, router rows ``rows[slot] (L, H)``, every
    parameter trained but the owners' biases (the joint router sees every domain)."""
    model = upcycle(anchor_model, num_experts=len(rows), top_k=top_k)
    with torch.no_grad():
        for layer, moe in enumerate(moe_layers(model)):
            for slot, domain_rows in enumerate(rows):
                moe.router.rows[slot].copy_(domain_rows[layer])
    for param in model.parameters():
        param.requires_grad_(True)
    for moe in moe_layers(model):
        moe.router.biases.requires_grad_(False)
    return model


def _public_part(
    public_data: list[DataSpec], anchor: Anchor, tokens: int, cache_dir: Path | None
) -> np.ndarray:
    """``tokens`` of the public training text, tiled."""
    public = load_splits(public_data).train
    if not public:
        raise FlexMoEError("--public-data", "no public training documents")
    return _tiled(pack_documents(public, anchor.tokenizer, cache_dir=cache_dir), tokens)


def _tiled(stream: TokenStream, tokens: int) -> np.ndarray:
    """The stream's tokens repeated (or cut) to exactly ``tokens``, as an expert's epochs do."""
    return np.resize(np.asarray(stream.tokens), tokens)


def _joint_streams(
    parts: list[np.ndarray], validation: list[Document], anchor: Anchor, cache_dir: Path | None
) -> tuple[TokenStream, TokenStream | None]:
    """The domains' token parts as one training stream (the order shuffles blocks across
    domains; training only), and the validation documents of every domain as one."""
    dtype = np.asarray(parts[0]).dtype
    tokens = np.concatenate(parts).astype(dtype)
    train = TokenStream(tokens=tokens, num_bytes=0, num_docs=0)
    if not validation:
        return train, None
    return train, pack_documents(validation, anchor.tokenizer, cache_dir=cache_dir)


def train_unrestricted(
    *,
    anchor_dir: Path,
    data: list[DataSpec],
    public_data: list[DataSpec],
    out: Path,
    cfg: TrainConfig,
    top_k: int,
    device: torch.device,
    cache_dir: Path | None,
    public_fraction: float = 0.25,
    embedder: Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    log_dir: Path | None = None,
) -> TrainResult:
    """Train the joint model on ``data`` (one spec per owner domain) and ``public_data``;
    ``cfg.steps`` is the total over all domains (the sum of the experts' steps)."""
    out = refuse_existing(out, overwrite)
    if not data:
        raise FlexMoEError("--data", "the unrestricted model needs at least one owner domain")
    if not 1 <= top_k <= len(data) + 1:
        raise FlexMoEError("--top-k", f"must be in 1..{len(data) + 1}")
    anchor = load_anchor(anchor_dir)
    budget = cfg.steps * cfg.batch_size * cfg.seq_len + 1
    share = int(budget * (1 - public_fraction) / len(data))
    parts, validation, rows = [], [], [anchor.public_router]
    method = RouterInitMethod(anchor.manifest.router_init.method)
    for spec in data:
        splits = load_splits([spec])
        if not splits.train:
            raise FlexMoEError(",".join(spec.paths), f"domain {spec.domain!r} has no training text")
        stream = pack_documents(splits.train, anchor.tokenizer, cache_dir=cache_dir)
        parts.append(_tiled(stream, share))
        validation.extend(splits.validation)
        texts = [d.text for d in splits.train]
        rows.append(owner_router_rows(anchor, method, texts, device=device, embedder=embedder)[0])
    if public_fraction > 0:
        parts.append(_public_part(public_data, anchor, budget - share * len(data), cache_dir))
    train_stream, val_stream = _joint_streams(parts, validation, anchor, cache_dir)
    model = _joint_model(anchor.model, rows, top_k)
    job = TrainingJob(
        out,
        replace(cfg, checkpoint_every=0),
        device,
        "unrestricted",
        progress=progress,
        log_dir=log_dir,
        aux_loss=router_z_loss(cfg.z_loss) if cfg.z_loss > 0 else None,
    )

    def write(state: dict[str, torch.Tensor], result: TrainResult) -> TrainResult:
        model.cpu()
        record = UnrestrictedRecord(
            anchor_fingerprint=anchor.manifest.fingerprint,
            domains=[spec.domain for spec in data],
            public_fraction=public_fraction,
            steps=result.steps,
            tokens=result.tokens,
            final_train_loss=result.final_train_loss,
            final_val_loss=result.final_val_loss,
            hyperparameters=cfg.to_dict(),
        )
        with atomic_directory(out, overwrite=overwrite) as tmp:
            save_model(model, tmp)
            save_tokenizer(anchor.tokenizer, tmp)
            write_json(tmp / RECORD_FILE, record.model_dump())
        return result

    info = job.start()
    return job.run(info, model, train_stream, val_stream, write=write, written=lambda: None)[1]
