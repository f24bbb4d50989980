"""Tokenize documents into one EOS-separated stream, cached on disk and memory-mapped."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from flexmoe.data.documents import Document
from flexmoe.data.tokenizer import tokenizer_fingerprint
from flexmoe.errors import FlexMoEError
from flexmoe.io import atomic_write_bytes

PACK_FORMAT = 1
_BATCH = 256


@dataclass
class TokenStream:
    """Token ids of many documents: ``EOS doc_1 EOS doc_2 EOS ...``.

    Blocks of ``seq_len + 1`` tokens overlap by one, so each token after the first is predicted
    exactly once: block ``i`` covers ``tokens[i*L : i*L + L + 1]``.
    """

    tokens: np.ndarray  # (N,) uint16 or uint32, usually a read-only memmap
    num_bytes: int  # UTF-8 bytes of the documents' text
    num_docs: int

    def num_blocks(self, seq_len: int) -> int:
        return max(0, (len(self.tokens) - 1) // seq_len)

    def block(self, index: int, seq_len: int) -> torch.Tensor:
        start = index * seq_len
        return torch.from_numpy(self.tokens[start : start + seq_len + 1].astype(np.int64))

    def batch(self, indices: list[int], seq_len: int) -> torch.Tensor:
        return torch.stack([self.block(i, seq_len) for i in indices])  # (B, L + 1)


SPREAD_CHUNK = 2048  # tokens: the pieces a spread sample of a stream is made of


def mix_streams(
    primary: TokenStream, secondary: TokenStream, fraction: float, *, spread: bool = False
) -> TokenStream:
    """``primary`` followed by tokens of ``secondary`` making up ``fraction`` of all tokens:
    its prefix, or with ``spread`` pieces of :data:`SPREAD_CHUNK` tokens evenly spaced over all
    of it (documents are in id order, so a prefix holds the first sources only).

    For training only (byte and document counts describe ``primary``): the training order
    shuffles blocks, so the two sources interleave.
    """
    if not 0 <= fraction < 1:
        raise FlexMoEError("--public-fraction", f"must be in [0, 1), got {fraction}")
    wanted = int(len(primary.tokens) * fraction / (1 - fraction))
    source = np.asarray(secondary.tokens)
    if spread and 0 < wanted < len(source):
        pieces = -(-wanted // SPREAD_CHUNK)
        starts = np.linspace(0, len(source) - SPREAD_CHUNK, pieces).astype(np.int64)
        source = np.concatenate([source[max(0, i) : i + SPREAD_CHUNK] for i in starts])
    extra = np.asarray(source[:wanted], dtype=primary.tokens.dtype)
    tokens = np.concatenate([np.asarray(primary.tokens), extra])
    return TokenStream(tokens=tokens, num_bytes=primary.num_bytes, num_docs=primary.num_docs)


def _cache_key(docs: list[Document], fingerprint: str) -> str:
    h = hashlib.sha256(f"pack-v{PACK_FORMAT}\x00{fingerprint}".encode())
    for doc in docs:
        h.update(doc.text_sha256.encode())
    return h.hexdigest()[:32]


def pack_documents(
    docs: list[Document], tokenizer: PreTrainedTokenizerBase, *, cache_dir: Path | None = None
) -> TokenStream:
    """Tokenize ``docs`` into a :class:`TokenStream`, reusing a cached copy when unchanged.

    The cache key is the documents' content hashes plus the tokenizer fingerprint.
    """
    if not docs:
        raise FlexMoEError(None, "no documents to tokenize")
    key = _cache_key(docs, tokenizer_fingerprint(tokenizer))
    if cache_dir is not None:
        cached = _load_cached(Path(cache_dir), key)
        if cached is not None:
            return cached
    eos = tokenizer.eos_token_id
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32
    parts: list[np.ndarray] = [np.array([eos], dtype=dtype)]
    for start in range(0, len(docs), _BATCH):
        texts = [d.text for d in docs[start : start + _BATCH]]
        for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
            parts.append(np.array([*ids, eos], dtype=dtype))
    tokens = np.concatenate(parts)
    num_bytes = sum(len(d.text.encode("utf-8")) for d in docs)
    stream = TokenStream(tokens=tokens, num_bytes=num_bytes, num_docs=len(docs))
    if cache_dir is not None:
        _save_cached(Path(cache_dir), key, stream)
        return _load_cached(Path(cache_dir), key) or stream
    return stream


def _load_cached(cache_dir: Path, key: str) -> TokenStream | None:
    meta_path, array_path = cache_dir / f"{key}.json", cache_dir / f"{key}.npy"
    if not (meta_path.is_file() and array_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        tokens = np.load(array_path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, json.JSONDecodeError):
        return None  # a damaged cache entry is rebuilt, never trusted
    if len(tokens) != meta.get("num_tokens"):
        return None
    return TokenStream(tokens=tokens, num_bytes=meta["num_bytes"], num_docs=meta["num_docs"])


def _save_cached(cache_dir: Path, key: str, stream: TokenStream) -> None:
    import io

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(stream.tokens), allow_pickle=False)
    atomic_write_bytes(cache_dir / f"{key}.npy", buf.getvalue())
    meta = {"num_tokens": len(stream.tokens), "num_bytes": stream.num_bytes}
    meta["num_docs"] = stream.num_docs
    atomic_write_bytes(cache_dir / f"{key}.json", json.dumps(meta).encode())
