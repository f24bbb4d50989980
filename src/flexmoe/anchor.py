"""The public anchor: train or import it, fingerprint it, and its public router vectors.

An anchor directory is a transformers OLMo-2 checkpoint (config.json, model.safetensors or
shards with an index, tokenizer files) plus ``public_router.safetensors`` (``(layers, hidden)``:
r_0 in every layer) and ``flexmoe_anchor.json``, the manifest below. Every tensor is stored in the
anchor's dtype (the manifest's ``dtype``), and the fingerprint is taken over them as stored.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import (
    FlexOlmoConfig,
    Olmo2Config,
    Olmo2ForCausalLM,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from flexmoe import __version__
from flexmoe.card import anchor_card, write_card
from flexmoe.data.documents import DataSpec
from flexmoe.data.packing import TokenStream, pack_documents
from flexmoe.data.public import PublicCorpus, record_public_corpus
from flexmoe.data.split import SplitDocuments, load_splits
from flexmoe.data.tokenizer import (
    load_tokenizer,
    save_tokenizer,
    tokenizer_fingerprint,
    train_tokenizer,
)
from flexmoe.device import DTYPES, compute_dtype, dtype_name
from flexmoe.errors import FlexMoEError
from flexmoe.expert.manifest import DtypeName
from flexmoe.io import atomic_directory, read_json, read_manifest_model, write_json
from flexmoe.model import names
from flexmoe.model.checkpoint import (
    build_dense,
    checkpoint_sources,
    read_config,
    save_config,
    save_model,
    stored_dtype,
    tensors_sha256,
    weight_files,
    write_weights,
)
from flexmoe.model.config import ModelDims, dense_config, olmo2_config
from flexmoe.model.stream import (
    TensorSource,
    fill_model,
    hash_tensor,
    sha256_sources,
)
from flexmoe.router_init import RouterInitMethod, RouterInitRequest, domain_rows
from flexmoe.training.config import TrainConfig
from flexmoe.training.job import TrainingJob, refuse_existing
from flexmoe.training.loop import TrainResult, barrier

ANCHOR_MANIFEST = "flexmoe_anchor.json"
MAX_SHARD_BYTES = 2 << 30  # an imported anchor's shards; a smaller one is one model.safetensors
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
    dtype: DtypeName = "float32"  # the dtype every tensor of the anchor is stored in
    public_data: PublicCorpus | None = None  # what experts mix in by default


@dataclass
class AnchorInfo:
    """An anchor's manifest, config, tokenizer and public router, without its weights."""

    path: Path
    config: Olmo2Config
    tokenizer: PreTrainedTokenizerBase
    public_router: torch.Tensor  # (layers, hidden), float32 (exact from the stored dtype)
    manifest: AnchorManifest
    _summary: FfnSummary | None = field(default=None, init=False, repr=False)

    @property
    def dtype(self) -> torch.dtype:
        """The stored dtype: of the anchor's files, and of every package and merged model."""
        return DTYPES[self.manifest.dtype]

    def sources(self) -> list[TensorSource]:
        """A lazy source for each weight of the anchor, as stored, in name order."""
        return checkpoint_sources(self.path)

    def weight_bytes(self) -> int:
        return sum(p.stat().st_size for p in set(weight_files(self.path).values()))

    def ffn_scales(self) -> dict[tuple[int, str], float]:
        """The largest magnitude of each feed-forward projection, per (layer, projection)."""
        return self._ffn().scales

    def ffn_sample(self) -> dict[tuple[int, str], torch.Tensor]:
        """A fixed sample of each feed-forward projection (:func:`weight_sample`'s positions)."""
        return self._ffn().samples

    def _ffn(self) -> FfnSummary:
        """Taken while the fingerprint was checked, else read now, one tensor at a time."""
        if self._summary is None:
            summary = FfnSummary(self.config)
            for source in self.sources():
                summary.see(source.name, source.load())
            self._summary = summary
        return self._summary


class FfnSummary:
    """Per feed-forward projection of an anchor: its largest magnitude and a fixed sample, taken
    from tensors as they stream past (so a pass that hashes them can take it on the way)."""

    def __init__(self, config: Olmo2Config) -> None:
        self.wanted = {
            names.DENSE_MLP.format(layer=layer, proj=proj): (layer, proj)
            for layer in range(config.num_hidden_layers)
            for proj in names.PROJECTIONS
        }
        self.scales: dict[tuple[int, str], float] = {}
        self.samples: dict[tuple[int, str], torch.Tensor] = {}

    def see(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.wanted:
            self.scales[self.wanted[name]] = float(tensor.float().abs().max())
            self.samples[self.wanted[name]] = weight_sample(tensor)


def weight_sample(tensor: torch.Tensor, count: int = 4096) -> torch.Tensor:
    """``count`` evenly spaced entries of a tensor (the same positions for the same shape)."""
    flat = tensor.reshape(-1).float()
    return flat[:: max(1, flat.numel() // count)][:count].clone()


@dataclass
class Anchor(AnchorInfo):
    """A loaded, verified anchor with its model (weights in the compute dtype asked for)."""

    model: Olmo2ForCausalLM


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
    dtype: torch.dtype = torch.float32,
    history: list[dict[str, float]] | None = None,
    public_data: PublicCorpus | None = None,
) -> AnchorManifest:
    """Write a model held in memory as an anchor whose tensors are stored in ``dtype``."""
    model.cpu()
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    router = public_router.detach().to(dtype).cpu().contiguous()
    manifest = AnchorManifest(
        fingerprint=fingerprint(state, router),
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        router_init=router_init,
        origin=origin,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        flexmoe_version=__version__,
        seq_len=seq_len,
        training=training,
        dtype=dtype_name(dtype),  # type: ignore[arg-type]
        public_data=public_data,
    )
    with atomic_directory(out, overwrite=overwrite) as tmp:
        save_model(model, tmp, dtype=dtype)
        save_tokenizer(tokenizer, tmp)
        write_card(tmp, _card(manifest, None))
        save_file({ROUTER_KEY: router}, str(tmp / ROUTER_FILE))
        write_json(tmp / ANCHOR_MANIFEST, manifest.model_dump())
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
        model=model,
        tokenizer=tokenizer,
        texts=texts,
        device=device,
        max_documents=max_documents,
        embedder=embedder,
        projection_seed=projection_seed,
    )
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
    dtype: torch.dtype = torch.float32,
    log_dir: Path | None = None,
) -> tuple[AnchorManifest, TrainResult]:
    """Pretrain a dense OLMo-2 decoder from scratch on public data and write the anchor, its
    tensors stored in ``dtype`` (training itself keeps float32 master weights)."""
    out = refuse_existing(out, overwrite)
    splits = load_splits(data)
    if not splits.train:
        raise FlexMoEError(",".join(p for s in data for p in s.paths), "no training documents")
    job = TrainingJob(out, cfg, device, "anchor", resume=resume, progress=progress, log_dir=log_dir)
    info = job.start()
    tokenizer_dir = tokenizer_dir or job.work / "tokenizer"
    if info.is_main:  # one process prepares the tokenizer and the token cache; the rest reuse them
        _prepare_tokenizer(splits, tokenizer_dir, vocab_size, cfg.seq_len, cache_dir)
    barrier(info)
    tokenizer = load_tokenizer(tokenizer_dir)
    config = _anchor_config(dims.with_overrides(max_seq_len=cfg.seq_len), tokenizer)
    torch.manual_seed(cfg.seed)
    model = Olmo2ForCausalLM(config)

    def write(state: dict[str, torch.Tensor], result: TrainResult) -> AnchorManifest:
        trained = model
        if cfg.fsdp and info.world_size > 1:  # one whole copy, to compute r_0 and be written
            trained = build_dense(config, state, where=out).to(device)  # type: ignore[arg-type]
        del state  # the gathered copy, not needed once written into a model
        public_router, router_record = compute_public_router(
            trained,
            tokenizer,
            [d.text for d in splits.train],
            device=device,
            method=router_init,
            embedder=embedder,
            projection_seed=cfg.seed,
        )
        summary: dict[str, float | int | str | None] = {
            "steps": result.steps,
            "tokens": result.tokens,
            "final_train_loss": result.final_train_loss,
            "final_val_loss": result.final_val_loss,
            "seed": cfg.seed,
            **{f"dims.{k}": v for k, v in asdict(dims).items() if k != "max_seq_len"},
        }
        return _write_anchor(
            out,
            model=trained,
            tokenizer=tokenizer,
            public_router=public_router,
            router_init=router_record,
            origin="trained",
            seq_len=cfg.seq_len,
            training=summary,
            overwrite=overwrite,
            dtype=dtype,
            history=result.history,
            public_data=record_public_corpus(data),
        )

    def written() -> AnchorManifest:
        return AnchorManifest.model_validate(read_json(out / ANCHOR_MANIFEST))

    return job.run(
        info, model, *_pack_splits(splits, tokenizer, cache_dir), write=write, written=written
    )


def _prepare_tokenizer(
    splits: SplitDocuments, tokenizer_dir: Path, vocab_size: int, seq_len: int, cache_dir: Path
) -> None:
    """Train the tokenizer (unless one is there) and fill the token cache."""
    if not tokenizer_dir.is_dir():
        texts = (d.text for d in splits.train)
        train_tokenizer(texts, tokenizer_dir, vocab_size=vocab_size, model_max_length=seq_len)
    _pack_splits(splits, load_tokenizer(tokenizer_dir), cache_dir)


def _anchor_config(dims: ModelDims, tokenizer: PreTrainedTokenizerBase) -> Olmo2Config:
    """An OLMo-2 config of ``dims`` for ``tokenizer``'s vocabulary and special tokens."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    return olmo2_config(
        dims,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id or eos,
        eos_token_id=eos,
        pad_token_id=pad if pad is not None else eos,
    )


def _pack_splits(
    splits: SplitDocuments, tokenizer: PreTrainedTokenizerBase, cache_dir: Path
) -> tuple[TokenStream, TokenStream | None]:
    train_stream = pack_documents(splits.train, tokenizer, cache_dir=cache_dir)
    if not splits.validation:
        return train_stream, None
    return train_stream, pack_documents(splits.validation, tokenizer, cache_dir=cache_dir)


def _dense_sources(
    config: PretrainedConfig, sources: list[TensorSource], where: Path
) -> tuple[Olmo2Config, list[TensorSource]]:
    """The OLMo-2 config and tensor names of a source checkpoint: a one-expert FlexOlmo is an
    OLMo-2 model with its MLP under another name; tied embeddings become an explicit head."""
    if isinstance(config, FlexOlmoConfig):
        if config.num_experts != 1:
            raise FlexMoEError(
                where, f"has {config.num_experts} experts; only a one-expert FlexOlmo is an anchor"
            )
        renames: dict[str, str | None] = {}
        for layer in range(config.num_hidden_layers):
            renames[names.ROUTER_ON_DISK.format(layer=layer)] = None
            for proj in names.PROJECTIONS:
                key = names.EXPERT.format(layer=layer, expert=0, proj=proj)
                renames[key] = names.DENSE_MLP.format(layer=layer, proj=proj)
        kept = [s for s in sources if s.name not in renames or renames[s.name] is not None]
        sources = [s.renamed(renames.get(s.name) or s.name) for s in kept]
        config = dense_config(config)
    if not isinstance(config, Olmo2Config):
        raise FlexMoEError(where / "config.json", "not an OLMo-2 or one-expert FlexOlmo config")
    by_name = {s.name: s for s in sources}
    if config.tie_word_embeddings and "lm_head.weight" not in by_name:
        embed = by_name.get("model.embed_tokens.weight")
        if embed is not None:
            sources.append(embed.renamed("lm_head.weight"))
    config.tie_word_embeddings = False
    return config, sorted(sources, key=lambda s: s.name)


def source_dtype(sources: list[TensorSource], config: Olmo2Config) -> torch.dtype:
    """The dtype a checkpoint is stored in: its tensors' one floating dtype, else its config's."""
    found = {s.dtype for s in sources if s.dtype.is_floating_point}
    if len(found) == 1:
        (dtype,) = found
        if dtype in DTYPES.values():
            return dtype
    return stored_dtype(config)


def build_on(
    config: Olmo2Config,
    sources: list[TensorSource],
    *,
    device: torch.device | None,
    dtype: torch.dtype,
    where: Path,
    on_load: Callable[[str, torch.Tensor], None] | None = None,
) -> Olmo2ForCausalLM:
    """An OLMo-2 model filled tensor by tensor from ``sources`` on ``device`` in ``dtype``;
    host memory holds one tensor at a time. ``on_load`` sees each tensor as stored, in order."""
    with torch.device("meta"):
        model = Olmo2ForCausalLM(config)
    if on_load is not None:
        sources = [_watched(s, on_load) for s in sources]
    fill_model(model, sources, device=device or torch.device("cpu"), dtype=dtype, where=where)
    inner: Any = model.model
    inner.rotary_emb = type(inner.rotary_emb)(config=config).to(device)
    return model.eval()


def _watched(source: TensorSource, seen: Callable[[str, torch.Tensor], None]) -> TensorSource:
    def load() -> torch.Tensor:
        tensor = source.load()
        seen(source.name, tensor)
        return tensor

    return TensorSource(source.name, source.shape, source.dtype, load)


def import_anchor(
    hf_dir: Path,
    *,
    out: Path,
    data: list[DataSpec],
    device: torch.device,
    dtype: torch.dtype | None = None,
    max_documents: int = 1000,
    overwrite: bool = False,
    router_init: RouterInitMethod = RouterInitMethod.ANCHOR_HIDDEN,
    embedder: Path | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> AnchorManifest:
    """Adopt a transformers OLMo-2 (or one-expert FlexOlmo) checkpoint as the anchor.

    The anchor keeps the source's dtype unless ``dtype`` is given. The public router vectors are
    computed from ``data`` (public documents) with the model on ``device``. Tensors move one at a
    time: onto the device to compute the router, then from the source files into the anchor's.
    """
    hf_dir = Path(hf_dir)
    if out.exists() and not overwrite:
        raise FlexMoEError(out, "already exists; choose another --out or pass --force")
    if not data:
        raise FlexMoEError(
            "--data", "public documents are needed to compute the public router vectors"
        )
    config, sources = _dense_sources(read_config(hf_dir), checkpoint_sources(hf_dir), hf_dir)
    dtype = dtype or source_dtype(sources, config)
    sources = [s.cast(dtype) for s in sources]
    tokenizer = load_tokenizer(hf_dir)
    splits = load_splits(data)
    texts = [d.text for d in splits.train] or [d.text for d in splits.validation]
    model = build_on(
        config, sources, device=device, dtype=compute_dtype(device, dtype), where=hf_dir
    )
    public_router, router_record = compute_public_router(
        model,
        tokenizer,
        texts,
        max_documents=max_documents,
        device=device,
        method=router_init,
        embedder=embedder,
    )
    del model
    router = public_router.detach().to(dtype).cpu().contiguous()
    router_source = TensorSource(ROUTER_KEY, tuple(router.shape), dtype, lambda: router)
    manifest = AnchorManifest(
        fingerprint=sha256_sources([*sources, router_source]),
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        router_init=router_record,
        origin="imported",
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        flexmoe_version=__version__,
        seq_len=config.max_position_embeddings,
        dtype=dtype_name(dtype),  # type: ignore[arg-type]
        public_data=record_public_corpus(data),
    )
    config.dtype = dtype
    with atomic_directory(out, overwrite=overwrite) as tmp:
        write_weights(tmp, sources, max_shard_bytes=max_shard_bytes)
        save_config(config, tmp)
        save_tokenizer(tokenizer, tmp)
        write_card(tmp, _card(manifest, hf_dir.resolve().name))
        save_file({ROUTER_KEY: router}, str(tmp / ROUTER_FILE))
        write_json(tmp / ANCHOR_MANIFEST, manifest.model_dump())
    return manifest


def open_anchor(path: Path, *, verify: bool = True) -> AnchorInfo:
    """An anchor's manifest, config, tokenizer and public router, without building its model;
    with ``verify``, both fingerprints are recomputed (tensors streamed one at a time)."""
    path = Path(path)
    manifest_path = path / ANCHOR_MANIFEST
    if not path.is_dir():
        raise FlexMoEError(path, "anchor directory not found")
    if not manifest_path.is_file():
        raise FlexMoEError(path, f"not a flexmoe anchor (no {ANCHOR_MANIFEST})")
    manifest = read_manifest_model(manifest_path, AnchorManifest)
    config = read_config(path)
    if not isinstance(config, Olmo2Config):
        raise FlexMoEError(path / "config.json", "an anchor must be an OLMo-2 checkpoint")
    try:
        stored_router = load_file(path / ROUTER_FILE)[ROUTER_KEY]
    except (OSError, SafetensorError, KeyError) as e:
        raise FlexMoEError(path / ROUTER_FILE, f"missing or unreadable public router ({e})") from e
    expected_shape = (config.num_hidden_layers, config.hidden_size)
    if tuple(stored_router.shape) != expected_shape:
        raise FlexMoEError(
            path / ROUTER_FILE, f"shape {tuple(stored_router.shape)}, expected {expected_shape}"
        )
    tokenizer = load_tokenizer(path)
    info = AnchorInfo(
        path=path,
        config=config,
        tokenizer=tokenizer,
        public_router=stored_router.float(),
        manifest=manifest,
    )
    if verify:  # the feed-forward summary is taken on the way, for the package checks
        summary = FfnSummary(config)
        router = TensorSource(
            ROUTER_KEY, expected_shape, stored_router.dtype, lambda: stored_router
        )
        sources = [_watched(s, summary.see) for s in info.sources()]
        _check_fingerprints(info, sha256_sources([*sources, router]))
        info._summary = summary
    return info


def _check_fingerprints(info: AnchorInfo, digest: str) -> None:
    if digest != info.manifest.fingerprint:
        raise FlexMoEError(
            info.path, "tensors do not match the manifest's fingerprint (modified or corrupt)"
        )
    if tokenizer_fingerprint(info.tokenizer) != info.manifest.tokenizer_fingerprint:
        raise FlexMoEError(
            info.path, "tokenizer does not match the manifest's tokenizer fingerprint"
        )


def load_anchor(
    path: Path,
    *,
    verify: bool = True,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Anchor:
    """Load an anchor directory with its model on ``device`` (CPU by default) in ``dtype``
    (default: :func:`flexmoe.device.compute_dtype` there); with ``verify``, check both
    fingerprints while the tensors stream in, one at a time."""
    info = open_anchor(path, verify=False)
    device = device or torch.device("cpu")
    dtype = dtype or compute_dtype(device, info.dtype)
    sources = info.sources()
    h = hashlib.sha256()
    router_done = [False]
    summary = FfnSummary(info.config)

    def seen(name: str, tensor: torch.Tensor) -> None:  # the fingerprint's sorted order
        if not router_done[0] and name > ROUTER_KEY:
            hash_tensor(h, ROUTER_KEY, info.public_router.to(info.dtype))
            router_done[0] = True
        hash_tensor(h, name, tensor)
        summary.see(name, tensor)

    model = build_on(
        info.config,
        sources,
        device=device,
        dtype=dtype,
        where=info.path,
        on_load=seen if verify else None,
    )
    if verify:
        if not router_done[0]:
            hash_tensor(h, ROUTER_KEY, info.public_router.to(info.dtype))
        _check_fingerprints(info, h.hexdigest())
    anchor = Anchor(
        path=info.path,
        config=info.config,
        tokenizer=info.tokenizer,
        public_router=info.public_router,
        manifest=info.manifest,
        model=model,
    )
    anchor._summary = summary if verify else None
    return anchor


def _card(manifest: AnchorManifest, base_model: str | None) -> str:
    return anchor_card(
        origin=manifest.origin,
        dtype=manifest.dtype,
        fingerprint=manifest.fingerprint,
        steps=(manifest.training or {}).get("steps"),
        public=manifest.public_data,
        base_model=base_model,
    )
