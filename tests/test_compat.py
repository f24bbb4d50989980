"""Our checkpoints in the Hugging Face ecosystem: the saved configs and tokenizers load, with the
same outputs, on transformers 4.57 and 5.x; lm-eval scores a merged model from the README's
local task."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import train_packages
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from flexmoe.merge.build import build_merged
from flexmoe.merge.plan import plan_merge
from flexmoe.model.config import ROPE_THETA

ROOT = Path(__file__).resolve().parents[1]
COMPAT = Path(
    os.environ.get("FLEXMOE_COMPAT_TRANSFORMERS", ROOT / ".venv" / "compat" / "transformers-4.57")
)
TEXT = "The quick brown fox jumps over the lazy dog. " * 3


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory, anchor_dir: Path, corpus_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("compat")
    packages = train_packages(root, anchor_dir, corpus_dir)
    return build_merged(plan_merge(anchor_dir, packages), root / "merged", progress=False)


def test_saved_files_carry_what_both_versions_read(anchor_dir: Path, merged: Path) -> None:
    for model in (anchor_dir, merged):
        config = json.loads((model / "config.json").read_text())
        assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == ROPE_THETA
        tokenizer = json.loads((model / "tokenizer_config.json").read_text())
        assert tokenizer["tokenizer_class"] == "PreTrainedTokenizerFast"
        assert "local_files_only" not in tokenizer


_OLD = """
import json, sys
import torch, transformers
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
assert transformers.__version__.startswith("4.57"), transformers.__version__
expected = load_file(sys.argv[1])
for i, path in enumerate(sys.argv[2:]):
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer(sys.stdin.readline().rstrip("\\n"), return_tensors="pt").input_ids if i == 0 \\
        else ids
    assert torch.equal(ids, expected["ids"]), "tokenizer"
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(ids).logits
    diff = (logits - expected[f"logits{i}"]).abs().max().item()
    print(type(model).__name__, type(tokenizer).__name__, diff)
    assert diff < 1e-4, diff
"""


def test_transformers_4_57_loads_anchor_and_merged(
    tmp_path: Path, anchor_dir: Path, merged: Path
) -> None:
    if not (COMPAT / "transformers").is_dir():
        pytest.skip(f"transformers 4.57 is not at {COMPAT}: `make test` installs it")
    reference = {}
    for i, path in enumerate((anchor_dir, merged)):
        ids = AutoTokenizer.from_pretrained(str(path))(TEXT, return_tensors="pt").input_ids
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        with torch.no_grad():
            reference[f"logits{i}"] = model(ids).logits.contiguous()
        reference["ids"] = ids
    save_file(reference, str(tmp_path / "expected.safetensors"))
    env = {**os.environ, "PYTHONPATH": str(COMPAT), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", _OLD, str(tmp_path / "expected.safetensors"), str(anchor_dir),
         str(merged)],
        input=TEXT + "\n", capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.split("\n")
    assert lines[0].startswith("Olmo2ForCausalLM PreTrainedTokenizerFast")
    assert lines[1].startswith("FlexOlmoForCausalLM PreTrainedTokenizerFast")


def _lm_eval(tmp_path: Path, out: str, *model: str) -> dict[str, float]:
    """The README's local task (examples/lm_eval) scored by lm_eval with ``model``'s args."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "datasets"), "OPENAI_API_KEY": "unused"}  # fmt: skip
    result = subprocess.run(
        [str(Path(sys.executable).parent / "lm_eval"), *model, "--tasks", "flexmoe_heldout",
         "--include_path", str(ROOT / "examples" / "lm_eval"), "--limit", "6",
         "--output_path", str(tmp_path / out)],
        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (found,) = (tmp_path / out).rglob("results_*.json")
    return json.loads(found.read_text())["results"]["flexmoe_heldout"]


@pytest.mark.slow
def test_lm_eval_scores_the_readme_local_task_on_the_files_and_on_the_server(
    tmp_path: Path, merged: Path, corpus_dir: Path
) -> None:
    """lm-evaluation-harness scores the held-out task on the checkpoint (`hf`) and on `flexmoe
    serve` (its `local-completions` model: token ids, logprobs, echo); the same bits per byte."""
    from helpers import live

    (tmp_path / "heldout.jsonl").write_bytes((corpus_dir / "other.jsonl").read_bytes())
    # The same rolling windows on both: lm-eval's API model keeps max_length - 1 for the one
    # token it generates and windows one shorter again; the served prompt and that token fit the
    # model's context.
    context = AutoModelForCausalLM.from_pretrained(merged).config.max_position_embeddings
    files = _lm_eval(tmp_path, "hf", "--model", "hf", "--model_args",
                     f"pretrained={merged},dtype=float32,max_length={context - 2}", "--device",
                     "cpu", "--batch_size", "8")  # fmt: skip
    bpb = files["bits_per_byte,none"]
    assert math.isfinite(bpb) and 0 < bpb < 16
    with live(merged, name="merged") as url:
        served = _lm_eval(tmp_path, "served", "--model", "local-completions", "--model_args",
                          f"model=merged,base_url={url}/v1/completions,tokenizer_backend=huggingface,"
                          f"tokenizer={merged},max_length={context},num_concurrent=1,max_retries=1")  # fmt: skip
    assert served["bits_per_byte,none"] == pytest.approx(bpb, rel=1e-4)
