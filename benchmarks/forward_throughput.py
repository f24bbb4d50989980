"""Forward tokens/s: flexmoe's MoE runtime vs transformers' FlexOlmoForCausalLM, same weights.

Runs are interleaved (flexmoe, transformers, flexmoe, ...) so machine noise hits both alike;
prints medians and the ratio as JSON. Usage:

    python benchmarks/forward_throughput.py [--experts 8 --top-k 4 --hidden 256 --repeats 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import FlexOlmoConfig, FlexOlmoForCausalLM

from flexmoe.device import autocast, pick_device
from flexmoe.model.checkpoint import load_model


def _time(model: torch.nn.Module, ids: torch.Tensor, device: torch.device) -> float:
    with torch.no_grad(), autocast(device):
        model(ids)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(ids)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return ids.numel() / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = pick_device(args.device)
    config = FlexOlmoConfig(
        vocab_size=4096, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
        num_experts=args.experts, num_experts_per_tok=args.top_k, max_position_embeddings=args.seq,
        pad_token_id=1, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    reference = FlexOlmoForCausalLM(config)
    with torch.no_grad():
        for layer in reference.model.layers:
            layer.mlp.gate.weight.normal_(0, 1.0)
    with tempfile.TemporaryDirectory() as tmp:
        reference.save_pretrained(Path(tmp))
        ours = load_model(Path(tmp)).to(device)
        eager = FlexOlmoForCausalLM.from_pretrained(tmp, experts_implementation="eager")
        default = FlexOlmoForCausalLM.from_pretrained(tmp)
    models = {"flexmoe": ours, "transformers_eager": eager.eval().to(device)}
    default_impl = default.config._experts_implementation
    if default_impl != "eager":
        models[f"transformers_{default_impl}"] = default.eval().to(device)
    ids = torch.randint(2, config.vocab_size, (args.batch, args.seq), device=device)
    with torch.no_grad():
        diff = (ours(ids).logits - eager.to(device)(ids).logits).abs().max().item()
    rates: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            rates[name].append(_time(model, ids, device))
    medians = {name: statistics.median(r) for name, r in rates.items()}
    result = {
        "benchmark": "forward_throughput",
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "shape": vars(args),
        "max_abs_logit_diff": diff,
        "tokens_per_s_median": {k: round(v) for k, v in medians.items()},
        "tokens_per_s_runs": {k: [round(x) for x in v] for k, v in rates.items()},
        "ratio_flexmoe_vs_transformers_eager": round(
            medians["flexmoe"] / medians["transformers_eager"], 3
        ),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
