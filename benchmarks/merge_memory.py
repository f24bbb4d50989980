"""Peak memory and time of merging N = 2, 4, 8 experts: flexmoe's streaming merge vs a naive one.

Builds a random anchor (hidden 512, 4 layers, intermediate 2048) and N random expert packages
that pass verification, then runs each merge in a fresh subprocess and reads its peak RSS. The
naive merge loads the anchor and every package whole, then writes one file. Prints JSON. Usage:

    python benchmarks/merge_memory.py [--experts 2 4 8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import Olmo2ForCausalLM

from flexmoe import __version__
from flexmoe.anchor import import_anchor, load_anchor
from flexmoe.data.documents import DataSpec
from flexmoe.data.tokenizer import train_tokenizer
from flexmoe.expert.manifest import (
    MANIFEST_FILE,
    TENSORS_FILE,
    ExpertManifest,
    ExpertShapes,
    RouterInitRecord,
    TrainingSummary,
    expected_tensor_shapes,
)
from flexmoe.io import sha256_file, write_json
from flexmoe.model.config import ModelDims, olmo2_config

CHILD_STREAMING = """
import sys
from pathlib import Path
from flexmoe.merge.build import build_merged
from flexmoe.merge.plan import plan_merge
anchor, out, *pkgs = sys.argv[1:]
build_merged(plan_merge(Path(anchor), [Path(p) for p in pkgs], top_k=2), Path(out), progress=False, max_shard_bytes=64 << 20)
"""
CHILD_NAIVE = """
import sys
from pathlib import Path
from safetensors.torch import load_file, save_file
anchor, out, *pkgs = sys.argv[1:]
state = load_file(Path(anchor) / "model.safetensors")
for i, p in enumerate(pkgs, start=1):
    for k, v in load_file(Path(p) / "expert.safetensors").items():
        state[f"expert{i}.{k}"] = v
Path(out).mkdir()
save_file(state, str(Path(out) / "model.safetensors"))
"""


def _fixture(root: Path, n: int) -> tuple[Path, list[Path]]:
    texts = [
        f"the state of the union number {i} is strong and the people are well" for i in range(300)
    ]
    (root / "public.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts))
    tok = train_tokenizer(texts, root / "tok", vocab_size=300)
    dims = ModelDims(
        hidden_size=512, num_layers=4, num_heads=8, intermediate_size=2048, max_seq_len=128
    )
    config = olmo2_config(dims, vocab_size=len(tok), bos_token_id=0, eos_token_id=0, pad_token_id=1)
    torch.manual_seed(0)
    Olmo2ForCausalLM(config).save_pretrained(root / "hf")
    tok.save_pretrained(root / "hf")
    import_anchor(
        root / "hf",
        out=root / "anchor",
        data=[DataSpec("public", (str(root / "public.jsonl"),))],
        device=torch.device("cpu"),
    )
    anchor = load_anchor(root / "anchor")
    shapes = ExpertShapes(num_layers=4, hidden_size=512, intermediate_size=2048)
    packages = []
    for i in range(n):
        pkg = root / f"expert{i}"
        pkg.mkdir()
        tensors = {k: torch.randn(s) * 0.02 for k, s in expected_tensor_shapes(shapes).items()}
        tensors.update({f"layers.{layer}.bias": torch.tensor(-0.1) for layer in range(4)})
        save_file(tensors, str(pkg / TENSORS_FILE))
        manifest = ExpertManifest(
            name=f"expert{i}", owner=f"org{i}", license="MIT", created=datetime.now(UTC).isoformat(),
            anchor_fingerprint=anchor.manifest.fingerprint, tokenizer_fingerprint=anchor.manifest.tokenizer_fingerprint,
            router_init=RouterInitRecord(method="random"), shapes=shapes, flexmoe_version=__version__,
            training=TrainingSummary(steps=0, tokens=0, final_train_loss=0.0, final_val_loss=None, seed=0, hyperparameters={}),
            files={TENSORS_FILE: sha256_file(pkg / TENSORS_FILE)},
        )  # fmt: skip
        write_json(pkg / MANIFEST_FILE, manifest.model_dump())
        packages.append(pkg)
    assert load_file(packages[0] / TENSORS_FILE)
    return root / "anchor", packages


def _run(code: str, args: list[str]) -> dict[str, float]:
    start = time.perf_counter()
    # VmHWM is this process's own peak (ru_maxrss would include the parent's, kept across exec).
    probe = f"exec({code!r})\nprint(next(ln.split()[1] for ln in open('/proc/self/status') if ln.startswith('VmHWM')))"
    out = subprocess.run(
        [sys.executable, "-c", probe, *args], capture_output=True, text=True, check=True
    )
    return {
        "peak_rss_mb": round(int(out.stdout.split()[-1]) / 1024, 1),
        "seconds": round(time.perf_counter() - start, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[2, 4, 8])
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        anchor, packages = _fixture(root, max(args.experts))
        baseline = _run("import flexmoe.merge.build, safetensors.torch", [])
        for n in args.experts:
            chosen = [str(p) for p in packages[:n]]
            stream = _run(CHILD_STREAMING, [str(anchor), str(root / f"s{n}"), *chosen])
            naive = _run(CHILD_NAIVE, [str(anchor), str(root / f"n{n}"), *chosen])
            size = sum(f.stat().st_size for f in (root / f"s{n}").glob("*.safetensors")) / 2**20
            results.append(
                {"experts": n, "merged_mb": round(size, 1), "flexmoe": stream, "naive": naive}
            )
    print(
        json.dumps(
            {
                "benchmark": "merge_memory",
                "import_baseline_rss_mb": baseline["peak_rss_mb"],
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
