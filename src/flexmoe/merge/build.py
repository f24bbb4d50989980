"""Execute a merge plan: stream tensors one at a time from the anchor and packages into shards.

Peak host memory is about one tensor, whatever the number and size of the experts: nothing is
loaded whole, and each shard's header is written from shapes before its tensors follow. Output:
a transformers FlexOlmo checkpoint (config.json, sharded safetensors with an index, tokenizer),
every tensor in the anchor's stored dtype, and flexmoe's slot table, written by
``merge.layout``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from flexmoe.anchor import ROUTER_FILE, ROUTER_KEY
from flexmoe.expert.manifest import PKG_BIAS, PKG_PROJ, PKG_ROUTER
from flexmoe.merge.layout import SHARD_BYTES, create_merged
from flexmoe.merge.plan import MergePlan, Slot
from flexmoe.merge.slots import SignerRecord, SlotRecord, SlotTable
from flexmoe.model import names
from flexmoe.model.config import flex_config
from flexmoe.model.stream import TensorSource, tensor_reader


def tensor_sources(plan: MergePlan) -> list[TensorSource]:
    """Every output tensor, in a deterministic order, with a lazy loader."""
    router_file = plan.anchor.path / ROUTER_FILE
    config = plan.anchor.config
    dtype = plan.anchor.dtype
    dense = {
        names.DENSE_MLP.format(layer=layer, proj=proj): (layer, proj)
        for layer in range(config.num_hidden_layers)
        for proj in names.PROJECTIONS
    }
    out: list[TensorSource] = []
    for source in plan.anchor.sources():
        if source.name not in dense:
            out.append(source)
            continue
        layer, proj = dense[source.name]
        out.append(source.renamed(names.EXPERT.format(layer=layer, expert=0, proj=proj)))
        for slot in plan.slots[1:]:
            pkg_key = PKG_PROJ.format(layer=layer, proj=proj)
            target = names.EXPERT.format(layer=layer, expert=slot.index, proj=proj)
            out.append(
                TensorSource(target, source.shape, dtype, tensor_reader(slot.source, pkg_key))
            )
    for layer in range(config.num_hidden_layers):

        def gate(layer: int = layer) -> torch.Tensor:
            with safe_open(str(router_file), framework="pt") as f:
                rows = [f.get_slice(ROUTER_KEY)[layer]]
            for slot in plan.slots[1:]:
                with safe_open(str(slot.source), framework="pt") as f:
                    rows.append(f.get_tensor(PKG_ROUTER.format(layer=layer)))
            return torch.stack(rows).to(dtype)  # (N, H)

        shape = (plan.num_experts, config.hidden_size)
        out.append(TensorSource(names.ROUTER_ON_DISK.format(layer=layer), shape, dtype, gate))
    return out


def slot_entry(slot: Slot, layers: int) -> SlotRecord:
    """One slot's row of the slot table; the bias per layer is read from the package."""
    if slot.manifest is None:
        bias = [0.0] * layers
    else:
        with safe_open(str(slot.source), framework="pt") as f:
            bias = [float(f.get_tensor(PKG_BIAS.format(layer=i))) for i in range(layers)]
    signer = SignerRecord.model_validate(slot.signer.record()) if slot.signer else None
    return SlotRecord(
        slot=slot.index,
        name=slot.name,
        owner=slot.owner,
        license=slot.license,
        package_sha256=slot.package_sha256,
        bias=bias,
        manifest=slot.manifest,
        signer=signer,
    )


def slot_table(plan: MergePlan) -> SlotTable:
    """flexmoe's record of the slots: who owns each expert and its learned bias per layer."""
    layers = plan.anchor.config.num_hidden_layers
    return SlotTable(
        anchor_fingerprint=plan.anchor.manifest.fingerprint,
        base_model=plan.anchor.path.name,
        tokenizer_fingerprint=plan.anchor.manifest.tokenizer_fingerprint,
        signatures_required=plan.signatures_required,
        slots=[slot_entry(slot, layers) for slot in plan.slots],
    )


def build_merged(
    plan: MergePlan,
    out: Path,
    *,
    overwrite: bool = False,
    max_shard_bytes: int = SHARD_BYTES,
    progress: bool = True,
) -> Path:
    """Write the merged FlexOlmo checkpoint described by ``plan`` to ``out``."""
    config = flex_config(plan.anchor.config, num_experts=plan.num_experts, top_k=plan.top_k)
    config.dtype = plan.anchor.dtype
    create_merged(
        out,
        sources=tensor_sources(plan),
        config=config,
        tokenizer=plan.anchor.tokenizer,
        table=slot_table(plan),
        overwrite=overwrite,
        max_shard_bytes=max_shard_bytes,
        progress=progress,
    )
    return Path(out)
