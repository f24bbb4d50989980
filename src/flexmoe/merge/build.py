"""Execute a merge plan: stream tensors one at a time from the anchor and packages into shards.

Peak memory is about one shard (``max_shard_bytes``) plus one tensor, whatever the number of
experts: nothing is loaded whole. Output: a transformers FlexOlmo checkpoint (config.json,
sharded safetensors with an index, tokenizer) and flexmoe's slot table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import FlexOlmoConfig, FlexOlmoForCausalLM, PreTrainedTokenizerBase

from flexmoe.anchor import ROUTER_FILE, ROUTER_KEY
from flexmoe.errors import FlexMoEError
from flexmoe.expert.package import PKG_BIAS, PKG_PROJ, PKG_ROUTER
from flexmoe.io import atomic_directory, read_json, write_json
from flexmoe.merge.plan import MergePlan, Slot
from flexmoe.model import names
from flexmoe.model.checkpoint import INDEX_FILE, build_moe, read_config, read_state_dict
from flexmoe.model.config import flex_config

SLOTS_FILE = "flexmoe_slots.json"
SLOTS_SCHEMA = 1
# Whether loads apply the owners' learned negative router biases unless told otherwise. Off: on
# the demo's merged models (top-2, 3 and 5 of 5) they changed held-out bits per byte by at most
# 0.0008 (either sign), and without them flexmoe's outputs equal transformers' and vLLM's, which
# do not know the biases. The demo report measures both on every run.
APPLY_BIAS = False
_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}


@dataclass(frozen=True)
class TensorSource:
    """Where one output tensor comes from: a loader called only when the tensor is written."""

    name: str
    shape: tuple[int, ...]
    nbytes: int
    load: Callable[[], torch.Tensor]


def tensor_reader(path: Path, key: str) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(key)

    return load


def read_header(path: Path) -> dict[str, tuple[tuple[int, ...], int]]:
    """Shape and byte size of every tensor of a safetensors file, from its header alone."""
    out = {}
    with safe_open(str(path), framework="pt") as f:
        for key in sorted(f.keys()):
            sl = f.get_slice(key)
            shape = tuple(sl.get_shape())
            count = 1
            for d in shape:
                count *= d
            out[key] = (shape, count * _DTYPE_BYTES.get(sl.get_dtype(), 4))
    return out


def tensor_sources(plan: MergePlan) -> list[TensorSource]:
    """Every output tensor, in a deterministic order, with a lazy loader."""
    anchor_file = plan.anchor.path / "model.safetensors"
    router_file = plan.anchor.path / ROUTER_FILE
    config = plan.anchor.model.config
    anchor_meta = read_header(anchor_file)
    dense = {
        names.DENSE_MLP.format(layer=layer, proj=proj): (layer, proj)
        for layer in range(config.num_hidden_layers)
        for proj in names.PROJECTIONS
    }
    out: list[TensorSource] = []
    for key, (shape, nbytes) in anchor_meta.items():
        if key not in dense:
            out.append(TensorSource(key, shape, nbytes, tensor_reader(anchor_file, key)))
            continue
        layer, proj = dense[key]
        target = names.EXPERT.format(layer=layer, expert=0, proj=proj)
        out.append(TensorSource(target, shape, nbytes, tensor_reader(anchor_file, key)))
        for slot in plan.slots[1:]:
            pkg_key = PKG_PROJ.format(layer=layer, proj=proj)
            target = names.EXPERT.format(layer=layer, expert=slot.index, proj=proj)
            out.append(TensorSource(target, shape, nbytes, tensor_reader(slot.source, pkg_key)))
    for layer in range(config.num_hidden_layers):

        def gate(layer: int = layer) -> torch.Tensor:
            with safe_open(str(router_file), framework="pt") as f:
                rows = [f.get_slice(ROUTER_KEY)[layer]]
            for slot in plan.slots[1:]:
                with safe_open(str(slot.source), framework="pt") as f:
                    rows.append(f.get_tensor(PKG_ROUTER.format(layer=layer)))
            return torch.stack(rows)  # (N, H)

        shape = (plan.num_experts, config.hidden_size)
        out.append(
            TensorSource(
                names.ROUTER_ON_DISK.format(layer=layer), shape, 4 * shape[0] * shape[1], gate
            )
        )
    return out


def _shards(sources: list[TensorSource], max_bytes: int) -> list[list[TensorSource]]:
    shards: list[list[TensorSource]] = [[]]
    size = 0
    for source in sources:
        if shards[-1] and size + source.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(source)
        size += source.nbytes
    return shards


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
    }  # fmt: skip


def slot_table(plan: MergePlan) -> dict[str, Any]:
    """flexmoe's record of the slots: who owns each expert and its learned bias per layer."""
    layers = plan.anchor.model.config.num_hidden_layers
    return {
        "schema_version": SLOTS_SCHEMA,
        "anchor_fingerprint": plan.anchor.manifest.fingerprint,
        "tokenizer_fingerprint": plan.anchor.manifest.tokenizer_fingerprint,
        "top_k": plan.top_k,
        "router_tuning": None,
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
    weight_map: dict[str, str] = {}
    shards = _shards(sources, max_shard_bytes)
    bar = tqdm(total=len(sources), desc="merge", unit="tensor", disable=not progress)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        for i, shard in enumerate(shards, start=1):
            filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for source in shard:
                tensors[source.name] = source.load().contiguous()
                weight_map[source.name] = filename
                bar.update(1)
            save_file(tensors, str(tmp / filename), metadata={"format": "pt"})
            del tensors
        total = sum(s.nbytes for s in sources)
        write_json(tmp / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / SLOTS_FILE, table)
        if finish is not None:
            finish(tmp)
    bar.close()
    return out


def build_merged(
    plan: MergePlan, out: Path, *, overwrite: bool = False, max_shard_bytes: int = 1 << 30,
    progress: bool = True,
) -> Path:  # fmt: skip
    """Write the merged FlexOlmo checkpoint described by ``plan`` to ``out``."""
    config = flex_config(plan.anchor.model.config, num_experts=plan.num_experts, top_k=plan.top_k)
    return write_checkpoint(
        tensor_sources(plan), config=config, tokenizer=plan.anchor.tokenizer,
        table=slot_table(plan), out=out, overwrite=overwrite, max_shard_bytes=max_shard_bytes,
        progress=progress,
    )  # fmt: skip


def load_merged(model_dir: Path, *, use_bias: bool = APPLY_BIAS) -> FlexOlmoForCausalLM:
    """A merged model as a flexmoe runtime model; ``use_bias`` applies the owners' learned biases
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
    state = {k: v.float() for k, v in read_state_dict(model_dir).items()}
    runtime = names.runtime_from_disk(state, num_layers=config.num_hidden_layers)
    return build_moe(config, runtime, where=model_dir, biases=biases, use_bias=use_bias)
