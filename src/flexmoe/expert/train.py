"""Train one owner's expert alone, against the frozen anchor, and write its package.

The anchor is upcycled in memory to a 2-expert MoE: expert 0 is the anchor's MLP (the very same
tensors, frozen), expert 1 a copy of it (trained); router row r_0 is the anchor's public vector
(frozen), r_1 starts from the owner's domain embedding (trained), and so does the bias b_1 <= 0
(starts at 0). Routing is top-2 of 2: every token passes both experts, the router sets weights.
Only expert 1, r_1 and b_1 are parameters with gradients; everything else is frozen by
construction, so after training it is bit-identical to the anchor (checked before writing).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors.torch import save_file
from transformers import FlexOlmoForCausalLM, Olmo2ForCausalLM

from flexmoe import __version__
from flexmoe.anchor import Anchor, fingerprint, load_anchor
from flexmoe.data.documents import DataSpec
from flexmoe.data.packing import TokenStream, mix_streams, pack_documents
from flexmoe.data.split import load_splits
from flexmoe.errors import FlexMoEError
from flexmoe.expert.manifest import (
    MANIFEST_FILE,
    PKG_BIAS,
    PKG_PROJ,
    PKG_ROUTER,
    TENSORS_FILE,
    ExpertManifest,
    ExpertShapes,
    RivalUse,
    RouterInitRecord,
    TrainingSummary,
    read_manifest,
)
from flexmoe.expert.package import (
    ExpertPackage,
    expert_tensors,
    load_package,
    rival_version,
    sign_package,
)
from flexmoe.expert.private import PrivateMode
from flexmoe.expert.rivals import RIVAL_TOP_K, resolve_rivals
from flexmoe.expert.signing import read_private_key
from flexmoe.expert.spec import ExpertIdentity, ExpertSpec, PublicSample
from flexmoe.io import atomic_directory, sha256_file, write_json
from flexmoe.model import names
from flexmoe.model.checkpoint import moe_layers, upcycle
from flexmoe.router_init import Params, RouterInitMethod, RouterInitRequest, domain_rows
from flexmoe.training.config import EXPERT_TRAINING
from flexmoe.training.job import TrainingJob, refuse_existing
from flexmoe.training.loop import AuxLoss, TrainResult

EXPERT_DEFAULTS = EXPERT_TRAINING  # the command line's defaults too


def build_trainable_moe(
    dense: Olmo2ForCausalLM,
    public_router: torch.Tensor,
    router_rows: torch.Tensor,
    rivals: Sequence[ExpertPackage] = (),
    rival_top_k: int = RIVAL_TOP_K,
) -> FlexOlmoForCausalLM:
    """The 2-expert model upcycled from ``dense`` with only expert 1, r_1 and b_1 trainable.

    With ``rivals`` (the coordinator's public expert packages), they are experts 2.., frozen,
    and routing is top-``rival_top_k`` of all, as in the merge. Frozen tensors keep ``dense``'s
    dtype (bf16 on a GPU for a bf16 anchor); the trained ones are float32, the optimiser's
    master weights.
    """
    count = 2 + len(rivals)
    model = upcycle(dense, num_experts=count, top_k=min(count, max(2, rival_top_k)))
    for param in model.parameters():
        param.requires_grad_(False)
    with torch.no_grad():
        for layer, moe in enumerate(moe_layers(model)):
            moe.use_bias = True
            moe.router.rows[0].copy_(public_router[layer])
            moe.experts[1].float().requires_grad_(True)
            for trained, value in (
                (moe.router.rows[1], router_rows[layer]),
                (moe.router.biases[0], torch.zeros(())),
            ):
                trained.data = value.to(device=trained.device, dtype=torch.float32).clone()
                trained.requires_grad_(True)
            for k, rival in enumerate(rivals, start=2):  # frozen, each its own copy
                ffn = moe.experts[k]
                frozen = [
                    *(
                        (getattr(ffn, j).weight, PKG_PROJ.format(layer=layer, proj=j))
                        for j in names.PROJECTIONS
                    ),
                    (moe.router.rows[k], PKG_ROUTER.format(layer=layer)),
                    (moe.router.biases[k - 1], PKG_BIAS.format(layer=layer)),
                ]
                for param, key in frozen:
                    param.data = rival.tensors[key].to(param.device, param.dtype).clone()
    return model


def router_z_loss(weight: float):  # type: ignore[no-untyped-def]
    """``weight`` x mean over layers and tokens of logsumexp(router logits)^2."""

    def z_loss(model: torch.nn.Module) -> torch.Tensor:
        layers = moe_layers(model)
        terms = [
            torch.logsumexp(m.last_logits.float(), dim=-1).pow(2).mean()
            for m in layers
            if m.last_logits is not None
        ]
        return weight * torch.stack(terms).mean()

    return z_loss


def closeness_penalty(weight: float):  # type: ignore[no-untyped-def]
    """``weight`` x the mean over layers and projections of ``|W_1 - W_0|^2 / |W_0|^2``: how
    far the owner's expert has moved from the public one it was copied from, relative to it."""

    def penalty(model: torch.nn.Module) -> torch.Tensor:
        terms = []
        for moe in moe_layers(model):
            public, own = moe.experts[0], moe.experts[1]
            for proj in ("gate_proj", "up_proj", "down_proj"):
                base = getattr(public, proj).weight.detach().float()
                moved = getattr(own, proj).weight - base
                terms.append(moved.pow(2).sum() / base.pow(2).sum().clamp(min=1e-12))
        return weight * torch.stack(terms).mean()

    return penalty


@dataclass
class OwnBlocks(TokenStream):
    """A training stream whose first ``own_tokens`` tokens are the owner's own text and the rest
    public; each batch drawn notes which of its input tokens are the owner's (``drawn[0]``,
    ``(B, L)``), the labels of :func:`router_objective`."""

    own_tokens: int = 0
    drawn: list[torch.Tensor] = field(default_factory=list)

    def batch(self, indices: list[int], seq_len: int) -> torch.Tensor:
        start = torch.tensor(indices, dtype=torch.long)[:, None] * seq_len
        self.drawn[:] = [start + torch.arange(seq_len) < self.own_tokens]
        return super().batch(indices, seq_len)


# The router objective's weight by default (measured as the owner_levers rows
# router-objective-W on the demo and broad sets; docs/results.md).
ROUTER_OBJECTIVE = 0.1


def router_objective(weight: float, stream: OwnBlocks):  # type: ignore[no-untyped-def]
    """``weight`` x the binary cross-entropy, averaged over layers, of each token's router
    margin of the owner's expert over the public one (``r_1.h + b_1 - r_0.h``) against whether
    the token is the owner's own text: labels an owner has at home."""

    def loss(model: torch.nn.Module) -> torch.Tensor:
        own = stream.drawn[0].flatten()
        terms = []
        for moe in moe_layers(model):
            logits = moe.last_logits  # (B*L, 2), the bias included
            if logits is None:
                continue
            margin = (logits[:, 1] - logits[:, 0]).float()
            target = own.to(device=margin.device, dtype=margin.dtype)
            terms.append(F.binary_cross_entropy_with_logits(margin, target))
        return weight * torch.stack(terms).mean()

    return loss


def _summed(*losses: Any) -> Any:
    """One auxiliary loss: the sum of those given (``None`` where none is)."""
    found = [loss for loss in losses if loss is not None]
    if not found:
        return None
    return lambda model: sum((loss(model) for loss in found[1:]), found[0](model))


def project_biases(model: torch.nn.Module) -> None:
    """Keep every trained bias at or below zero (a projection after each optimizer step)."""
    with torch.no_grad():
        for moe in moe_layers(model):
            for bias in moe.router.biases:
                bias.clamp_(max=0.0)


def frozen_fingerprint(
    state: Mapping[str, torch.Tensor],
    layers: int,
    public_router: torch.Tensor,
    dtype: torch.dtype,
) -> str:
    """The anchor fingerprint recomputed from an MoE's frozen tensors (expert 0 as the MLP),
    as stored in the anchor's ``dtype`` (exact: frozen tensors are only ever widened)."""
    state = {k: v.to(dtype) for k, v in state.items()}
    dense: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".mlp." not in key:
            dense[key] = value
    for layer in range(layers):
        for proj in names.PROJECTIONS:
            dense[names.DENSE_MLP.format(layer=layer, proj=proj)] = state[
                names.EXPERT.format(layer=layer, expert=0, proj=proj)
            ]
        row = state[names.ROUTER_ROW.format(layer=layer, expert=0)]
        if not torch.equal(row, public_router[layer].to(row.device, dtype)):
            raise FlexMoEError(None, f"public router row of layer {layer} changed during training")
    return fingerprint(dense, public_router.to(dtype))


def owner_router_rows(
    anchor: Anchor,
    method: RouterInitMethod,
    texts: list[str],
    *,
    device: torch.device,
    seed: int = 0,
    embedder: Path | None = None,
) -> tuple[torch.Tensor, Params]:
    """r_1 for the owner, made the way the anchor's r_0 was (``random`` is an ablation)."""
    record = anchor.manifest.router_init
    if method is not RouterInitMethod.RANDOM and method.value != record.method:
        raise FlexMoEError(
            "--router-init",
            f"{method.value} does not match how the anchor's public router was made "
            f"({record.method}); use --router-init {record.method}",
        )
    projection_seed = int(record.params.get("projection_seed", 0))
    request = RouterInitRequest(
        model=anchor.model,
        tokenizer=anchor.tokenizer,
        texts=texts,
        device=device,
        seed=seed,
        embedder=embedder,
        projection_seed=projection_seed,
    )
    rows, params = domain_rows(method, request)
    wanted = record.params.get("embedder_fingerprint")
    if method is RouterInitMethod.EMBEDDER and params["embedder_fingerprint"] != wanted:
        raise FlexMoEError("--embedder", "is not the embedding model that made the anchor's r_0")
    return rows, params


def _owner_streams(
    anchor: Anchor,
    data: list[DataSpec],
    public_data: list[DataSpec] | None,
    public_fraction: float,
    *,
    spread: bool,
    seq_len: int,
    cache_dir: Path | None,
) -> tuple[TokenStream, TokenStream | None, list[str]]:
    """Training stream (with the public share mixed in), validation stream, training texts."""
    where = ",".join(p for s in data for p in s.paths)
    splits = load_splits(data)
    if not splits.train:
        raise FlexMoEError(where, "no training documents")
    train_stream = pack_documents(splits.train, anchor.tokenizer, cache_dir=cache_dir)
    if train_stream.num_blocks(seq_len) == 0:
        raise FlexMoEError(where, f"training data is shorter than one block of {seq_len} tokens")
    if public_data and public_fraction > 0:
        public = pack_documents(
            load_splits(public_data).train, anchor.tokenizer, cache_dir=cache_dir
        )
        mixed = mix_streams(train_stream, public, public_fraction, spread=spread)
        own_tokens = len(train_stream.tokens)
        train_stream = OwnBlocks(mixed.tokens, mixed.num_bytes, mixed.num_docs, own_tokens)
    val_stream = None
    if splits.validation:
        val_stream = pack_documents(splits.validation, anchor.tokenizer, cache_dir=cache_dir)
        if val_stream.num_blocks(seq_len) == 0:
            val_stream = None
    return train_stream, val_stream, [d.text for d in splits.train]


def write_package(
    out: Path,
    *,
    model: FlexOlmoForCausalLM,
    state: Mapping[str, torch.Tensor],
    anchor: Anchor,
    identity: ExpertIdentity,
    summary: TrainingSummary,
    router_init: RouterInitRecord,
    overwrite: bool,
    signing_key: Ed25519PrivateKey | None = None,
) -> ExpertManifest:
    """Write expert 1 of ``model`` (whose whole state is ``state``) and its manifest to ``out``
    (temp dir, then rename), signed with ``signing_key`` when given."""
    config = model.config
    with atomic_directory(out, overwrite=overwrite) as tmp:
        tensors = expert_tensors(state, num_layers=config.num_hidden_layers, dtype=anchor.dtype)
        save_file(tensors, str(tmp / TENSORS_FILE), metadata={"format": "pt"})
        manifest = ExpertManifest(
            name=identity.name,
            owner=identity.owner,
            license=identity.license,
            description=identity.description,
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            anchor_fingerprint=anchor.manifest.fingerprint,
            tokenizer_fingerprint=anchor.manifest.tokenizer_fingerprint,
            router_init=router_init,
            training=summary,
            shapes=ExpertShapes(
                num_layers=config.num_hidden_layers,
                hidden_size=config.hidden_size,
                intermediate_size=config.intermediate_size,
                dtype=anchor.manifest.dtype,
            ),
            files={TENSORS_FILE: sha256_file(tmp / TENSORS_FILE)},
            flexmoe_version=__version__,
        )
        write_json(tmp / MANIFEST_FILE, manifest.model_dump())
        if signing_key is not None:
            sign_package(tmp, signing_key)
    return manifest


def train_expert(
    spec: ExpertSpec,
    *,
    out: Path,
    device: torch.device,
    cache_dir: Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    signing_key: Path | None = None,
    log_dir: Path | None = None,
) -> tuple[ExpertManifest, TrainResult]:
    """Train the owner's expert as ``spec`` says (:mod:`flexmoe.expert.spec`) and write its
    package to ``out``: the owner's data, with ``spec.public``'s share of public text so that
    the router also sees what belongs to the public expert, against the coordinator's
    ``spec.rivals`` (:func:`build_trainable_moe`), with ``spec.objectives`` beside next-token
    prediction (:func:`closeness_penalty`, :func:`router_objective`) and, with
    ``spec.privacy``, DP-SGD (:mod:`flexmoe.expert.private`; the spent epsilon goes into the
    manifest). With ``signing_key`` (the owner's private key) the package is signed.
    """
    out = refuse_existing(out, overwrite)
    key = read_private_key(signing_key) if signing_key is not None else None  # before training
    anchor = load_anchor(spec.anchor, device=device)
    fraction, objective = _settled_objectives(spec)
    rivals = _rival_packages(spec, anchor)
    cfg = spec.schedule
    train_stream, val_stream, texts = _owner_streams(
        anchor,
        list(spec.data),
        list(spec.public.data),
        fraction,
        spread=spec.public.sample is PublicSample.SPREAD,
        seq_len=cfg.seq_len,
        cache_dir=cache_dir,
    )
    start = spec.router
    rows, init_params = owner_router_rows(
        anchor, start.method, texts, device=device, seed=cfg.seed, embedder=start.embedder
    )
    model = build_trainable_moe(anchor.model, anchor.public_router, rows, rivals, spec.rivals.top_k)
    mode = PrivateMode(spec.privacy) if spec.privacy is not None else None
    job = TrainingJob(
        out,
        cfg,
        device,
        f"expert {spec.identity.name}" + (" (DP)" if mode else ""),
        resume=resume,
        progress=progress,
        log_dir=log_dir,
        aux_loss=_expert_losses(spec, objective, train_stream),
        after_step=project_biases,
        mode=mode,
    )
    info = job.start()
    if mode is not None and (info.world_size > 1 or resume):
        raise FlexMoEError(
            "--dp-record-epsilon", "DP training runs in one process, without --resume"
        )
    hyperparameters = {
        **cfg.to_dict(),
        "public_fraction": fraction,
        "public_sample": spec.public.sample.value,
        "stay_close": spec.objectives.stay_close,
        "router_objective": objective,
    }
    record = RouterInitRecord(method=start.method.value, params=init_params)
    package = _Packager(spec, out, model, anchor, rivals, hyperparameters, record, mode)
    write = functools.partial(package.write, overwrite=overwrite, key=key)
    return job.run(
        info, model, train_stream, val_stream, write=write, written=lambda: read_manifest(out)
    )


@dataclass(frozen=True)
class _Packager:
    """Writes the trained expert's package: checks that nothing frozen changed, records the
    rivals it trained against, signs it when a key is given."""

    spec: ExpertSpec
    out: Path
    model: FlexOlmoForCausalLM
    anchor: Anchor
    rivals: list[ExpertPackage]
    hyperparameters: dict[str, float | int | str | bool | None]
    router_init: RouterInitRecord
    mode: PrivateMode | None  # DP-SGD: its accountant says what was spent, once trained

    def write(
        self,
        state: dict[str, torch.Tensor],
        result: TrainResult,
        *,
        overwrite: bool,
        key: Ed25519PrivateKey | None,
    ) -> ExpertManifest:
        _check_frozen(state, self.model, self.anchor, self.spec.anchor)
        used = [
            RivalUse(name=r.manifest.name, version=rival_version(r.manifest_sha256))
            for r in self.rivals
        ]
        rivals = (used, self.spec.rivals.top_k if used else 0)
        seed, privacy = self.spec.schedule.seed, self.mode.record if self.mode else None
        summary = TrainingSummary.of(result, seed, self.hyperparameters, privacy, rivals)
        return write_package(
            self.out,
            model=self.model,
            state=state,
            anchor=self.anchor,
            identity=self.spec.identity,
            summary=summary,
            router_init=self.router_init,
            overwrite=overwrite,
            signing_key=key,
        )


def _settled_objectives(spec: ExpertSpec) -> tuple[float, float]:
    """The public share actually mixed in and the router objective's weight (its default: on
    wherever it can be); a router objective that cannot work is refused."""
    fraction = spec.public.fraction if spec.public.data else 0.0
    weight = spec.objectives.router
    if weight is None:
        weight = ROUTER_OBJECTIVE if fraction > 0 and spec.privacy is None else 0.0
    if weight > 0 and (fraction == 0 or spec.privacy is not None):
        reason = "DP-SGD" if spec.privacy is not None else "no public text to tell apart"
        raise FlexMoEError("--router-objective", f"cannot be used with {reason}")
    return fraction, weight


def _rival_packages(spec: ExpertSpec, anchor: Anchor) -> list[ExpertPackage]:
    rivals = resolve_rivals(spec.anchor, spec.rivals.packages, private=spec.privacy is not None)
    if rivals and spec.privacy is not None:
        raise FlexMoEError("--rival", "cannot be used with DP-SGD")
    return [load_package(r, anchor) for r in rivals]


def _expert_losses(spec: ExpertSpec, objective: float, stream: TokenStream) -> AuxLoss | None:
    """The losses added to next-token prediction: the router's z-loss, the closeness penalty
    and the router objective (on the owner's own blocks only), each where its weight is set."""
    cfg, stay_close = spec.schedule, spec.objectives.stay_close
    return _summed(
        router_z_loss(cfg.z_loss) if cfg.z_loss > 0 else None,
        closeness_penalty(stay_close) if stay_close > 0 else None,
        router_objective(objective, stream)
        if objective > 0 and isinstance(stream, OwnBlocks)
        else None,
    )


def _check_frozen(
    state: dict[str, torch.Tensor], model: FlexOlmoForCausalLM, anchor: Anchor, where: Path
) -> None:
    """Refuse to package when a tensor that should be frozen (the anchor's) changed."""
    found = frozen_fingerprint(
        state, model.config.num_hidden_layers, anchor.public_router, anchor.dtype
    )
    if found != anchor.manifest.fingerprint:
        raise FlexMoEError(where, "a frozen tensor changed during training; refusing to package")
