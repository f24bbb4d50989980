"""How long the light commands take to start, beside ``python -c pass``.

Builds a tiny merged model (3 experts, hidden 32) with its slot table and opt-out store in a
temporary directory, then runs each command below in its own process several times and prints,
as JSON, the median wall time and the median CPU time (user + system, the process and its
children) of each, and each one's ratio to ``python -c pass``:

- ``flexmoe --help``; ``flexmoe members list MODEL``;
- ``flexmoe members opt-out MODEL NAME`` and ``opt-in`` (an owner's choice from the command line);
- ``flexmoe ledger MODEL`` and ``flexmoe tokens list MODEL`` (the bearer tokens).

The goal (issue 36): under 1 s of CPU for a command that reads or changes only metadata.
Usage: ``python benchmarks/cli_startup.py [--repeats 5]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _timed(argv: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds of one run of ``argv`` (which must succeed)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, env={**os.environ, "NO_COLOR": "1"})
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def _tiny_model(root: Path) -> Path:
    """A random FlexOlmo model of three tiny experts with its slot table, a usage ledger and
    an opt-out store, as ``merge`` and ``serve`` leave them."""
    import torch
    from transformers import Olmo2ForCausalLM

    from flexmoe.io import write_json
    from flexmoe.merge.layout import SLOTS_FILE
    from flexmoe.merge.slots import SlotRecord, SlotTable
    from flexmoe.merge.standing import StandingStore
    from flexmoe.model.checkpoint import save_model, upcycle
    from flexmoe.model.config import ModelDims, olmo2_config
    from flexmoe.serve.ledger import Ledger

    torch.manual_seed(0)
    dims = ModelDims(
        hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_seq_len=64
    )
    config = olmo2_config(dims, vocab_size=256, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    model = upcycle(Olmo2ForCausalLM(config).eval(), num_experts=3, top_k=2)
    path = root / "model"
    save_model(model, path)
    slots = [
        SlotRecord(
            slot=i,
            name=n,
            owner=f"{n} org",
            license="MIT",
            package_sha256=None,
            bias=[0.0] * dims.num_layers,
            manifest=None,
            signer=None,
        )
        for i, n in enumerate(("public", "upper", "again"))
    ]
    table = SlotTable(anchor_fingerprint="0" * 64, tokenizer_fingerprint="0" * 64, slots=slots)
    write_json(path / SLOTS_FILE, table.model_dump(mode="json"))
    StandingStore(path).close()
    Ledger(path).close()
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    flexmoe = str(Path(sys.executable).with_name("flexmoe"))
    with tempfile.TemporaryDirectory() as tmp:
        model = str(_tiny_model(Path(tmp)))
        commands = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "flexmoe --help": [flexmoe, "--help"],
            "members list": [flexmoe, "members", "list", model],
            "members opt-out": [flexmoe, "members", "opt-out", model, "upper", "--reason", "b"],
            "members opt-in": [flexmoe, "members", "opt-in", model, "upper"],
            "ledger": [flexmoe, "ledger", model],
            "tokens list": [flexmoe, "tokens", "list", model],
        }
        results = {}
        for name, argv in commands.items():
            runs = [_timed(argv) for _ in range(args.repeats)]
            results[name] = {
                "wall_s": round(statistics.median(w for w, _ in runs), 3),
                "cpu_s": round(statistics.median(c for _, c in runs), 3),
            }
    base = results["python -c pass"]["cpu_s"] or 1e-3
    for row in results.values():
        row["cpu_vs_python"] = round(row["cpu_s"] / base, 1)
    print(json.dumps({"repeats": args.repeats, "commands": results}, indent=2))


if __name__ == "__main__":
    main()
