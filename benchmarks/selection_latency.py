"""How long changing the expert selection takes, next to reloading the model without the expert.

Builds a random FlexOlmo model (8 experts, hidden 256, 8 layers) on the CPU, writes it with a
slot table and an opt-out store, and times, as medians over many repeats:

- ``set_selection``: building the mask from names and setting it on every MoE layer;
- ``set_selection_with_standing``: the same after reading the owners' opt-outs from SQLite
  (what every request of ``generate``/``eval``/the server does);
- ``reload``: loading the model from disk again (the alternative a selection avoids).

Prints JSON. Usage: ``python benchmarks/selection_latency.py [--repeats 2000]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from transformers import Olmo2ForCausalLM

from flexmoe import __version__
from flexmoe.inference.selection import Selection, current_mask, set_expert_mask
from flexmoe.io import write_json
from flexmoe.merge.layout import SLOTS_FILE, read_slots
from flexmoe.merge.slots import SlotRecord, SlotTable
from flexmoe.merge.standing import StandingStore
from flexmoe.model.checkpoint import load_model, save_model, upcycle
from flexmoe.model.config import ModelDims, olmo2_config


def _median_us(fn: object, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2000)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    dims = ModelDims(
        hidden_size=256, num_layers=args.layers, num_heads=4, intermediate_size=1024,
        max_seq_len=256,
    )  # fmt: skip
    config = olmo2_config(dims, vocab_size=4096, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    model = upcycle(Olmo2ForCausalLM(config).eval(), num_experts=args.experts, top_k=4)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        save_model(model, root)
        names = ["public", *(f"expert{i}" for i in range(1, args.experts))]
        slots = [
            SlotRecord(slot=i, name=n, owner=f"{n} org", license="MIT", package_sha256=None,
                       bias=[0.0] * dims.num_layers, manifest=None, signer=None)
            for i, n in enumerate(names)
        ]  # fmt: skip
        table = SlotTable(anchor_fingerprint="0" * 64, tokenizer_fingerprint="0" * 64, slots=slots)
        write_json(root / SLOTS_FILE, table.model_dump(mode="json"))
        store = StandingStore(root)
        store.set("expert1", opted_out=True, reason="benchmark")
        store.close()
        slots = read_slots(root)
        selection = Selection(exclude=frozenset({"expert2"}))

        def plain() -> None:
            set_expert_mask(model, selection.mask(slots))

        def with_standing() -> None:
            set_expert_mask(model, current_mask(root, slots, selection))

        reload_times = []
        for _ in range(5):
            start = time.perf_counter()
            load_model(root)
            reload_times.append(time.perf_counter() - start)
        result = {
            "benchmark": "selection_latency",
            "flexmoe_version": __version__,
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            "torch_threads": torch.get_num_threads(),
            "experts": args.experts,
            "layers": args.layers,
            "repeats": args.repeats,
            "set_selection_us": round(_median_us(plain, args.repeats), 1),
            "set_selection_with_standing_us": round(
                _median_us(with_standing, max(args.repeats // 10, 20)), 1
            ),
            "reload_ms": round(statistics.median(reload_times) * 1e3, 1),
        }
        result["reload_over_selection_with_standing"] = round(
            result["reload_ms"] * 1e3 / result["set_selection_with_standing_us"], 1
        )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
