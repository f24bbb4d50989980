"""The public anchor: train or import it, fingerprint it, and its public router vectors.

An anchor directory is a transformers OLMo-2 checkpoint (config.json, model.safetensors,
tokenizer files) plus ``public_router.safetensors`` (``(layers, hidden)``: r_0 in every layer)
and ``flexmoe_anchor.json``, the manifest below.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import FlexOlmoConfig, Olmo2Config, Olmo2ForCausalLM, PreTrainedTokenizerBase

from flexmoe import __version__
from flexmoe.data.documents import DataSpec
from flexmoe.data.packing import TokenStream, pack_documents
from flexmoe.data.split import SplitDocuments, load_splits
from flexmoe.data.tokenizer import load_tokenizer, tokenizer_fingerprint, train_tokenizer
from flexmoe.errors import FlexMoEError
from flexmoe.io import atomic_directory, read_json, read_manifest_model, write_json
from flexmoe.model import names
from flexmoe.model.checkpoint import (
    build_dense,
    read_config,
    read_state_dict,
    save_model,
    tensors_sha256,
)
from flexmoe.model.config import ModelDims, dense_config, olmo2_config
from flexmoe.router_init import RouterInitMethod, RouterInitRequest, domain_rows
from flexmoe.training.config import TrainConfig
from flexmoe.training.loop import TrainResult, barrier, init_distributed, train

MANIFEST_FILE = "flexmoe_anchor.json"
ROUTER_FILE = "public_router.safetensors"
ROUTER_KEY = "public_router"
HISTORY_FILE = "training_history.json"


class RouterInit(BaseModel):
    """How the public router vectors were made."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Literal["anchor-hidden", "embedder"]
    params: dict[str, str | int | float]


class AnchorManifest(BaseModel):
    """flexmoe's record of an anchor: what experts must match, and where the anchor came from."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = 1
    kind: Literal["flexmoe-anchor"] = "flexmoe-anchor"
    fingerprint: str
    tokenizer_fingerprint: str
    router_init: RouterInit
    origin: Literal["trained", "imported"]
    created: str
    flexmoe_version: str
    seq_len: int
    training: dict[str, float | int | str | None] | None = None


@dataclass
class Anchor:
    """A loaded, verified anchor."""

    path: Path
    model: Olmo2ForCausalLM
    tokenizer: PreTrainedTokenizerBase
    public_router: torch.Tensor  # (layers, hidden)
    manifest: AnchorManifest


def fingerprint(state: dict[str, torch.Tensor], public_router: torch.Tensor) -> str:
    """sha256 over every anchor tensor (all of them stay frozen in experts) and r_0.

    Canonical order: sorted names; each contributes its name, dtype, shape and raw bytes.
    """
    return tensors_sha256({**state, ROUTER_KEY: public_router})


def _write_anchor(
    out: Path,
    *,
    model: Olmo2ForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    public_router: torch.Tensor,
    router_init: RouterInit,
    origin: Literal["trained", "imported"],
    seq_len: int,
    training: dict[str, float | int | str | None] | None,
    overwrite: bool,
    history: list[dict[str, float]] | None = None,
) -> AnchorManifest:
    model.float().cpu()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    manifest = AnchorManifest(
        fingerprint=fingerprint(state, public_router),
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        router_init=router_init,
        origin=origin,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        flexmoe_version=__version__,
        seq_len=seq_len,
        training=training,
    )
    with atomic_directory(out, overwrite=overwrite) as tmp:
        save_model(model, tmp)
        tokenizer.save_pretrained(tmp)
        save_file({ROUTER_KEY: public_router.contiguous()}, str(tmp / ROUTER_FILE))
        write_json(tmp / MANIFEST_FILE, manifest.model_dump())
        if history is not None:
            write_json(tmp / HISTORY_FILE, history)
    return manifest


def compute_public_router(
    model: Olmo2ForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    *,
    device: torch.device,
    method: RouterInitMethod = RouterInitMethod.ANCHOR_HIDDEN,
    embedder: Path | None = None,
    projection_seed: int = 0,
    max_documents: int = 1000,
) -> tuple[torch.Tensor, RouterInit]:
    """r_0 per layer from up to ``max_documents`` public documents (unit-length rows)."""
    if method is RouterInitMethod.RANDOM:
        raise FlexMoEError(
            "--router-init", "the public router is made with anchor-hidden or embedder"
        )
    request = RouterInitRequest(
        model=model, tokenizer=tokenizer, texts=texts, device=device, max_documents=max_documents,
        embedder=embedder, projection_seed=projection_seed,
    )  # fmt: skip
    rows, params = domain_rows(method, request)
    return rows, RouterInit.model_validate({"method": method.value, "params": params})


def train_anchor(
    *,
    data: list[DataSpec],
    out: Path,
    dims: ModelDims,
    cfg: TrainConfig,
    device: torch.device,
    cache_dir: Path,
    tokenizer_dir: Path | None = None,
    vocab_size: int = 8192,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    router_init: RouterInitMethod = RouterInitMethod.ANCHOR_HIDDEN,
    embedder: Path | None = None,
) -> tuple[AnchorManifest, TrainResult]:
    """Pretrain a dense OLMo-2 decoder from scratch on public data and write the anchor."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FlexMoEError(out, "already exists; choose another --out or pass --force")
    splits = load_splits(data)
    if not splits.train:
        raise FlexMoEError(",".join(p for s in data for p in s.paths), "no training documents")
    info = init_distributed(device)
    work = out.parent / f".{out.name}.work"
    tokenizer_dir = tokenizer_dir or work / "tokenizer"
    if info.is_main:  # one process prepares the tokenizer and the token cache; the rest reuse them
        if work.exists() and not resume:
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        if not tokenizer_dir.is_dir():
            texts = (d.text for d in splits.train)
            train_tokenizer(
                texts, tokenizer_dir, vocab_size=vocab_size, model_max_length=cfg.seq_len
            )
        _pack_splits(splits, load_tokenizer(tokenizer_dir), cache_dir)  # fills the token cache
    barrier(info)
    tokenizer = load_tokenizer(tokenizer_dir)
    train_stream, val_stream = _pack_splits(splits, tokenizer, cache_dir)
    config = olmo2_config(
        dims.with_overrides(max_seq_len=cfg.seq_len),
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id or tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id
        if tokenizer.pad_token_id is not None
        else tokenizer.eos_token_id,
    )
    torch.manual_seed(cfg.seed)
    model = Olmo2ForCausalLM(config)
    result = train(
        model, train_stream=train_stream, val_stream=val_stream, cfg=cfg, device=device,
        checkpoint_dir=work / "checkpoint", resume=resume, progress=progress, desc="anchor",
    )  # fmt: skip
    if not info.is_main:
        barrier(info)
        return AnchorManifest.model_validate(read_json(out / MANIFEST_FILE)), result
    public_router, router_record = compute_public_router(
        model, tokenizer, [d.text for d in splits.train], device=device, method=router_init,
        embedder=embedder, projection_seed=cfg.seed,
    )  # fmt: skip
    summary: dict[str, float | int | str | None] = {
        "steps": result.steps,
        "tokens": result.tokens,
        "final_train_loss": result.final_train_loss,
        "final_val_loss": result.final_val_loss,
        "seed": cfg.seed,
        **{f"dims.{k}": v for k, v in asdict(dims).items() if k != "max_seq_len"},
    }
    manifest = _write_anchor(
        out, model=model, tokenizer=tokenizer, public_router=public_router,
        router_init=router_record, origin="trained", seq_len=cfg.seq_len, training=summary,
        overwrite=overwrite, history=result.history,
    )  # fmt: skip
    shutil.rmtree(work, ignore_errors=True)
    barrier(info)
    return manifest, result


def _pack_splits(
    splits: SplitDocuments, tokenizer: PreTrainedTokenizerBase, cache_dir: Path
) -> tuple[TokenStream, TokenStream | None]:
    train_stream = pack_documents(splits.train, tokenizer, cache_dir=cache_dir)
    if not splits.validation:
        return train_stream, None
    return train_stream, pack_documents(splits.validation, tokenizer, cache_dir=cache_dir)


def _dense_from_single_expert(
    config: FlexOlmoConfig, state: dict[str, torch.Tensor], where: Path
) -> tuple[Olmo2Config, dict[str, torch.Tensor]]:
    """A one-expert FlexOlmo checkpoint is an OLMo-2 model with its MLP under another name."""
    if config.num_experts != 1:
        raise FlexMoEError(
            where, f"has {config.num_experts} experts; only a one-expert FlexOlmo is an anchor"
        )
    dense = dict(state)
    for layer in range(config.num_hidden_layers):
        dense.pop(names.ROUTER_ON_DISK.format(layer=layer), None)
        for proj in names.PROJECTIONS:
            key = names.EXPERT.format(layer=layer, expert=0, proj=proj)
            if key in dense:
                dense[names.DENSE_MLP.format(layer=layer, proj=proj)] = dense.pop(key)
    return dense_config(config), dense


def import_anchor(
    hf_dir: Path,
    *,
    out: Path,
    data: list[DataSpec],
    device: torch.device,
    max_documents: int = 1000,
    overwrite: bool = False,
    router_init: RouterInitMethod = RouterInitMethod.ANCHOR_HIDDEN,
    embedder: Path | None = None,
) -> AnchorManifest:
    """Adopt a transformers OLMo-2 (or one-expert FlexOlmo) checkpoint as the anchor.

    The public router vectors are computed from ``data`` (public documents).
    """
    hf_dir = Path(hf_dir)
    if out.exists() and not overwrite:
        raise FlexMoEError(out, "already exists; choose another --out or pass --force")
    if not data:
        raise FlexMoEError(
            "--data", "public documents are needed to compute the public router vectors"
        )
    config = read_config(hf_dir)
    state = {k: v.float() for k, v in read_state_dict(hf_dir).items()}
    if isinstance(config, FlexOlmoConfig):
        config, state = _dense_from_single_expert(config, state, hf_dir)
    assert isinstance(config, Olmo2Config)
    if config.tie_word_embeddings:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
        config.tie_word_embeddings = False
    model = build_dense(config, state, where=hf_dir)
    tokenizer = load_tokenizer(hf_dir)
    splits = load_splits(data)
    texts = [d.text for d in splits.train] or [d.text for d in splits.validation]
    model.to(device)  # type: ignore[arg-type]
    public_router, router_record = compute_public_router(
        model, tokenizer, texts, max_documents=max_documents, device=device, method=router_init,
        embedder=embedder,
    )  # fmt: skip
    return _write_anchor(
        out, model=model, tokenizer=tokenizer, public_router=public_router,
        router_init=router_record, origin="imported", seq_len=config.max_position_embeddings,
        training=None, overwrite=overwrite,
    )  # fmt: skip


def load_anchor(path: Path, *, verify: bool = True) -> Anchor:
    """Load an anchor directory; with ``verify``, recompute and check both fingerprints."""
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if not path.is_dir():
        raise FlexMoEError(path, "anchor directory not found")
    if not manifest_path.is_file():
        raise FlexMoEError(path, f"not a flexmoe anchor (no {MANIFEST_FILE})")
    manifest = read_manifest_model(manifest_path, AnchorManifest)
    config = read_config(path)
    if not isinstance(config, Olmo2Config):
        raise FlexMoEError(path / "config.json", "an anchor must be an OLMo-2 checkpoint")
    state = read_state_dict(path)
    model = build_dense(config, state, where=path)
    try:
        public_router = load_file(path / ROUTER_FILE)[ROUTER_KEY]
    except (OSError, SafetensorError, KeyError) as e:
        raise FlexMoEError(path / ROUTER_FILE, f"missing or unreadable public router ({e})") from e
    expected_shape = (config.num_hidden_layers, config.hidden_size)
    if tuple(public_router.shape) != expected_shape:
        raise FlexMoEError(
            path / ROUTER_FILE, f"shape {tuple(public_router.shape)}, expected {expected_shape}"
        )
    tokenizer = load_tokenizer(path)
    if verify:
        if fingerprint(state, public_router) != manifest.fingerprint:
            raise FlexMoEError(
                path, "tensors do not match the manifest's fingerprint (modified or corrupt)"
            )
        if tokenizer_fingerprint(tokenizer) != manifest.tokenizer_fingerprint:
            raise FlexMoEError(
                path, "tokenizer does not match the manifest's tokenizer fingerprint"
            )
    return Anchor(
        path=path, model=model, tokenizer=tokenizer, public_router=public_router, manifest=manifest
    )
