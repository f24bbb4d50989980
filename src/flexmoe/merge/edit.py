"""Change one slot of a merged model: add an expert package, or remove an expert by name.

Only the merged model's own shards and the one package are read; the other owners' packages are
not needed. The result is written through ``merge.layout`` like a merge (temporary directory, then a
rename), and every store and file of the model travels with it: the owners' opt-outs and audit
log, their tokens, the usage ledger.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from transformers import FlexOlmoConfig

from flexmoe.anchor import weight_sample
from flexmoe.errors import FlexMoEError
from flexmoe.expert.identity import name_key, refuse_look_alike
from flexmoe.expert.manifest import PKG_PROJ, PKG_ROUTER, TENSORS_FILE, ExpertManifest, ExpertShapes
from flexmoe.expert.package import (
    FfnKey,
    check_compatible,
    check_values,
    load_package,
    package_projection,
    weight_delta,
)
from flexmoe.merge.build import slot_entry
from flexmoe.merge.layout import MergedModel
from flexmoe.merge.plan import Slot, refuse_copy
from flexmoe.merge.slots import SlotRecord, SlotTable
from flexmoe.model import names
from flexmoe.model.checkpoint import stored_dtype
from flexmoe.model.stream import TensorSource, tensor_reader

if TYPE_CHECKING:
    from flexmoe.expert.registry import KeyRegistry

_EXPERT_KEY = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)\.weight")
_GATE_KEY = re.compile(r"model\.layers\.(\d+)\.mlp\.gate\.weight")


def _gate(
    source: TensorSource, rows: int, change: Callable[[torch.Tensor], torch.Tensor]
) -> TensorSource:
    """The router of one layer, ``(rows, H)`` after ``change`` is applied to the stored one
    (in float32; the result is stored in the router's dtype)."""
    shape, dtype = (rows, source.shape[1]), source.dtype
    return TensorSource(source.name, shape, dtype, lambda: change(source.load().float()).to(dtype))


def with_router_rows(sources: list[TensorSource], rows: list[torch.Tensor]) -> list[TensorSource]:
    """``sources`` with each layer's router replaced by ``rows[layer] (N, H)``, rounded to the
    stored router's dtype."""
    gates = {names.ROUTER_ON_DISK.format(layer=i): r.detach() for i, r in enumerate(rows)}
    return with_tensors(sources, gates)


def with_tensors(
    sources: list[TensorSource], tensors: dict[str, torch.Tensor]
) -> list[TensorSource]:
    """``sources`` with the tensors named in ``tensors`` replaced, each rounded to the stored
    tensor's dtype."""

    def constant(tensor: torch.Tensor) -> Callable[[], torch.Tensor]:
        return lambda: tensor

    return [
        TensorSource(s.name, s.shape, s.dtype, constant(tensors[s.name].to(s.dtype)))
        if s.name in tensors
        else s
        for s in sources
    ]


def edit_target(model_dir: Path, out: Path | None, overwrite: bool) -> Path:
    """Where an edit of ``model_dir`` goes: ``out``, or the model itself when not given. Another
    directory that exists already is refused unless ``overwrite``."""
    if out is None or Path(out).resolve() == Path(model_dir).resolve():
        return Path(model_dir)
    if Path(out).exists() and not overwrite:
        raise FlexMoEError(out, "already exists; choose another --out")
    return Path(out)


def add_expert(
    model_dir: Path,
    package_dir: Path,
    *,
    out: Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    registry: KeyRegistry | None = None,
    replace: str | None = None,
) -> Path:
    """Append ``package_dir`` as a new last slot; write to ``out`` (default: replace the model).
    With ``replace``, the package is a newer version of that expert (same name, same owner) and
    takes its slot instead.

    A model merged against a key registry takes a new package only against one too.
    """
    model, package_dir = MergedModel.open(model_dir), Path(package_dir)
    target = edit_target(model.path, out, overwrite)
    table = model.table()
    _refuse_federated(model, table)
    config, sources = model.config(table), model.sources()
    slot = checked_package(table, config, sources, package_dir, registry, replace)
    layers = config.num_hidden_layers
    if replace is None:
        out_sources = _with_new_slot(sources, slot.source, slot.index, layers)
    else:
        out_sources = replaced_slot_sources(sources, slot.source, slot.index)
    index = slot.index
    slots = [*table.slots[:index], slot_entry(slot, layers), *table.slots[index + 1 :]]
    changes: dict[str, object] = {"slots": slots}
    if registry is not None and table.signatures_required is None:
        changes["signatures_required"] = registry.require_signatures
    new_config = FlexOlmoConfig.from_dict({**config.to_dict(), "num_experts": len(slots)})
    model.write(
        target,
        sources=out_sources,
        config=new_config,
        table=table.model_copy(update=changes),
        progress=progress,
    )
    return target


def checked_package(
    table: SlotTable,
    config: FlexOlmoConfig,
    sources: list[TensorSource],
    package_dir: Path,
    registry: KeyRegistry | None,
    replace: str | None,
) -> Slot:
    """The slot ``package_dir`` takes in the model of ``table``, ``config`` and ``sources``: a
    new last one, or with ``replace`` that expert's (the same name and owner). Its files,
    signature, shapes and values are checked, and that it is no copy of another expert."""
    if table.signatures_required is not None and registry is None:
        raise FlexMoEError(
            "--registry", "this model's packages were checked against a key registry; give it"
        )
    package = load_package(package_dir, registry=registry)  # hashes, signature, shapes, values
    m = package.manifest
    check_compatible(
        package_dir,
        m,
        anchor_fingerprint=table.anchor_fingerprint,
        tokenizer_fingerprint=table.tokenizer_fingerprint,
        config=config,
        dtype=stored_dtype(config),
    )
    index = (
        config.num_experts if replace is None else _replaced_slot(table, replace, package_dir, m)
    )
    others = [s for s in table.slots[1:] if s.slot != index]
    if any(name_key(s.name) == name_key(m.name) for s in [table.slots[0], *others]):
        raise FlexMoEError(package_dir, f"expert name {m.name!r} is already in this model")
    refuse_look_alike(package_dir, m.owner, [e.owner for e in others])
    tensor_file = package_dir / TENSORS_FILE
    by_name = {s.name: s for s in sources}
    _check_against_model(package_dir, package.tensors, m.shapes, by_name, others)
    return Slot(
        index=index,
        name=m.name,
        owner=m.owner,
        license=m.license,
        source=tensor_file,
        bytes=tensor_file.stat().st_size,
        package_sha256=package.manifest_sha256,
        manifest=m,
        signer=package.signer,
    )


def _refuse_federated(model: MergedModel, table: SlotTable) -> None:
    """Federated rounds keep versions of every slot and router row of this very set of
    experts; an edit would leave them describing another model."""
    if table.federation is not None:
        raise FlexMoEError(
            model.path,
            "federated rounds changed this model; merge again, or send a new version of a slot "
            "through `flexmoe fed simulate`",
        )


def _replaced_slot(table: SlotTable, name: str, package_dir: Path, m: ExpertManifest) -> int:
    """The slot of expert ``name``, which the package must be a newer version of: the same
    name and the same owner."""
    index = table.index_of(name)
    if index is None:
        known = ", ".join(s.name for s in table.slots[1:])
        raise FlexMoEError(name, f"no such expert in this model (experts: {known})")
    if index == 0:
        raise FlexMoEError(name, "the public expert cannot be replaced")
    if m.name != name:
        raise FlexMoEError(package_dir, f"is expert {m.name!r}, not a version of {name!r}")
    owner = table.slots[index].owner
    if name_key(m.owner) != name_key(owner):
        raise FlexMoEError(
            package_dir, f"belongs to {m.owner!r}; only {owner!r} may replace its expert"
        )
    return index


def replaced_slot_sources(
    sources: list[TensorSource], tensor_file: Path, index: int
) -> list[TensorSource]:
    """``sources`` with expert ``index``'s router row and projections read from
    ``tensor_file``."""
    out = []
    for source in sources:
        gate, expert = _GATE_KEY.fullmatch(source.name), _EXPERT_KEY.fullmatch(source.name)
        if gate is not None:
            key = PKG_ROUTER.format(layer=int(gate.group(1)))

            def swap_row(g: torch.Tensor, key: str = key) -> torch.Tensor:
                with safe_open(str(tensor_file), framework="pt") as f:
                    row = f.get_tensor(key)[None]
                return torch.cat([g[:index], row, g[index + 1 :]])

            source = _gate(source, source.shape[0], swap_row)
        elif expert is not None and int(expert.group(2)) == index:
            key = PKG_PROJ.format(layer=int(expert.group(1)), proj=expert.group(3))
            source = TensorSource(
                source.name, source.shape, source.dtype, tensor_reader(tensor_file, key)
            )
        out.append(source)
    return out


def _with_new_slot(
    sources: list[TensorSource], tensor_file: Path, index: int, layers: int
) -> list[TensorSource]:
    """``sources`` with the package's router row appended to every router and its projections
    added as expert ``index``, each read from ``tensor_file`` when written."""
    out, by_name = [], {s.name: s for s in sources}
    for source in sources:
        gate = _GATE_KEY.fullmatch(source.name)
        if gate is None:
            out.append(source)
            continue
        key = PKG_ROUTER.format(layer=int(gate.group(1)))

        def append_row(g: torch.Tensor, key: str = key) -> torch.Tensor:
            with safe_open(str(tensor_file), framework="pt") as f:
                return torch.cat([g, f.get_tensor(key)[None]])

        out.append(_gate(source, index + 1, append_row))
    for layer in range(layers):
        for proj in names.PROJECTIONS:
            ref = by_name[names.EXPERT.format(layer=layer, expert=0, proj=proj)]
            out.append(
                TensorSource(
                    names.EXPERT.format(layer=layer, expert=index, proj=proj),
                    ref.shape,
                    ref.dtype,
                    tensor_reader(tensor_file, PKG_PROJ.format(layer=layer, proj=proj)),
                )
            )
    return out


def _check_against_model(
    package_dir: Path,
    tensors: dict[str, torch.Tensor],
    shapes: ExpertShapes,
    by_name: dict[str, TensorSource],
    others: list[SlotRecord],
) -> None:
    """As ``merge`` does, with the model's public expert (slot 0: the anchor's feed-forward and
    router row r_0) standing in for the anchor, read one tensor at a time: the package's router
    rows and weights within bounds, and its change from the public expert no copy of another
    slot's."""
    layers = shapes.num_layers
    keys = [(layer, proj) for layer in range(layers) for proj in names.PROJECTIONS]

    def slot(index: int) -> Callable[[FfnKey], torch.Tensor]:
        return lambda key: by_name[
            names.EXPERT.format(layer=key[0], expert=index, proj=key[1])
        ].load()

    public, scales = {}, {}
    for key in keys:
        tensor = slot(0)(key)
        public[key], scales[key] = weight_sample(tensor), float(tensor.float().abs().max())
    rows = torch.stack(
        [by_name[names.ROUTER_ON_DISK.format(layer=i)].load()[0].float() for i in range(layers)]
    )
    check_values(package_dir, tensors, shapes, rows, scales)
    deltas = ((e.name, weight_delta(slot(e.slot), public)) for e in others)
    refuse_copy(package_dir, weight_delta(package_projection(tensors), public), deltas)


def remove_expert(
    model_dir: Path,
    name: str,
    *,
    out: Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Drop expert ``name`` (its FFN and router row); later slots move down by one."""
    model = MergedModel.open(model_dir)
    target = edit_target(model.path, out, overwrite)
    table = model.table()
    _refuse_federated(model, table)
    config, sources = model.config(table), model.sources()
    slots = table.slots
    index = table.index_of(name)
    if index is None:
        known = ", ".join(s.name for s in slots[1:])
        raise FlexMoEError(name, f"no such expert in this model (experts: {known})")
    if index == 0:
        raise FlexMoEError(name, "the public expert cannot be removed")
    out_sources = []
    for source in sources:
        expert, gate = _EXPERT_KEY.fullmatch(source.name), _GATE_KEY.fullmatch(source.name)
        if expert is not None:
            layer, e, proj = int(expert.group(1)), int(expert.group(2)), expert.group(3)
            if e == index:
                continue
            if e > index:
                renamed = names.EXPERT.format(layer=layer, expert=e - 1, proj=proj)
                source = source.renamed(renamed)
        elif gate is not None:

            def drop_row(g: torch.Tensor) -> torch.Tensor:
                return torch.cat([g[:index], g[index + 1 :]])

            source = _gate(source, config.num_experts - 1, drop_row)
        out_sources.append(source)
    remaining = [
        s.model_copy(update={"slot": i}) for i, s in enumerate(s for s in slots if s.name != name)
    ]
    top_k = min(config.num_experts_per_tok, len(remaining))
    if top_k < config.num_experts_per_tok:
        warnings.warn(
            f"top-k lowered to {top_k}: only {len(remaining)} experts remain", stacklevel=2
        )
    new_config = FlexOlmoConfig.from_dict(
        {**config.to_dict(), "num_experts": len(remaining), "num_experts_per_tok": top_k}
    )
    model.write(
        target,
        sources=out_sources,
        config=new_config,
        table=table.model_copy(update={"slots": remaining}),
        progress=progress,
    )
    return target
