"""Execute a merge plan: stream tensors one at a time from the anchor and packages into shards.

Peak host memory is about one tensor, whatever the number and size of the experts: nothing is
loaded whole, and each shard's header is written from shapes before its tensors follow. Output:
a transformers FlexOlmo checkpoint (config.json, sharded safetensors with an index, tokenizer),
every tensor in the anchor's stored dtype, and flexmoe's slot table.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm
from transformers import FlexOlmoConfig, FlexOlmoForCausalLM, PreTrainedTokenizerBase

from flexmoe.anchor import ROUTER_FILE, ROUTER_KEY
from flexmoe.card import merged_card, write_card
from flexmoe.data.tokenizer import save_tokenizer
from flexmoe.device import compute_dtype
from flexmoe.errors import FlexMoEError
from flexmoe.expert.package import PKG_BIAS, PKG_PROJ, PKG_ROUTER
from flexmoe.io import atomic_directory, read_json, show_progress, write_json
from flexmoe.merge.plan import MergePlan, Slot
from flexmoe.model import names
from flexmoe.model.checkpoint import (
    build_moe,
    read_config,
    read_state_dict,
    save_config,
    stored_dtype,
    write_weights,
)
from flexmoe.model.config import flex_config
from flexmoe.model.stream import TensorSource, tensor_reader

SLOTS_FILE = "flexmoe_slots.json"
SLOTS_SCHEMA = 1
# Whether loads apply the owners' learned negative router biases unless told otherwise. Off: on
# the demo's merged models (top-2, 3 and 5 of 5) they changed held-out bits per byte by at most
# 0.0008 (either sign), and without them flexmoe's outputs equal transformers' and vLLM's, which
# do not know the biases. The demo report measures both on every run.
APPLY_BIAS = False


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


def slot_entry(slot: Slot, layers: int) -> dict[str, Any]:
    """One slot's row of the slot table; the bias per layer is read from the package."""
    if slot.manifest is None:
        bias = [0.0] * layers
    else:
        with safe_open(str(slot.source), framework="pt") as f:
            bias = [float(f.get_tensor(PKG_BIAS.format(layer=i))) for i in range(layers)]
    return {
        "slot": slot.index, "name": slot.name, "owner": slot.owner, "license": slot.license,
        "package_sha256": slot.package_sha256, "bias": bias,
        "manifest": slot.manifest.model_dump() if slot.manifest else None,
        "signer": slot.signer.record() if slot.signer else None,
    }  # fmt: skip


def slot_table(plan: MergePlan) -> dict[str, Any]:
    """flexmoe's record of the slots: who owns each expert and its learned bias per layer."""
    layers = plan.anchor.config.num_hidden_layers
    return {
        "schema_version": SLOTS_SCHEMA,
        "anchor_fingerprint": plan.anchor.manifest.fingerprint,
        "base_model": plan.anchor.path.name,  # the anchor, as the model card names it
        "tokenizer_fingerprint": plan.anchor.manifest.tokenizer_fingerprint,
        "top_k": plan.top_k,
        "router_tuning": None,
        "signatures_required": plan.signatures_required,
        "slots": [slot_entry(slot, layers) for slot in plan.slots],
    }


def write_checkpoint(
    sources: list[TensorSource], *, config: FlexOlmoConfig, tokenizer: PreTrainedTokenizerBase,
    table: dict[str, Any], out: Path, overwrite: bool, max_shard_bytes: int, progress: bool,
    finish: Callable[[Path], None] | None = None,
) -> Path:  # fmt: skip
    """Stream ``sources`` into shards of a FlexOlmo checkpoint at ``out`` (temp dir + rename).

    ``finish(tmp)`` runs last, just before the rename, to add files of its own.
    """
    bar = tqdm(total=len(sources), desc="merge", unit="tensor", disable=not show_progress(progress))
    with atomic_directory(out, overwrite=overwrite) as tmp:
        write_weights(
            tmp, sources, max_shard_bytes=max_shard_bytes, index=True,
            on_tensor=lambda _: bar.update(1),
        )  # fmt: skip
        save_config(config, tmp)
        save_tokenizer(tokenizer, tmp)
        write_json(tmp / SLOTS_FILE, table)
        write_card(tmp, merged_card(table, table.get("base_model") or "anchor"))
        if finish is not None:
            finish(tmp)
    bar.close()
    return out


def build_merged(
    plan: MergePlan, out: Path, *, overwrite: bool = False, max_shard_bytes: int = 1 << 30,
    progress: bool = True,
) -> Path:  # fmt: skip
    """Write the merged FlexOlmo checkpoint described by ``plan`` to ``out``."""
    config = flex_config(plan.anchor.config, num_experts=plan.num_experts, top_k=plan.top_k)
    config.dtype = plan.anchor.dtype
    return write_checkpoint(
        tensor_sources(plan), config=config, tokenizer=plan.anchor.tokenizer,
        table=slot_table(plan), out=out, overwrite=overwrite, max_shard_bytes=max_shard_bytes,
        progress=progress,
    )  # fmt: skip


def load_merged(
    model_dir: Path, *, use_bias: bool = APPLY_BIAS, device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> FlexOlmoForCausalLM:  # fmt: skip
    """A merged model as a flexmoe runtime model on ``device`` (default CPU), its weights in
    ``dtype`` (default: the compute dtype there); ``use_bias`` applies the owners' learned biases
    from the slot table (transformers, which does not know them, runs without)."""
    model_dir = Path(model_dir)
    table = read_json(model_dir / SLOTS_FILE)
    config = read_config(model_dir)
    if not isinstance(config, FlexOlmoConfig):
        raise FlexMoEError(
            model_dir / "config.json", "a merged model must be a FlexOlmo checkpoint"
        )
    slots = table.get("slots", [])
    if len(slots) != config.num_experts:
        raise FlexMoEError(
            model_dir / SLOTS_FILE, f"{len(slots)} slots but {config.num_experts} experts"
        )
    biases = torch.tensor([s["bias"] for s in slots[1:]], dtype=torch.float32).T  # (layers, N - 1)
    device = device or torch.device("cpu")
    dtype = dtype or compute_dtype(device, stored_dtype(config))
    state = {k: v.to(dtype) for k, v in read_state_dict(model_dir).items()}
    runtime = names.runtime_from_disk(state, num_layers=config.num_hidden_layers)
    model = build_moe(config, runtime, where=model_dir, biases=biases, use_bias=use_bias)
    return model.to(device)  # type: ignore[arg-type]
