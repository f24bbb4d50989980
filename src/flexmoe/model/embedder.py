"""A sentence-embedding model read from a local directory (safetensors only), mean-pooled.

The ``embedder`` router initialisation (the paper's way) embeds a domain's documents with such a
model, averages the unit-length document embeddings and maps the mean to the decoder's hidden
size with a fixed, seeded random projection recorded in the anchor.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

from flexmoe.errors import FlexMoEError
from flexmoe.model.checkpoint import tensors_sha256


class Embedder:
    """Mean-pooled, L2-normalised embeddings from a local transformers encoder."""

    def __init__(self, path: Path, *, device: torch.device) -> None:
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise FlexMoEError(self.path, "no config.json: not a transformers embedding model")
        try:
            self.model = AutoModel.from_pretrained(
                str(self.path), local_files_only=True, use_safetensors=True
            )
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise FlexMoEError(self.path, f"cannot load the embedding model ({e})") from e
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.model.to(device).eval()  # type: ignore[arg-type]
        self.device = device

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def fingerprint(self) -> str:
        """sha256 over the encoder's tensors (sorted names, dtype, shape, bytes)."""
        return tensors_sha256(self.model.state_dict())

    @torch.no_grad()
    def mean_embedding(
        self, texts: Sequence[str], *, max_tokens: int = 256, batch_size: int = 16
    ) -> torch.Tensor:
        """``(dim,)``: the mean over documents of each document's unit-length embedding."""
        if not texts:
            raise FlexMoEError(None, "no documents to embed")
        total = torch.zeros(self.dim, dtype=torch.float64)
        for start in range(0, len(texts), batch_size):
            enc = self.tokenizer(
                list(texts[start : start + batch_size]),
                truncation=True,
                max_length=max_tokens,
                padding=True,
                return_tensors="pt",
            ).to(self.device)
            hidden = self.model(**enc).last_hidden_state.float()  # (B, T, E)
            mask = enc["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, E)
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
            total += pooled.double().sum(0).cpu()
        return (total / len(texts)).float()


def projection(seed: int, *, hidden_size: int, embedding_dim: int) -> torch.Tensor:
    """``(hidden, embedding)``: a fixed Gaussian projection from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(hidden_size, embedding_dim, generator=gen) / embedding_dim**0.5
