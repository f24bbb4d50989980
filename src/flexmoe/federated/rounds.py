"""The coordinator's side of federated rounds: the model's state between rounds, what each
phase's updates make of it, and every version, recorded with what it was computed from.

A round has up to two phases, in this order:

- ``slots``: each owner refines its own slot at home and sends it as a package; each package is
  checked as ``merge add --replace`` checks one (files, signature, owner, values) and takes its
  owner's slot, its row included;
- ``router``: each owner trains every active router row at home and sends the change; the
  changes are averaged, weighted by the tokens each owner trained on (FedAvg), in the order of
  the experts' names. With secure aggregation the coordinator receives only that average;
- ``trunk``: each owner trains the shared trunk (:mod:`.trunk`) and every active router row at
  home and sends the change; the token-weighted average goes through the server optimiser
  (FedAvg, FedAdam or FedYogi) into a new trunk version and a new router version.

Versions live in ``flexmoe_versions/`` of the merged model: ``router-vN.safetensors`` (every row,
float32), ``slots/NAME-vN/`` (a package) and ``trunk-vN.safetensors`` (the trunk, float32, and
the server optimiser's state). Version 0 of each is the merge's own, read from the model. Each
version records the experts whose owners' text or weights it depends on (``shaped_by``); an
expert that opts out makes the newest versions that do not depend on it the starting point of the
next rounds (:func:`fallback`).
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from flexmoe.errors import FlexMoEError
from flexmoe.expert.manifest import PKG_BIAS, PKG_PROJ, PKG_ROUTER, TENSORS_FILE
from flexmoe.federated.messages import (
    MODEL_KEY,
    Config,
    Updates,
    decode_trunk_update,
    encode_task,
)
from flexmoe.federated.owner import Kind, ModelState, RoundTask
from flexmoe.federated.privacy import DELTA, spent
from flexmoe.federated.server import ServerOptimizer
from flexmoe.federated.trunk import ROWS, LowRank, embeddings_in, trunk_keys
from flexmoe.io import sha256_file
from flexmoe.merge.build import slot_entry
from flexmoe.merge.edit import (
    checked_package,
    replaced_slot_sources,
    with_router_rows,
    with_tensors,
)
from flexmoe.merge.layout import MergedModel
from flexmoe.merge.slots import (
    FederatedRound,
    Federation,
    RouterVersion,
    SlotTable,
    SlotVersion,
    TrunkVersion,
)
from flexmoe.merge.standing import standing_exclusions
from flexmoe.model import names
from flexmoe.model.stream import TensorSource
from flexmoe.training.config import TrainConfig

if TYPE_CHECKING:
    from flexmoe.expert.registry import KeyRegistry

VERSIONS_DIR = "flexmoe_versions"
ROUTER_FILE = "router-v{version}.safetensors"
SLOT_DIR = "slots/{name}-v{version}"
TRUNK_FILE = "trunk-v{version}.safetensors"
TRUNK, MOMENTS = "trunk.", ("m.", "v.")  # the prefixes of a trunk file's tensors


def initial_record(table: SlotTable, rows_sha256: str) -> Federation:
    """Version 0 of the router and of every slot: the merge's own."""
    return Federation(
        router_versions=[
            RouterVersion(
                version=0,
                round=0,
                phase="merge",
                participants=[],
                shaped_by=[],
                trained_against={s.name: 0 for s in table.slots[1:]},
                parent=None,
                file=ROUTER_FILE.format(version=0),
                sha256=rows_sha256,
            )
        ],
        slot_versions=[
            SlotVersion(
                name=s.name,
                version=0,
                round=0,
                shaped_by=[s.name],
                trained_against={},
                router_version=None,
                package=SLOT_DIR.format(name=s.name, version=0),
                tensors_sha256=None,
                record=s,
            )
            for s in table.slots[1:]
        ],
        current_router=0,
        current_slots={s.name: 0 for s in table.slots[1:]},
        rounds=[],
    )


def fallback(record: Federation, excluded: frozenset[str]) -> Federation:
    """``record`` with the newest router version and slot versions that no expert in
    ``excluded`` shaped made current (at worst the merge's own, version 0); an excluded
    expert's own slot goes back to version 0 (no token reaches it; its later versions were
    refined against the others)."""
    if not excluded:
        return record
    router = max(
        (v for v in record.router_versions if not excluded & set(v.shaped_by)),
        key=lambda v: v.version,
    )
    slots = {}
    for name in record.current_slots:
        clean = [
            v.version
            for v in record.slot_versions
            if v.name == name and name not in excluded and not excluded & set(v.shaped_by)
        ]
        slots[name] = max(clean, default=0)
    trunk = max(
        (v for v in record.trunk_versions if not excluded & set(v.shaped_by)),
        key=lambda v: v.version,
        default=None,
    )
    if trunk is not None and trunk.file is None:
        raise FlexMoEError(f"trunk version {trunk.version}", "its file was dropped")
    return record.model_copy(
        update={
            "current_router": router.version,
            "current_slots": slots,
            "current_trunk": trunk.version if trunk else record.current_trunk,
        }
    )


def revert_for_opt_out(model: Path, *, progress: bool = False) -> Federation | None:
    """When an owner has opted out of a model that federated rounds changed: the model's
    weights go back, in place, to the newest versions that no opted-out owner shaped. Returns
    the new record, or None when nothing changed (no rounds, or none shaped by them)."""
    merged = MergedModel.open(model)
    table = merged.table()
    if table.federation is None:
        return None
    excluded = standing_exclusions(merged.path)
    target = fallback(table.federation, excluded)
    now = table.federation
    if _current(target) == _current(now):
        return None
    with tempfile.TemporaryDirectory(prefix=".revert-", dir=merged.path.parent) as work:
        coordinator = Coordinator(merged, Path(work), excluded=excluded)
        coordinator.write(merged.path, progress=progress)
    return coordinator.record


def _current(record: Federation) -> tuple[int, dict[str, int], int]:
    return record.current_router, record.current_slots, record.current_trunk


def _rows_of(sources: dict[str, TensorSource], layers: int) -> torch.Tensor:
    """``(layers, experts, hidden)``: the stored router rows, float32."""
    return torch.stack(
        [sources[names.ROUTER_ON_DISK.format(layer=i)].load().float() for i in range(layers)]
    )


@dataclass
class Coordinator:
    """The model between rounds. New version files go to ``work`` until :meth:`write`; the
    model's own directory is only read."""

    merged: MergedModel
    work: Path
    registry: KeyRegistry | None = None
    excluded: frozenset[str] = frozenset()
    slot_row: bool = True  # slot phases also train each owner's own router row
    router_sgd: bool = True  # router phases step with plain SGD, not AdamW
    server: ServerOptimizer = field(default_factory=ServerOptimizer)  # applies trunk averages
    lora_rank: int = 0  # > 0: trunk phases train rank-R factors of the trunk's matrices
    trunk_sgd: bool = False  # trunk phases step with plain SGD, not AdamW
    # the vocabulary's tensors in the trunk (none, output, all); None: as the model's trunk
    # versions hold them, else output
    trunk_embeddings: str | None = None
    after_round: Callable[[Coordinator], None] | None = None  # called once each round is logged
    table: SlotTable = field(init=False)
    record: Federation = field(init=False)
    in_weights: Federation = field(init=False)  # the versions the model's weights hold
    state: ModelState = field(init=False)
    moments: dict[str, torch.Tensor] = field(init=False)  # the server optimiser's state
    fingerprint: str = field(init=False)  # of the model every owner holds a copy of
    embeddings: str = field(init=False)  # trunk_embeddings, resolved

    def __post_init__(self) -> None:
        self.table = self.merged.table()
        self.fingerprint = self.merged.fingerprint()
        self.config = self.merged.config(self.table)
        self.sources = {s.name: s for s in self.merged.sources()}
        if self.table.federation is None:
            rows = _rows_of(self.sources, self.config.num_hidden_layers)
            path = self._new_file(ROUTER_FILE.format(version=0))
            save_file({"rows": rows.contiguous()}, str(path))
            self.in_weights = initial_record(self.table, sha256_file(path))
        else:
            self.in_weights = self.table.federation
        unknown = self.excluded - {s.name for s in self.table.slots[1:]}
        if unknown:
            raise FlexMoEError(sorted(unknown)[0], "no such expert in this model")
        self.record = fallback(self.in_weights, self.excluded)
        slots = {
            name: load_file(self._tensors(name, version))
            for name, version in self.record.current_slots.items()
            if version != self.in_weights.current_slots[name]
        }
        self.embeddings = self._embeddings()
        self.trunk_names = trunk_keys(self.sources, self.table, embeddings=self.embeddings)
        trunk: dict[str, torch.Tensor] = {}
        self.moments = {}
        if self.record.current_trunk or self.in_weights.current_trunk:
            trunk, self.moments = self._trunk(self.record.current_trunk)
        rows = self._rows(self.record.current_router)
        self.state = ModelState(rows=rows, slots=slots, trunk=trunk)

    def _new_file(self, relative: str) -> Path:
        path = self.work / VERSIONS_DIR / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def _embeddings(self) -> str:
        """The vocabulary's tensors in the trunk: as asked, else as the stored trunk has them."""
        if self.trunk_embeddings is not None or not self.in_weights.trunk_versions:
            return self.trunk_embeddings or "output"
        entry = self.in_weights.trunk_versions[0]
        if entry.file is None:
            raise FlexMoEError(f"trunk version {entry.version}", "its file was dropped")
        with safe_open(str(self._version_path(entry.file)), "pt") as stored:
            held = stored.keys()
        return embeddings_in(k.removeprefix(TRUNK) for k in held)

    def _version_path(self, relative: str) -> Path:
        """A version file: new ones are in ``work``, earlier ones in the model."""
        new = self.work / VERSIONS_DIR / relative
        return new if new.exists() else self.merged.path / VERSIONS_DIR / relative

    def _checked(self, relative: str, sha256: str | None) -> Path:
        path = self._version_path(relative)
        if not path.is_file():
            raise FlexMoEError(path, "a version file the slot table names is missing")
        if sha256 != sha256_file(path):
            raise FlexMoEError(path, "sha256 does not match the slot table (modified or corrupt)")
        return path

    def _rows(self, version: int) -> torch.Tensor:
        entry = self.record.router_versions[version]
        return load_file(self._checked(entry.file, entry.sha256))["rows"]

    def _trunk(self, version: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Trunk version ``version``: its tensors and the server optimiser's state."""
        entry = self.record.trunk_versions[version]
        if entry.file is None:
            raise FlexMoEError(f"trunk version {version}", "its file was dropped")
        found = load_file(self._checked(entry.file, entry.sha256))
        trunk = {k.removeprefix(TRUNK): v for k, v in found.items() if k.startswith(TRUNK)}
        if sorted(trunk) != self.trunk_names:
            raise FlexMoEError(
                entry.file,
                "holds another trunk than these rounds train (--trunk-embeddings differs?)",
            )
        return trunk, {k: v for k, v in found.items() if k.startswith(MOMENTS)}

    def _tensors(self, name: str, version: int) -> Path:
        entry = self.record.slot_version(name, version)
        return self._checked(f"{entry.package}/{TENSORS_FILE}", entry.tensors_sha256)

    @property
    def first_round(self) -> int:
        """The number of the next round: one after the newest round of the current versions
        (so that rounds rebuilt after an opt-out are numbered, and seeded, as they would
        have been without that owner)."""
        rounds = [self.record.router_versions[self.record.current_router].round]
        rounds += [
            self.record.slot_version(n, v).round for n, v in self.record.current_slots.items()
        ]
        if self.record.trunk_versions:
            rounds.append(self.record.trunk_versions[self.record.current_trunk].round)
        return 1 + max(rounds)

    def active(self) -> list[str]:
        """The owners' experts that tokens may route to."""
        return [s.name for s in self.table.slots[1:] if s.name not in self.excluded]

    def task(self, kind: Kind, round: int, cfg: TrainConfig) -> RoundTask:
        return RoundTask(
            kind=kind,
            round=round,
            cfg=cfg,
            excluded=self.excluded,
            slot_row=self.slot_row,
            router_sgd=self.router_sgd,
            lora_rank=self.lora_rank if kind == "trunk" else 0,
            trunk_sgd=self.trunk_sgd,
            trunk_embeddings=self.embeddings,
        )

    def _depends(self, names_: list[str]) -> list[str]:
        """Every expert that the current state and ``names_`` depend on: the active experts
        (their weights take part), the current versions' own dependencies, and ``names_``."""
        found = set(names_) | set(self.active())
        found |= set(self.record.router_versions[self.record.current_router].shaped_by)
        if self.record.trunk_versions:
            found |= set(self.record.trunk_versions[self.record.current_trunk].shaped_by)
        for name, version in self.record.current_slots.items():
            if name not in self.excluded:
                found |= set(self.record.slot_version(name, version).shaped_by)
        return sorted(found)

    def _next_router(self, round: int, phase: str, participants: list[str]) -> None:
        """Record ``self.state.rows`` as a new router version."""
        version = len(self.record.router_versions)
        relative = ROUTER_FILE.format(version=version)
        path = self._new_file(relative)
        save_file({"rows": self.state.rows.contiguous()}, str(path))
        entry = RouterVersion(
            version=version,
            round=round,
            phase=phase,  # type: ignore[arg-type]
            participants=sorted(participants),
            shaped_by=self._depends(participants),
            trained_against={n: self.record.current_slots[n] for n in self.active()},
            trunk_version=self.record.current_trunk,
            parent=self.record.current_router,
            file=relative,
            sha256=sha256_file(path),
        )
        self.record = self.record.model_copy(
            update={
                "router_versions": [*self.record.router_versions, entry],
                "current_router": version,
            }
        )

    @property
    def model_path(self) -> Path:
        """The model each owner holds a copy of."""
        return self.merged.path

    def message(self, task: RoundTask) -> tuple[list[np.ndarray], Config]:
        arrays, config = encode_task(self.state, task)
        return arrays, {**config, MODEL_KEY: self.fingerprint}

    def take_updates(self, round: int, kind: Kind, updates: Updates) -> None:
        """The owners' replies to a router or trunk phase: their changes and token counts."""
        self.take_changes(
            round, kind, {n: (self._decode(kind, a), t) for n, (a, t) in updates.items()}
        )

    def _decode(self, kind: Kind, arrays: list[np.ndarray]) -> dict[str, torch.Tensor]:
        if kind == "trunk":
            return decode_trunk_update(arrays, self.trunk_names)
        if len(arrays) != 1:
            raise FlexMoEError(f"{kind} round", f"an update of {len(arrays)} arrays, not 1")
        return {ROWS: torch.from_numpy(np.array(arrays[0], dtype=np.float32))}

    def take_changes(
        self, round: int, kind: Kind, updates: dict[str, tuple[dict[str, torch.Tensor], int]]
    ) -> None:
        """Average the owners' changes (``name -> (change, tokens)``), weighted by tokens, in
        the order of the names, and apply the average."""
        active = set(self.active())
        for name in updates:
            if name not in active:
                raise FlexMoEError(name, f"round {round}: an update from no active owner")
        total = sum(tokens for _, tokens in updates.values())
        if not updates or total <= 0:
            raise FlexMoEError(f"{kind} round", f"round {round}: no owner sent an update")
        keys = set(next(iter(updates.values()))[0])
        if any(set(change) != keys for change, _ in updates.values()):
            raise FlexMoEError(f"{kind} round", f"round {round}: updates of different tensors")
        average = {k: torch.zeros_like(v) for k, v in next(iter(updates.values()))[0].items()}
        for name in sorted(updates):
            change, tokens = updates[name]
            for key in average:
                average[key] += change[key].float() * (tokens / total)
        self.apply_average(round, kind, average, sorted(updates))

    def take_average(
        self, round: int, kind: Kind, average: list[np.ndarray], participants: list[str]
    ) -> None:
        """The average of the owners' changes, as secure aggregation gives it."""
        self.apply_average(round, kind, self._decode(kind, average), participants)

    def apply_average(
        self, round: int, kind: Kind, average: dict[str, torch.Tensor], participants: list[str]
    ) -> None:
        if kind == "trunk":
            self.add_trunk(round, average, participants)
        else:
            self.add_average(round, average[ROWS], participants)

    def add_average(self, round: int, average: torch.Tensor, participants: list[str]) -> None:
        """Add an average of row changes to the rows: a new router version."""
        if average.shape != self.state.rows.shape:
            raise FlexMoEError("router round", f"an update of shape {tuple(average.shape)}")
        if not torch.isfinite(average).all():
            raise FlexMoEError("router round", f"round {round}: the averaged update is not finite")
        excluded = [i for i, s in enumerate(self.table.slots) if s.name in self.excluded]
        average[:, excluded] = 0  # the masked experts' rows stay as they are
        self.state = replace(self.state, rows=self.state.rows + average)
        self._next_router(round, "router", participants)

    def _masked(self) -> list[int]:
        return [i for i, s in enumerate(self.table.slots) if s.name in self.excluded]

    def add_trunk(
        self, round: int, average: dict[str, torch.Tensor], participants: list[str]
    ) -> None:
        """Apply an average of trunk updates through the server optimiser: a new trunk version
        and a new router version."""
        change = self._dense_change(round, average)
        if not self.record.trunk_versions:
            self._keep_trunk_original()
        rows = self.state.rows
        moments, step = self._server_state()
        weights = {ROWS: rows, **(self.state.trunk or self._stored_trunk())}
        new, self.moments = self.server.step(weights, change, moments, step + 1)
        new_rows = new.pop(ROWS)
        new_rows[:, self._masked()] = rows[:, self._masked()]  # the masked experts' stay
        self.state = replace(self.state, rows=new_rows, trunk=new)
        self._next_trunk(round, participants, step + 1)
        self._next_router(round, "trunk", participants)

    def _dense_change(
        self, round: int, average: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The averaged change of every trunk tensor and the rows (low-rank factors expanded),
        checked."""
        shapes = {ROWS: tuple(self.state.rows.shape)}
        shapes |= {k: tuple(self.sources[k].shape) for k in self.trunk_names}
        if set(average) != set(shapes):
            raise FlexMoEError("trunk round", f"round {round}: an update of other tensors")
        low = LowRank(self.lora_rank, round) if self.lora_rank else None
        change = {}
        for key, sent in average.items():
            dense = sent if low is None or key == ROWS else low.dense(key, sent, shapes[key])
            if tuple(dense.shape) != shapes[key]:
                raise FlexMoEError(key, f"round {round}: an update of shape {tuple(dense.shape)}")
            if not torch.isfinite(dense).all():
                raise FlexMoEError(key, f"round {round}: the averaged update is not finite")
            change[key] = dense.float()
        change[ROWS][:, self._masked()] = 0
        return change

    def _stored_trunk(self) -> dict[str, torch.Tensor]:
        """The trunk the model's weights hold, float32."""
        return {k: self.sources[k].load().float() for k in self.trunk_names}

    def _server_state(self) -> tuple[dict[str, torch.Tensor], int]:
        """The server optimiser's state and steps so far: the current trunk version's, when it
        was made by this very optimiser; else a fresh start."""
        if not self.record.trunk_versions:
            return {}, 0
        made = self.record.trunk_versions[self.record.current_trunk].optimizer
        if made is None or not self.server.continues(ServerOptimizer.of(made)):
            return {}, 0
        return self.moments, made.step

    def _keep_trunk_original(self) -> None:
        """Trunk version 0, the merge's own, kept apart before the weights stop holding it."""
        self._add_trunk_version(self._stored_trunk(), {}, round=0, participants=[], step=None)

    def _next_trunk(self, round: int, participants: list[str], step: int) -> None:
        self._add_trunk_version(self.state.trunk, self.moments, round, participants, step)

    def _add_trunk_version(
        self,
        trunk: dict[str, torch.Tensor],
        moments: dict[str, torch.Tensor],
        round: int,
        participants: list[str],
        step: int | None,
    ) -> None:
        version = len(self.record.trunk_versions)
        relative = TRUNK_FILE.format(version=version)
        path = self._new_file(relative)
        tensors = {TRUNK + k: v.contiguous() for k, v in trunk.items()}
        save_file(tensors | {k: v.contiguous() for k, v in moments.items()}, str(path))
        first = version == 0
        entry = TrunkVersion(
            version=version,
            round=round,
            participants=sorted(participants),
            shaped_by=[] if first else self._depends(participants),
            trained_against={}
            if first
            else {n: self.record.current_slots[n] for n in self.active()},
            router_version=None if first else self.record.current_router,
            parent=None if first else self.record.current_trunk,
            adapters=f"lora-{self.lora_rank}" if self.lora_rank and not first else "full",
            optimizer=None if step is None else self.server.record(step),
            parameters=sum(t.numel() for t in trunk.values()),
            file=relative,
            sha256=sha256_file(path),
        )
        self.record = self.record.model_copy(
            update={
                "trunk_versions": [*self.record.trunk_versions, entry],
                "current_trunk": version,
            }
        )

    def take_slots(self, round: int, packages: dict[str, Path]) -> None:
        """Check each owner's package (``name -> directory``) and make it that slot's new
        version, its router row included."""
        if not packages:
            raise FlexMoEError("slot round", f"round {round}: no owner sent its slot")
        sources = list(self.sources.values())
        new_versions, rows = [], self.state.rows.clone()
        slots = dict(self.state.slots)
        for name in sorted(packages):
            if name in self.excluded:
                raise FlexMoEError(name, "has opted out; its slot is not taken")
            version = 1 + max(v.version for v in self.record.slot_versions if v.name == name)
            relative = SLOT_DIR.format(name=name, version=version)
            dest = self._new_file(relative)
            shutil.copytree(packages[name], dest)
            slot = checked_package(self.table, self.config, sources, dest, self.registry, name)
            tensors = load_file(dest / TENSORS_FILE)
            for layer in range(self.config.num_hidden_layers):
                rows[layer, slot.index] = tensors[PKG_ROUTER.format(layer=layer)].float()
            slots[name] = tensors
            new_versions.append(
                SlotVersion(
                    name=name,
                    version=version,
                    round=round,
                    shaped_by=self._depends([name]),
                    trained_against={
                        n: v for n, v in self.record.current_slots.items() if n in self.active()
                    },
                    router_version=self.record.current_router,
                    trunk_version=self.record.current_trunk,
                    package=relative,
                    tensors_sha256=sha256_file(dest / TENSORS_FILE),
                    record=slot_entry(slot, self.config.num_hidden_layers),
                )
            )
        current = dict(self.record.current_slots) | {v.name: v.version for v in new_versions}
        self.record = self.record.model_copy(
            update={
                "slot_versions": [*self.record.slot_versions, *new_versions],
                "current_slots": current,
            }
        )
        self.state = replace(self.state, rows=rows, slots=slots)
        self._next_router(round, "slots", sorted(packages))

    def log_round(self, entry: FederatedRound) -> None:
        rounds = [*self.record.rounds, entry]
        update: dict[str, object] = {"rounds": rounds}
        if entry.privacy is not None or self.record.epsilon:
            delta = entry.privacy.delta if entry.privacy else self.record.delta
            update |= {"epsilon": privacy_spent(rounds, delta or DELTA), "delta": delta or DELTA}
        self.record = self.record.model_copy(update=update)
        if self.after_round is not None:
            self.after_round(self)

    def _keep_original(self, name: str) -> None:
        """Keep slot ``name``'s version 0 apart (its tensors as a package holds them) before
        the weights stop holding it."""
        entry = self.record.slot_version(name, 0)
        if entry.tensors_sha256 is not None:
            return
        index, layers = entry.record.slot, self.config.num_hidden_layers
        tensors = {}
        for layer in range(layers):
            for proj in names.PROJECTIONS:
                key = names.EXPERT.format(layer=layer, expert=index, proj=proj)
                tensors[PKG_PROJ.format(layer=layer, proj=proj)] = self.sources[key].load()
            gate = self.sources[names.ROUTER_ON_DISK.format(layer=layer)].load()
            tensors[PKG_ROUTER.format(layer=layer)] = gate[index].contiguous()
            bias = torch.tensor(entry.record.bias[layer], dtype=gate.dtype)
            tensors[PKG_BIAS.format(layer=layer)] = bias
        path = self._new_file(f"{entry.package}/{TENSORS_FILE}")
        save_file(tensors, str(path), metadata={"format": "pt"})
        kept = entry.model_copy(update={"tensors_sha256": sha256_file(path)})
        versions = [kept if v is entry else v for v in self.record.slot_versions]
        self.record = self.record.model_copy(update={"slot_versions": versions})

    def _drop_superseded(self) -> None:
        """Drop the files of the trunk versions made here that a newer version shaped by the
        same experts supersedes: no opt-out can fall back to them (the newer one is as clean
        and newer), so only the merge's own, the current one and each last version before a
        change of who shapes the trunk keep their tensors."""
        versions = self.record.trunk_versions
        kept = []
        for v in versions:
            new = self.work / VERSIONS_DIR / str(v.file)
            superseded = any(
                c.parent == v.version and set(c.shaped_by) == set(v.shaped_by) for c in versions
            )
            if (
                v.version
                and v.version != self.record.current_trunk
                and superseded
                and new.is_file()
            ):
                new.unlink()
                v = v.model_copy(update={"file": None, "sha256": None})
            kept.append(v)
        self.record = self.record.model_copy(update={"trunk_versions": kept})

    def write(self, out: Path, *, progress: bool = True) -> MergedModel:
        """The model at the current versions, written to ``out`` with every version file."""
        sources = list(self.sources.values())
        records = list(self.table.slots)
        for name, version in self.record.current_slots.items():
            if version == self.in_weights.current_slots[name]:
                continue
            if self.in_weights.current_slots[name] == 0:
                self._keep_original(name)
            entry = self.record.slot_version(name, version)
            tensors = self._tensors(name, version)
            sources = replaced_slot_sources(sources, tensors, entry.record.slot)
            records[entry.record.slot] = entry.record
        sources = with_router_rows(sources, list(self.state.rows.unbind(0)))
        if self.record.current_trunk != self.in_weights.current_trunk:
            sources = with_tensors(sources, self.state.trunk)
        self._drop_superseded()
        table = self.table.model_copy(update={"slots": records, "federation": self.record})
        return self.merged.write(
            out,
            sources=sources,
            config=self.config,
            table=table,
            progress=progress,
            added=self.work,
        )


def privacy_spent(rounds: list[FederatedRound], delta: float) -> dict[str, float | None]:
    """Each owner's epsilon at ``delta`` over every update it sent in ``rounds`` (None where one
    of them went without noise)."""
    sent: dict[str, list[float]] = {}
    for entry in rounds:
        sigma = entry.privacy.noise_multiplier if entry.privacy else 0.0
        for owners in entry.participants.values():
            for name in owners:
                sent.setdefault(name, []).append(sigma)
    epsilon = {name: spent(sigmas, delta) for name, sigmas in sorted(sent.items())}
    return {name: None if math.isinf(e) else round(e, 4) for name, e in epsilon.items()}
