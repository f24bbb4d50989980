"""Load and save transformers checkpoints (safetensors only) as flexmoe runtime models."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from transformers import (
    FlexOlmoConfig,
    FlexOlmoForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)

from flexmoe.device import parse_dtype
from flexmoe.errors import FlexMoEError
from flexmoe.io import read_json, write_json
from flexmoe.model import names
from flexmoe.model.moe import ExpertMLP, MoEFeedForward, Router
from flexmoe.model.stream import (
    TensorSource,
    check_keys,
    file_sources,
    hash_tensor,
    shard_sources,
    write_safetensors,
)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over tensors in sorted-name order; each adds its name, dtype, shape, raw bytes."""
    h = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        hash_tensor(h, name, tensor)
    return h.hexdigest()


def stored_dtype(config: PretrainedConfig) -> torch.dtype:
    """The dtype a checkpoint's config says its weights are stored in (float32 if it says none)."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        return parse_dtype(value, field="config.json dtype")
    return torch.float32


def read_config(model_dir: Path) -> PretrainedConfig:
    """The checkpoint's config, as an OLMo-2 or FlexOlmo config."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FlexMoEError(model_dir, "no config.json: not a transformers checkpoint directory")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FlexMoEError(path, f"not valid JSON ({e})") from e
    model_type = raw.get("model_type")
    config_class: type[PretrainedConfig]
    if model_type == "olmo2":
        config_class = Olmo2Config
    elif model_type == "flex_olmo":
        config_class = FlexOlmoConfig
    else:
        raise FlexMoEError(path, f"model_type {model_type!r} is not 'olmo2' or 'flex_olmo'")
    try:
        return config_class.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:  # transformers validates fields with several exception types
        raise FlexMoEError(path, f"invalid config ({str(e).splitlines()[0]})") from e


def weight_files(model_dir: Path) -> dict[str, Path]:
    """Each tensor name of a checkpoint -> the safetensors file holding it (one file or shards)."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            return {key: model_dir / name for key, name in weight_map.items()}
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise FlexMoEError(index, f"not a safetensors index ({e})") from e
    single = model_dir / SINGLE_FILE
    if not single.is_file():
        raise FlexMoEError(
            model_dir, f"no {SINGLE_FILE} or {INDEX_FILE} (only safetensors is read)"
        )
    try:
        with safe_open(str(single), framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    except (SafetensorError, OSError, ValueError) as e:
        raise FlexMoEError(single, f"not a readable safetensors file ({e})") from e


def checkpoint_sources(model_dir: Path) -> list[TensorSource]:
    """A lazy source for every tensor of a checkpoint (one file or shards), in name order."""
    sources: list[TensorSource] = []
    for path in sorted(set(weight_files(model_dir).values())):
        if not path.is_file():
            raise FlexMoEError(path, "shard named in the index is missing")
        sources.extend(file_sources(path))
    return sorted(sources, key=lambda s: s.name)


def write_weights(
    out_dir: Path,
    sources: list[TensorSource],
    *,
    max_shard_bytes: int,
    index: bool = False,
    on_tensor: Callable[[TensorSource], None] | None = None,
) -> None:
    """Stream ``sources`` into ``out_dir`` in transformers' layout, one tensor in memory at a
    time: ``model.safetensors`` when they fit one shard (and no ``index`` is asked for), else
    ``model-0000i-of-0000n.safetensors`` shards with an index."""
    shards = shard_sources(sources, max_shard_bytes)
    if len(shards) == 1 and not index:
        write_safetensors(Path(out_dir) / SINGLE_FILE, sources, on_tensor=on_tensor)
        return
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(Path(out_dir) / filename, shard, on_tensor=on_tensor)
        weight_map.update(dict.fromkeys((s.name for s in shard), filename))
    total = sum(s.nbytes for s in sources)
    write_json(
        Path(out_dir) / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map}
    )


def read_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint: one safetensors file or an index of shards."""
    state: dict[str, torch.Tensor] = {}
    for path in sorted(set(weight_files(model_dir).values())):
        if not path.is_file():
            raise FlexMoEError(path, "shard named in the index is missing")
        try:
            state.update(load_file(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise FlexMoEError(path, f"not a readable safetensors file ({e})") from e
    return state


def _assign(model: torch.nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    """Load ``state`` into a model built on the meta device; shapes and names are checked."""
    expected = dict(model.state_dict())
    check_keys(where, set(expected), set(state))
    for key, tensor in state.items():
        got, want = tuple(tensor.shape), tuple(expected[key].shape)
        if got != want:
            raise FlexMoEError(where, f"tensor {key} has shape {got}, expected {want}")
        if not tensor.is_floating_point():
            raise FlexMoEError(where, f"tensor {key} has dtype {tensor.dtype}, expected a float")
    model.load_state_dict(state, assign=True, strict=True)


def _fresh_rotary(model: PreTrainedModel) -> None:
    """Rebuild rotary embeddings, whose buffers are computed rather than loaded."""
    inner: Any = model.model
    inner.rotary_emb = type(inner.rotary_emb)(config=model.config)


def build_dense(
    config: Olmo2Config, state: dict[str, torch.Tensor], *, where: Path
) -> Olmo2ForCausalLM:
    """An OLMo-2 model holding exactly ``state``."""
    with torch.device("meta"):
        model = Olmo2ForCausalLM(config)
    _assign(model, state, where)
    _fresh_rotary(model)
    return model.eval()


def build_moe(
    config: FlexOlmoConfig,
    state: dict[str, torch.Tensor],
    *,
    where: Path,
    biases: torch.Tensor | None = None,
    use_bias: bool = False,
) -> FlexOlmoForCausalLM:
    """A FlexOlmo model with flexmoe's MoE module, holding ``state`` (runtime names).

    ``biases``: optional ``(layers, N - 1)`` negative biases (a flexmoe extension; zeros if absent).
    """
    layers, experts = config.num_hidden_layers, config.num_experts
    with torch.device("meta"):
        model = FlexOlmoForCausalLM(config)
        for layer in model.model.layers:
            layer.mlp = MoEFeedForward(
                experts=[
                    ExpertMLP(
                        hidden_size=config.hidden_size, intermediate_size=config.intermediate_size
                    )
                    for _ in range(experts)
                ],
                router=Router(hidden_size=config.hidden_size, num_experts=experts),
                top_k=config.num_experts_per_tok,
                use_bias=use_bias,
            )
    state = dict(state)
    ref = next(iter(state.values()))
    for layer in range(layers):
        for index in range(experts - 1):
            value = biases[layer, index] if biases is not None else torch.zeros(())
            key = names.ROUTER_BIAS.format(layer=layer, index=index)
            state.setdefault(key, value.to(dtype=ref.dtype, device=ref.device).clone())
    _assign(model, state, where)
    _fresh_rotary(model)
    return model.eval()


def moe_layers(model: torch.nn.Module) -> list[MoEFeedForward]:
    """The MoE feed-forward modules of a model, in layer order."""
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]


def load_model(
    model_dir: Path, *, use_bias: bool = False, dtype: torch.dtype = torch.float32
) -> PreTrainedModel:
    """Load an OLMo-2 or FlexOlmo checkpoint directory as a flexmoe runtime model (eval), its
    weights in ``dtype`` (see :func:`flexmoe.device.compute_dtype`)."""
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    state = read_state_dict(model_dir)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    if isinstance(config, FlexOlmoConfig):
        runtime = names.runtime_from_disk(state, num_layers=config.num_hidden_layers)
        return build_moe(config, runtime, where=model_dir, use_bias=use_bias)
    assert isinstance(config, Olmo2Config)
    return build_dense(config, state, where=model_dir)


def upcycle(dense: Olmo2ForCausalLM, *, num_experts: int, top_k: int) -> FlexOlmoForCausalLM:
    """An MoE whose experts all start as ``dense``'s MLP; expert 0 shares its tensors.

    Router rows start at zero; the caller sets them (see the anchor's public router vectors).
    """
    from flexmoe.model.config import flex_config

    config = flex_config(dense.config, num_experts=num_experts, top_k=top_k)
    layers = config.num_hidden_layers
    state = names.upcycled_from_dense(
        dict(dense.state_dict()), num_layers=layers, num_experts=num_experts
    )
    ref = state["model.embed_tokens.weight"]
    for layer in range(layers):
        for expert in range(num_experts):
            key = names.ROUTER_ROW.format(layer=layer, expert=expert)
            state[key] = torch.zeros(config.hidden_size, dtype=ref.dtype, device=ref.device)
    return build_moe(config, state, where=Path("<upcycled>"))


def save_config(config: PretrainedConfig, out_dir: Path) -> None:
    """``config.json`` as transformers writes it, plus ``rope_theta`` at the top level: the
    5.x format keeps it only inside ``rope_parameters``, so 4.x would fall back to 10,000 and
    give wrong outputs without an error."""
    config.save_pretrained(out_dir)
    path = Path(out_dir) / "config.json"
    data = read_json(path)
    theta = (data.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None:
        data["rope_theta"] = theta
    write_json(path, data)


def save_model(model: PreTrainedModel, out_dir: Path, *, dtype: torch.dtype | None = None) -> None:
    """Write ``model`` in transformers' format (config.json, model.safetensors) to ``out_dir``,
    its tensors in ``dtype`` (default: as they are), which the config records."""
    out_dir = Path(out_dir)
    dtype = dtype or next(model.parameters()).dtype
    state = {k: v.detach().to(dtype).contiguous().cpu() for k, v in model.state_dict().items()}
    config = model.config
    config.dtype = dtype
    if isinstance(config, FlexOlmoConfig):
        state = names.disk_from_runtime(
            state, num_layers=config.num_hidden_layers, num_experts=config.num_experts
        )
    save_config(config, out_dir)
    save_file(state, str(out_dir / SINGLE_FILE), metadata={"format": "pt"})
