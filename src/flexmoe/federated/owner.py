"""An owner's work in a federated round, done at home: only the update leaves.

The coordinator sends the model's current state (every router row, and every slot refined in an
earlier round, on top of the merged model that each owner holds); the owner trains on its own
text plus the usual public share and returns one of:

- **a router update** (``router`` rounds): every expert frozen, only the router rows train, as
  ``router tune`` does; the update is the rows' change, ``(layers, experts, hidden)``;
- **its slot** (``slot`` rounds): its own expert's feed-forward and its own router row train,
  everything else frozen; the result is an expert package (the same manifest and format as the
  owner's first one, its training record this round's), signed when the owner has a key;
- **a trunk update** (``trunk`` rounds): the parameters every owner shares (:mod:`.trunk`) and
  every active router row train, every owner's expert frozen; the update is their change, in
  full or as low-rank factors.

The merged model stays loaded between phases (one per process, reset to the copy on disk before
each task), so that rounds are cheap.

Experts that opted out are masked: no token routes to them, so nothing learned here depends on
them. Every number that sets the work (steps, seed, learning rate) comes with the task, and the
batch order is seeded by the round, the kind of work and the owner's name alone, so that the
same owner does the same work whoever else takes part.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file
from torch.nn.utils import parametrize
from transformers import FlexOlmoForCausalLM, PreTrainedTokenizerBase

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
    TrainingSummary,
)
from flexmoe.expert.package import expert_tensors, sign_package
from flexmoe.expert.signing import read_private_key
from flexmoe.expert.train import router_z_loss
from flexmoe.federated.privacy import privatize
from flexmoe.federated.trunk import ROWS, LowRank, LowRankDelta, trunk_keys
from flexmoe.io import sha256_file, write_json
from flexmoe.merge.layout import MergedModel
from flexmoe.merge.slots import SlotTable
from flexmoe.model import names
from flexmoe.model.checkpoint import moe_layers, stored_dtype
from flexmoe.training.config import TrainConfig
from flexmoe.training.loop import TrainResult, train

Kind = Literal["router", "slot", "trunk", "dense"]


@dataclass(frozen=True)
class OwnerText:
    """An owner's text, at home: its files, and the public share mixed into its training."""

    name: str  # its expert's name in the merged model
    data: tuple[DataSpec, ...]
    public: tuple[DataSpec, ...] = ()
    public_fraction: float = 0.25
    key: Path | None = None  # the owner's signing key, for its slot packages

    def stream(
        self, tokenizer: PreTrainedTokenizerBase, seq_len: int, cache_dir: Path | None
    ) -> TokenStream:
        """The training split of the owner's files, with the public share mixed in."""
        where = ",".join(p for s in self.data for p in s.paths)
        docs = load_splits(list(self.data)).train
        if not docs:
            raise FlexMoEError(where, "no training documents")
        stream = pack_documents(docs, tokenizer, cache_dir=cache_dir)
        if stream.num_blocks(seq_len) == 0:
            raise FlexMoEError(where, f"training data is shorter than one {seq_len}-token block")
        if self.public and self.public_fraction > 0:
            public = pack_documents(
                load_splits(list(self.public)).train, tokenizer, cache_dir=cache_dir
            )
            stream = mix_streams(stream, public, self.public_fraction)
        return stream


@dataclass(frozen=True)
class ModelState:
    """What a round starts from, on top of the merged model: every router row, and the package
    tensors of every slot refined so far (by expert name)."""

    rows: torch.Tensor  # (layers, experts, hidden), float32
    slots: dict[str, dict[str, torch.Tensor]]
    trunk: dict[str, torch.Tensor] = field(default_factory=dict)  # float32; empty: the weights'


@dataclass(frozen=True)
class RoundTask:
    """One owner's work order for one phase of a round."""

    kind: Kind
    round: int
    cfg: TrainConfig
    excluded: frozenset[str] = frozenset()  # experts no token may route to
    slot_row: bool = True  # a slot phase also trains the owner's own router row
    router_sgd: bool = True  # a router phase steps with plain SGD (classic FedAvg), not AdamW
    trunk_sgd: bool = False  # a trunk or dense phase steps with plain SGD (FedOpt's local one)
    dp_clip: float = 0.0  # > 0: the update is clipped to this L2 norm and noised (privacy.py)
    dp_noise: float = 0.0  # the noise multiplier
    lora_rank: int = 0  # > 0: a trunk phase trains and sends rank-R factors of its matrices
    trunk_embeddings: str = "none"  # the vocabulary's tensors in the trunk: none, output, all

    def seeded(self, name: str) -> TrainConfig:
        """The training settings for owner ``name``: its batch order seeded by the round, the
        kind of work and its name, whoever else takes part."""
        seed = zlib.crc32(f"{self.cfg.seed}:{self.round}:{self.kind}:{name}".encode())
        return replace(self.cfg, seed=seed)


_LOADED: dict[tuple[str, str, str], tuple[FlexOlmoForCausalLM, dict[str, torch.Tensor]]] = {}


def _loaded(merged: MergedModel, device: torch.device) -> FlexOlmoForCausalLM:
    """The merged model on ``device``, loaded once per process and reset, before each task, to
    its parameters on disk (every value and dtype), every parameter frozen."""
    key = (str(merged.path.resolve()), merged.fingerprint(), str(device))
    if key not in _LOADED:
        _LOADED.clear()  # one model per process
        model = merged.load(device=device)
        disk = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
        _LOADED[key] = (model, disk)
    model, disk = _LOADED[key]
    for name, param in model.named_parameters():
        param.data = disk[name].to(device, copy=True)
    model.requires_grad_(False)
    model.zero_grad(set_to_none=True)
    return model


def build_model(
    merged: MergedModel,
    state: ModelState,
    task: RoundTask,
    device: torch.device,
    table: SlotTable | None = None,
) -> FlexOlmoForCausalLM:
    """The merged model at ``state``, every parameter frozen, the excluded experts masked
    (``table``: the model's slot table, when the caller has read it)."""
    table = table or merged.table()
    model = _loaded(merged, device)
    layers = moe_layers(model)
    if tuple(state.rows.shape) != (len(layers), len(table.slots), model.config.hidden_size):
        raise FlexMoEError(merged.path, f"router state of shape {tuple(state.rows.shape)}")
    active = torch.tensor([s.name not in task.excluded for s in table.slots])
    params = dict(model.named_parameters())
    with torch.no_grad():
        for layer, moe in enumerate(layers):
            for e, row in enumerate(moe.router.rows):
                row.copy_(state.rows[layer, e])
            moe.expert_mask = active if not bool(active.all()) else None
        for name, tensors in state.slots.items():
            index = table.index_of(name)
            if index is None:
                raise FlexMoEError(name, "no such expert in this model")
            for layer, moe in enumerate(layers):
                expert = moe.experts[index]
                for proj in names.PROJECTIONS:
                    weight = getattr(expert, proj).weight
                    weight.copy_(tensors[PKG_PROJ.format(layer=layer, proj=proj)])
        for key, tensor in state.trunk.items():
            if key not in params or params[key].shape != tensor.shape:
                raise FlexMoEError(key, "the coordinator's trunk does not fit this model")
            params[key].copy_(tensor)
    return model


def stacked_rows(model: torch.nn.Module) -> torch.Tensor:
    """``(layers, experts, hidden)``: every router row, float32 on the CPU."""
    return torch.stack([m.router.weight.detach().float().cpu() for m in moe_layers(model)])


def _trainable(param: torch.nn.Parameter) -> None:
    """Train ``param`` in float32 (the optimiser's master copy, whatever the model's dtype)."""
    param.data = param.data.float()
    param.requires_grad_(True)


def train_locally(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: RoundTask,
    text: OwnerText,
    device: torch.device,
    cache_dir: Path | None,
) -> TrainResult:
    """The task's steps on the owner's text, its batch order the owner's own."""
    cfg = task.seeded(text.name)
    optimizer = None
    if (task.kind == "router" and task.router_sgd) or (
        task.kind in ("trunk", "dense") and task.trunk_sgd
    ):
        trained = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(trained, lr=cfg.lr)
    return train(
        model,
        train_stream=text.stream(tokenizer, cfg.seq_len, cache_dir),
        val_stream=None,
        cfg=cfg,
        device=device,
        optimizer=optimizer,
        progress=False,
        desc=f"{task.kind} round {task.round} ({text.name})",
        aux_loss=router_z_loss(cfg.z_loss) if cfg.z_loss > 0 and moe_layers(model) else None,
    )


def router_update(
    merged: MergedModel,
    state: ModelState,
    task: RoundTask,
    text: OwnerText,
    *,
    device: torch.device,
    cache_dir: Path | None,
) -> tuple[torch.Tensor, TrainResult]:
    """The change of every active router row after ``task.cfg.steps`` steps on the owner's text
    (every expert frozen): ``(layers, experts, hidden)``, zero for masked experts."""
    table = merged.table()
    model = build_model(merged, state, task, device, table)
    _train_active_rows(model)
    before = stacked_rows(model)
    result = train_locally(model, merged.tokenizer(), task, text, device, cache_dir)
    change = stacked_rows(model) - before
    return _noised({ROWS: change}, table, task)[ROWS], result


def _train_active_rows(model: torch.nn.Module) -> None:
    for moe in moe_layers(model):
        for e, row in enumerate(moe.router.rows):
            if moe.expert_mask is None or bool(moe.expert_mask[e]):
                _trainable(row)


def _noised(
    change: dict[str, torch.Tensor], table: SlotTable, task: RoundTask
) -> dict[str, torch.Tensor]:
    """``change`` as it leaves: with ``task.dp_clip``, clipped to that norm and noised at home
    (:func:`~flexmoe.federated.privacy.privatize`), the masked experts' rows left at zero."""
    if task.dp_clip <= 0:
        return change
    active = [s.name not in task.excluded for s in table.slots]
    noised, _ = privatize({**change, ROWS: change[ROWS][:, active]}, task.dp_clip, task.dp_noise)
    rows = change[ROWS].clone()
    rows[:, active] = noised[ROWS]
    return {**noised, ROWS: rows}


def trunk_update(
    merged: MergedModel,
    state: ModelState,
    task: RoundTask,
    text: OwnerText,
    *,
    device: torch.device,
    cache_dir: Path | None,
) -> tuple[dict[str, torch.Tensor], TrainResult]:
    """What ``task.cfg.steps`` steps on the owner's text change in the trunk and the active
    router rows, every owner's expert frozen: ``{ROWS: (layers, experts, hidden), key: change}``
    for every trunk key, float32 on the CPU; with ``task.lora_rank`` each trunk matrix's entry
    is its factor ``B`` (:class:`~flexmoe.federated.trunk.LowRank`)."""
    table = merged.table()
    model = build_model(merged, state, task, device, table)
    params = dict(model.named_parameters())
    keys = trunk_keys(params, table, embeddings=task.trunk_embeddings)
    for key in keys:  # float32 master copies: the coordinator's own values where it sent them
        params[key].data = state.trunk.get(key, params[key].data).float().to(device, copy=True)
    _train_active_rows(model)
    before = {k: params[k].detach().cpu().clone() for k in keys}
    rows = stacked_rows(model)
    low = LowRank(task.lora_rank, task.round, task.cfg.seed) if task.lora_rank else None
    with _adapted(model, keys, low) as factors:
        result = train_locally(model, merged.tokenizer(), task, text, device, cache_dir)
        change = {ROWS: stacked_rows(model) - rows}
        for key in keys:
            if key in factors:
                change[key] = factors[key].low.detach().float().cpu().clone()
            else:
                change[key] = params[key].detach().float().cpu() - before[key]
    return _noised(change, table, task), result


@contextmanager
def _adapted(
    model: torch.nn.Module, keys: list[str], low: LowRank | None
) -> Iterator[dict[str, LowRankDelta]]:
    """The trunk made trainable: in full, or with ``low`` its matrices through rank-R factors
    (``name -> parametrization``; removed again when the block ends) and its vectors in full."""
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    factors: dict[str, LowRankDelta] = {}
    for key in keys:
        if low is None or not low.applies(params[key]):
            _trainable(params[key])
            continue
        owner = modules[key.removesuffix(".weight")]
        factor = low.factor(key, tuple(params[key].shape)).to(params[key].device)
        factors[key] = LowRankDelta(factor, params[key].shape[0]).to(params[key].device)
        parametrize.register_parametrization(owner, "weight", factors[key])
    try:
        yield factors
    finally:
        for key in factors:
            parametrize.remove_parametrizations(
                modules[key.removesuffix(".weight")], "weight", leave_parametrized=False
            )


def slot_update(
    merged: MergedModel,
    state: ModelState,
    task: RoundTask,
    text: OwnerText,
    out: Path,
    *,
    device: torch.device,
    cache_dir: Path | None,
) -> TrainResult:
    """Refine the owner's own slot (its feed-forward and its router row) inside the model at
    ``state``, everything else frozen; write it as a package to ``out``."""
    table = merged.table()
    index = table.index_of(text.name)
    if index is None or index == 0:
        raise FlexMoEError(text.name, "is not an owner's expert in this model")
    record = table.slots[index]
    if record.manifest is None:
        raise FlexMoEError(text.name, "the slot has no package manifest")
    model = build_model(merged, state, task, device, table)
    layers = len(moe_layers(model))
    for moe in moe_layers(model):
        for param in moe.experts[index].parameters():
            _trainable(param)
        if task.slot_row:
            _trainable(moe.router.rows[index])
    before = expert_tensors(model.state_dict(), num_layers=layers, slot=index, dtype=torch.float32)
    result = train_locally(model, merged.tokenizer(), task, text, device, cache_dir)
    dtype = stored_dtype(merged.config(table))
    tensors = expert_tensors(model.state_dict(), num_layers=layers, slot=index, dtype=dtype)
    if task.dp_clip > 0:  # what training changed leaves clipped and noised
        frozen = {PKG_BIAS.format(layer=layer) for layer in range(layers)}
        if not task.slot_row:
            frozen |= {PKG_ROUTER.format(layer=layer) for layer in range(layers)}
        change = {k: tensors[k].float() - before[k] for k in tensors if k not in frozen}
        noised, _ = privatize(change, task.dp_clip, task.dp_noise)
        tensors |= {k: (before[k] + noised[k]).to(dtype) for k in noised}
    hyperparameters = {
        **task.seeded(text.name).to_dict(),
        "federated_round": task.round,
        "kind": "slot",
    }
    summary = TrainingSummary.of(result, task.seeded(text.name).seed, hyperparameters)
    write_slot_package(out, record.manifest, tensors, summary, text.key)
    return result


def write_slot_package(
    out: Path,
    manifest: ExpertManifest,
    tensors: dict[str, torch.Tensor],
    summary: TrainingSummary,
    key: Path | None,
) -> ExpertManifest:
    """A new version of the package ``manifest`` describes: ``tensors``, this training record,
    signed with ``key`` when given. ``out`` must be a new, empty directory."""
    out.mkdir(parents=True, exist_ok=False)
    save_file(tensors, str(out / TENSORS_FILE), metadata={"format": "pt"})
    new = manifest.model_copy(
        update={
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "training": summary,
            "files": {TENSORS_FILE: sha256_file(out / TENSORS_FILE)},
        }
    )
    write_json(out / MANIFEST_FILE, new.model_dump())
    if key is not None:
        sign_package(out, read_private_key(key))
    return new
