"""A merged model's directory: the one class that names its files, reads its config and slot
table, and writes every version of it, carrying every file across an edit.

    config.json                   transformers' FlexOlmo config; top-k is num_experts_per_tok
    model*.safetensors (+ index)  the weights, sharded
    tokenizer files               as the anchor's
    flexmoe_slots.json            the slot table (``merge.slots``)
    README.md                     the model card, written from the slot table
    flexmoe_standing.sqlite       the owners' opt-outs and their audit log (``merge.standing``)
    flexmoe_owners.sqlite         the owners' bearer tokens, hashed (``serve.auth``)
    flexmoe_ledger.sqlite         the usage ledger (``serve.ledger``)

An edit (``merge add``, ``merge remove``, ``router tune``, any later writer) goes through
:meth:`MergedModel.write`: the weights, config, slot table and card are written anew; each store
is copied with SQLite's backup under its write lock, held until the new directory is in place, so
that a change made meanwhile waits and then lands in the new copy (``io.SqliteStore``); every
other file (the tokenizer, anything a person put there) is carried across as it is.
"""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
from collections.abc import Iterator
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from flexmoe.card import write_card
from flexmoe.errors import FlexMoEError
from flexmoe.io import atomic_directory, read_json, show_progress, validate_model, write_json
from flexmoe.merge.card import merged_card
from flexmoe.merge.slots import SlotInfo, SlotTable

# torch and transformers load only where a command touches weights, so that a command that reads
# or changes metadata (members list, opt-out) starts in a fraction of a second.
if TYPE_CHECKING:
    import torch
    from transformers import FlexOlmoConfig, FlexOlmoForCausalLM, PreTrainedTokenizerBase

    from flexmoe.model.stream import TensorSource

SLOTS_FILE = "flexmoe_slots.json"
CONFIG_FILE = "config.json"
STANDING_FILE = "flexmoe_standing.sqlite"
OWNERS_FILE = "flexmoe_owners.sqlite"
LEDGER_FILE = "flexmoe_ledger.sqlite"
STORE_FILES = (STANDING_FILE, OWNERS_FILE, LEDGER_FILE)
PRIVATE_FILES = frozenset({OWNERS_FILE})  # readable by the coordinator alone
_SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")
SHARD_BYTES = 1 << 30
# Whether loads apply the owners' learned negative router biases unless told otherwise. Off: on
# the demo's merged models (top-2, 3 and 5 of 5) they changed held-out bits per byte by at most
# 0.0008 (either sign), and without them flexmoe's outputs equal transformers' and vLLM's, which
# do not know the biases. The demo report measures both on every run.
APPLY_BIAS = False


@dataclass(frozen=True)
class MergedModel:
    """The directory of a merged model at ``path``."""

    path: Path

    @classmethod
    def open(cls, path: Path) -> MergedModel:
        """``path``, which must hold a merged model."""
        if not cls.is_merged(path):
            raise FlexMoEError(path, f"not a merged model (no {SLOTS_FILE})")
        return cls(Path(path))

    @staticmethod
    def is_merged(path: Path) -> bool:
        return (Path(path) / SLOTS_FILE).is_file()

    @property
    def slots_file(self) -> Path:
        return self.path / SLOTS_FILE

    @property
    def standing_file(self) -> Path:
        return self.path / STANDING_FILE

    @property
    def owners_file(self) -> Path:
        return self.path / OWNERS_FILE

    @property
    def ledger_file(self) -> Path:
        return self.path / LEDGER_FILE

    def table(self) -> SlotTable:
        """The slot table, validated."""
        return validate_model(read_json(self.slots_file), self.slots_file, SlotTable)

    def slots(self) -> list[SlotInfo]:
        return self.table().infos()

    def fingerprint(self) -> str:
        """What tells two copies of this model apart: the sha256 of its config and slot table
        (which holds every package's sha256 and every federated version's)."""
        digest = hashlib.sha256()
        for path in (self.path / CONFIG_FILE, self.slots_file):
            digest.update(path.read_bytes())
        return digest.hexdigest()

    def config(self, table: SlotTable | None = None) -> FlexOlmoConfig:
        """The FlexOlmo config, checked against the slot table."""
        from transformers import FlexOlmoConfig

        from flexmoe.model.checkpoint import read_config

        config = read_config(self.path)
        if not isinstance(config, FlexOlmoConfig):
            raise FlexMoEError(
                self.path / CONFIG_FILE, "a merged model must be a FlexOlmo checkpoint"
            )
        slots = len((table or self.table()).slots)
        if slots != config.num_experts:
            raise FlexMoEError(self.slots_file, f"{slots} slots but {config.num_experts} experts")
        return config

    def top_k(self) -> int:
        """Experts active per token: stored once, as the config's ``num_experts_per_tok``."""
        return int(self.config().num_experts_per_tok)

    def sources(self) -> list[TensorSource]:
        """A lazy source for each stored tensor."""
        from flexmoe.model.checkpoint import checkpoint_sources

        return checkpoint_sources(self.path)

    def tokenizer(self) -> PreTrainedTokenizerBase:
        from flexmoe.data.tokenizer import load_tokenizer

        return load_tokenizer(self.path)

    def load(
        self,
        *,
        use_bias: bool = APPLY_BIAS,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> FlexOlmoForCausalLM:
        """The model as a flexmoe runtime model on ``device`` (default CPU), its weights in
        ``dtype`` (default: the compute dtype there); ``use_bias`` applies the owners' learned
        biases from the slot table (transformers, which does not know them, runs without)."""
        import torch

        from flexmoe.device import compute_dtype
        from flexmoe.model import names
        from flexmoe.model.checkpoint import build_moe, read_state_dict, stored_dtype

        table = self.table()
        config = self.config(table)
        bias_rows = [s.bias for s in table.slots[1:]]
        biases = torch.tensor(bias_rows, dtype=torch.float32).T  # (layers, N - 1)
        device = device or torch.device("cpu")
        dtype = dtype or compute_dtype(device, stored_dtype(config))
        state = {k: v.to(dtype) for k, v in read_state_dict(self.path).items()}
        runtime = names.runtime_from_disk(state, num_layers=config.num_hidden_layers)
        model = build_moe(config, runtime, where=self.path, biases=biases, use_bias=use_bias)
        return model.to(device)  # type: ignore[arg-type]

    def write(
        self,
        out: Path,
        *,
        sources: list[TensorSource],
        config: FlexOlmoConfig,
        table: SlotTable,
        progress: bool = True,
        added: Path | None = None,
    ) -> MergedModel:
        """A new version of this model at ``out`` (this directory itself, or a new one): the
        given weights, config and slot table; every store and every other file carried over,
        and the files of the directory ``added`` put in beside them (folders merged)."""
        in_place = Path(out).resolve() == self.path.resolve()
        with (
            self._stores_locked(create=in_place) as copy_stores,
            atomic_directory(out, overwrite=True, private=PRIVATE_FILES) as tmp,
        ):
            self._carry_files(tmp)
            if added is not None:
                shutil.copytree(added, tmp, dirs_exist_ok=True)
            _write_version(tmp, sources, config, table, SHARD_BYTES, progress)
            copy_stores(tmp)
        return MergedModel(Path(out))

    def _carry_files(self, dest: Path) -> None:
        """Copy every file and folder except the weights (rewritten) and the stores (copied
        under their locks)."""
        from flexmoe.model.checkpoint import INDEX_FILE, weight_files

        weights = {p.name for p in weight_files(self.path).values()} | {INDEX_FILE}
        stores = {f"{s}{side}" for s in STORE_FILES for side in ("", *_SQLITE_SIDE_FILES)}
        for item in self.path.iterdir():
            if item.name in weights or item.name in stores:
                continue
            if item.is_symlink():
                raise FlexMoEError(item, "a symbolic link in a merged model is not carried")
            if item.is_dir():
                shutil.copytree(item, dest / item.name)
            else:
                shutil.copy2(item, dest / item.name)

    @contextmanager
    def _stores_locked(self, *, create: bool) -> Iterator[_StoreCopier]:
        """Hold every store's write lock until the block ends; yields the copier. With
        ``create``, a store the model lacks is made (empty) and locked too, so that one made
        meanwhile is not left behind in a directory about to be replaced."""
        present = [n for n in STORE_FILES if create or (self.path / n).exists()]
        with ExitStack() as stack:
            for name in present:
                try:
                    lock = sqlite3.connect(self.path / name, timeout=30, isolation_level=None)
                    stack.callback(lock.close)
                    lock.execute("PRAGMA journal_mode=WAL")
                    lock.execute("BEGIN IMMEDIATE")
                except sqlite3.Error as e:
                    raise FlexMoEError(self.path / name, f"cannot lock the store ({e})") from e
                stack.callback(lock.execute, "ROLLBACK")
            yield _StoreCopier(self.path, tuple(present))


@dataclass(frozen=True)
class _StoreCopier:
    source: Path
    stores: tuple[str, ...]

    def __call__(self, dest: Path) -> None:
        """Copy the stores into ``dest`` (their writers are held off by the locks)."""
        for name in self.stores:
            try:
                with ExitStack() as stack:
                    reader = stack.enter_context(closing(sqlite3.connect(self.source / name)))
                    target = stack.enter_context(closing(sqlite3.connect(dest / name)))
                    reader.backup(target)
            except sqlite3.Error as e:
                raise FlexMoEError(self.source / name, f"cannot copy the store ({e})") from e


def create_merged(
    out: Path,
    *,
    sources: list[TensorSource],
    config: FlexOlmoConfig,
    tokenizer: PreTrainedTokenizerBase,
    table: SlotTable,
    overwrite: bool = False,
    max_shard_bytes: int = SHARD_BYTES,
    progress: bool = True,
) -> MergedModel:
    """A new merged model at ``out``, with no stores yet."""
    from flexmoe.data.tokenizer import save_tokenizer

    with atomic_directory(out, overwrite=overwrite, private=PRIVATE_FILES) as tmp:
        save_tokenizer(tokenizer, tmp)
        _write_version(tmp, sources, config, table, max_shard_bytes, progress)
    return MergedModel(Path(out))


def _write_version(
    tmp: Path,
    sources: list[TensorSource],
    config: FlexOlmoConfig,
    table: SlotTable,
    max_shard_bytes: int,
    progress: bool,
) -> None:
    """Stream the weights into shards and write the config, slot table and card."""
    from tqdm import tqdm

    from flexmoe.model.checkpoint import save_config, write_weights

    if len(table.slots) != config.num_experts:
        raise FlexMoEError(SLOTS_FILE, f"{len(table.slots)} slots for {config.num_experts} experts")
    bar = tqdm(total=len(sources), desc="merge", unit="tensor", disable=not show_progress(progress))
    with bar:
        write_weights(
            tmp,
            sources,
            max_shard_bytes=max_shard_bytes,
            index=True,
            on_tensor=lambda _: bar.update(1),
        )
    save_config(config, tmp)
    write_json(tmp / SLOTS_FILE, table.model_dump(mode="json"))
    write_card(tmp, merged_card(table, int(config.num_experts_per_tok)))


def load_merged(
    model_dir: Path,
    *,
    use_bias: bool = APPLY_BIAS,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> FlexOlmoForCausalLM:
    """The merged model at ``model_dir`` as a runtime model (see :meth:`MergedModel.load`)."""
    return MergedModel(Path(model_dir)).load(use_bias=use_bias, device=device, dtype=dtype)


def read_slots(model_dir: Path) -> list[SlotInfo]:
    """The slots of the merged model at ``model_dir``, in slot order."""
    return MergedModel(Path(model_dir)).slots()
