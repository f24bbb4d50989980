"""Byte-level BPE tokenizers saved in the transformers format, and their fingerprints."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from flexmoe.errors import FlexMoEError
from flexmoe.io import atomic_directory, read_json, write_json

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


def train_tokenizer(
    texts: Iterable[str],
    out_dir: Path,
    *,
    vocab_size: int = 8192,
    model_max_length: int = 2048,
    overwrite: bool = False,
) -> PreTrainedTokenizerBase:
    """Train a byte-level BPE on ``texts`` and save it where ``AutoTokenizer`` loads it offline.

    The end-of-text token doubles as BOS and EOS (as in OLMo); a separate pad token is added.
    """
    if vocab_size < 300:
        raise FlexMoEError(
            "--vocab-size", f"must be at least 300 (256 bytes + merges), got {vocab_size}"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=model_max_length,
    )
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        save_tokenizer(fast, tmp)
    return load_tokenizer(out_dir)


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> None:
    """The tokenizer files as transformers writes them, with a ``tokenizer_config.json`` that
    loads on transformers 4.x and 5.x alike: the class named ``PreTrainedTokenizerFast`` (5.x
    writes ``TokenizersBackend``, unknown to 4.x) and no ``local_files_only`` (a loading
    option of ours, not a property of the tokenizer)."""
    tokenizer.save_pretrained(str(out_dir))
    path = Path(out_dir) / "tokenizer_config.json"
    data = read_json(path)
    data["tokenizer_class"] = "PreTrainedTokenizerFast"
    data.pop("local_files_only", None)
    write_json(path, data)


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """Load a transformers tokenizer directory offline, with a one-line error if it is broken."""
    path = Path(path)
    if not path.is_dir():
        raise FlexMoEError(path, "tokenizer directory not found")
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise FlexMoEError(path, "no tokenizer.json or tokenizer_config.json")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # tokenizers and transformers raise many types for corrupt files
        raise FlexMoEError(
            path / "tokenizer.json", f"cannot load tokenizer ({_first_line(e)})"
        ) from e
    if tokenizer.eos_token_id is None:
        raise FlexMoEError(path, "tokenizer has no end-of-text (eos) token")
    return tokenizer


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 over the tokenizer's vocabulary, merges, normalisation and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = json.loads(backend.to_str()) if backend else {"vocab": tokenizer.get_vocab()}
    body["special"] = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
    }
    canonical = json.dumps(body, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(canonical).hexdigest()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
