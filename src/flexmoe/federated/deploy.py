"""Federated rounds on Flower's deployment runtime: ``flexmoe fed serve`` on the coordinator's
machine (a SuperLink, and the rounds' ServerApp submitted to it with ``flwr run``), ``flexmoe
fed join`` on each owner's (a SuperNode whose ClientApp does the owner's work at home).

The Flower App is flexmoe itself: a one-file app directory whose pyproject names this module's
:data:`coordinator` and :data:`owner`. ``flwr run`` bundles it and the SuperLink hands the bundle
to every SuperNode; every machine has flexmoe installed, so no code is fetched at run time and no
dependency is installed. Each side's settings stay on its own machine, in a JSON file that only
its own process reads: the coordinator's job (model, plan, output) by the ServerApp, the owner's
(its copy of the model, its files, its key) by its ClientApp; only that file's path travels, in
the run config or the SuperNode's local node config.

Our own lines in Flower's output start with :data:`MARK`; each command shows those and keeps
the rest of Flower's logs for ``--debug``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context
from flwr.client import Client
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from flexmoe import __version__
from flexmoe.data.documents import DataSpec
from flexmoe.errors import FlexMoEError
from flexmoe.expert.identity import name_key
from flexmoe.federated.flower import (
    FINAL,
    OwnerClient,
    RoundPlan,
    coordinate,
    secagg_when_asked,
)
from flexmoe.federated.nodes import check_private_node_key, check_public_node_key, register_nodes
from flexmoe.federated.owner import OwnerText
from flexmoe.federated.run import RoundsSummary, check_owners, check_rounds, new_model
from flexmoe.io import parse_address, write_json
from flexmoe.merge.layout import MergedModel
from flexmoe.merge.standing import standing_exclusions

MARK = "[flexmoe] "
JOB_KEY = "flexmoe-job"  # the run config's key: the coordinator's job file
OWNER_KEY = "flexmoe-owner"  # the node config's key: the owner's settings file
FEDERATION = "flexmoe"  # the SuperLink connection's name in the coordinator's Flower config
START_S = 60.0  # how long a SuperLink may take to answer

APP_PYPROJECT = """\
[project]
name = "flexmoe-rounds"
version = "{version}"
description = "flexmoe's federated rounds: the coordinator's ServerApp and the owners' ClientApp"
license = "Apache-2.0"

[tool.flwr.app]
publisher = "flexmoe"

[tool.flwr.app.components]
serverapp = "flexmoe.federated.deploy:coordinator"
clientapp = "flexmoe.federated.deploy:owner"

[tool.flwr.app.config]
{job_key} = ""
"""


def _mark(line: str) -> None:
    print(MARK + line, flush=True)


# --- the two sides' settings, each in a file on its own machine -----------------------------


@dataclass(frozen=True)
class ServeJob:
    """What the coordinator's ServerApp does: the rounds on ``model``, written to ``out``."""

    model: str
    out: str
    plan: dict[str, Any]
    owners: int  # how many owners each phase waits for
    wait_s: float
    registry: str | None
    slot_row: bool
    router_sgd: bool
    status: str  # where the ServerApp writes how it ended
    nodes: dict[str, str] | None = None  # node id -> the owner its registered key is for

    @classmethod
    def read(cls, path: Path) -> ServeJob:
        return cls(**json.loads(Path(path).read_text()))


@dataclass(frozen=True)
class OwnerSetup:
    """An owner's settings, read by its ClientApp: its copy of the model and its text."""

    model: str
    name: str
    data: list[list[str]]  # [domain, path, ...] per DataSpec
    public: list[list[str]]
    public_fraction: float
    key: str | None
    text_field: str
    id_field: str | None
    device: str
    cache_dir: str | None

    @classmethod
    def of(
        cls, model: Path, text: OwnerText, device: torch.device, cache_dir: Path | None
    ) -> OwnerSetup:
        first = (text.data + text.public)[0]
        return cls(
            model=str(Path(model).resolve()),
            name=text.name,
            data=[[s.domain, *(_absolute(p) for p in s.paths)] for s in text.data],
            public=[[s.domain, *(_absolute(p) for p in s.paths)] for s in text.public],
            public_fraction=text.public_fraction,
            key=str(Path(text.key).resolve()) if text.key else None,
            text_field=first.text_field,
            id_field=first.id_field,
            device=str(device),
            cache_dir=str(cache_dir) if cache_dir else None,
        )

    def text(self) -> OwnerText:
        def specs(found: list[list[str]]) -> tuple[DataSpec, ...]:
            return tuple(DataSpec(d, tuple(p), self.text_field, self.id_field) for d, *p in found)

        key = Path(self.key) if self.key else None
        return OwnerText(self.name, specs(self.data), specs(self.public), self.public_fraction, key)


def _absolute(pattern: str) -> str:
    return pattern if Path(pattern).is_absolute() else str(Path.cwd() / pattern)


# --- the Flower App ---------------------------------------------------------------------------


coordinator = ServerApp()


@coordinator.main()
def _coordinate(grid: Grid, context: Context) -> None:
    """The ServerApp's main: the job's rounds; how they ended goes to the job's status file
    (Flower's runtime only logs a ServerApp's error)."""
    job = ServeJob.read(Path(str(context.run_config[JOB_KEY])))
    try:
        write_json(Path(job.status), _run_job(job, grid, context))
    except Exception as e:
        write_json(Path(job.status), {"error": _one_line(e)})
        if os.environ.get("FLEXMOE_DEBUG"):  # the traceback, in Flower's log
            raise


def _run_job(job: ServeJob, grid: Grid, context: Context) -> dict[str, Any]:
    from flexmoe.expert.registry import KeyRegistry

    merged = MergedModel.open(Path(job.model))
    plan = RoundPlan.from_dict(job.plan)
    excluded = standing_exclusions(merged.path)
    registry = KeyRegistry(Path(job.registry)) if job.registry else None
    try:
        with new_model(
            merged, Path(job.out), plan, registry, excluded, job.slot_row, job.router_sgd, False
        ) as rounds:
            nodes = {int(k): v for k, v in job.nodes.items()} if job.nodes is not None else None
            coordinate(
                grid,
                context,
                rounds,
                plan,
                job.owners,
                _mark,
                wait_s=job.wait_s,
                farewell=True,
                nodes=nodes,
            )
    finally:
        if registry is not None:
            registry.close()
    summary = RoundsSummary.of(job.out, rounds.record, frozenset(excluded), plan.rounds)
    return summary.model_dump(mode="json")


def _one_line(error: BaseException) -> str:
    if isinstance(error, FlexMoEError):
        return str(error)
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def _owner_client(context: Context) -> Client:
    setup = OwnerSetup(**json.loads(Path(str(context.node_config[OWNER_KEY])).read_text()))
    cache = Path(setup.cache_dir) if setup.cache_dir else None
    client = OwnerClient(Path(setup.model), setup.text(), torch.device(setup.device), cache)
    client.log = _mark
    return client.to_client()


owner = ClientApp(client_fn=_owner_client, mods=[secagg_when_asked])


# --- the processes ----------------------------------------------------------------------------


def _flower(command: str) -> str:
    """The path of one of Flower's commands, installed beside this Python."""
    found = Path(sys.executable).parent / command
    path = str(found) if found.is_file() else shutil.which(command)
    if path is None:
        raise FlexMoEError(command, "Flower is not installed (pip install 'flexmoe[fed]')")
    return path


def _environment(home: Path, debug: bool) -> dict[str, str]:
    env = {**os.environ, "FLWR_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    if debug:
        env["FLEXMOE_DEBUG"] = "1"
    return env


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@contextmanager
def _process(command: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    """A Flower process whose output we read line by line; it and every process it started
    are stopped when the block ends, SIGTERM included."""
    with _terminable():
        process = subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        try:
            yield process
        finally:
            _stop(process)


@contextmanager
def _terminable() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt here, so that the processes started are stopped."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    try:
        before = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave SIGTERM as it is
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _stop(process: subprocess.Popen[str]) -> None:
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        if process.poll() is not None:
            break
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    if process.stdout is not None:
        process.stdout.close()


def _relay(
    process: subprocess.Popen[str],
    log: Callable[[str], None],
    debug: bool,
    until: Callable[[str], bool] | None = None,
) -> list[str]:
    """Show our lines of ``process``'s output (every line with ``debug``) until it exits or a
    line meets ``until``; the last lines of Flower's own output are returned for errors."""
    tail: list[str] = []
    assert process.stdout is not None
    for raw in process.stdout:
        line = raw.rstrip("\n")
        if debug:
            log(line)
        if MARK in line:
            if not debug:
                log(line.split(MARK, 1)[1])
        elif line.strip():
            tail = [*tail[-19:], line]
        if until is not None and until(line):
            break
    return tail


class _Watch:
    """Meets the SuperNode's line that it sent a reply once the owner's last phase is done
    (with ``once``), or Flower's reason when the SuperLink turns the node away."""

    SENT = "Sent successfully"  # Flower's SuperNode logs this once a reply has gone
    REFUSED = "Failed to initialize the connection to the SuperLink"  # then "[code: N] why"

    def __init__(self, once: bool) -> None:
        self.once, self.final, self.failing = once, False, False
        self.refused: str | None = None

    def __call__(self, line: str) -> bool:
        self.final = self.final or (MARK in line and FINAL in line)
        if self.failing and line.strip().startswith("[code:"):
            self.refused = line.strip().split("]", 1)[-1].strip()
        self.failing = self.failing or self.REFUSED in line
        return self.refused is not None or (self.once and self.final and self.SENT in line)


def _reason(tail: list[str]) -> str:
    """The most telling of Flower's last lines."""
    for line in reversed(tail):
        text = line.strip().strip("│").strip()
        if any(w in text.lower() for w in ("error", "unavailable", "failed", "refused")):
            return text
    return tail[-1].strip() if tail else "no output"


def _wait_for(host: str, port: int, process: subprocess.Popen[str], what: str) -> None:
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            out = process.stdout.read() if process.stdout else ""
            raise FlexMoEError(what, f"did not start: {_reason(out.splitlines())}")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.3)
    raise FlexMoEError(what, f"did not answer on {host}:{port} within {START_S:.0f} s")


# --- fed serve --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tls:
    """The coordinator's TLS certificate and key, and the CA that signed it."""

    ca: Path
    cert: Path
    key: Path

    def check(self) -> None:
        for option, path in (("--ca", self.ca), ("--cert", self.cert), ("--cert-key", self.key)):
            if not Path(path).is_file():
                raise FlexMoEError(option, f"{path}: file not found")


def serve(
    model: Path,
    plan: RoundPlan,
    out: Path,
    *,
    listen: str = "0.0.0.0:9092",
    owners: int | None = None,
    wait_s: float = 600.0,
    registry: Path | None = None,
    tls: Tls | None = None,
    node_keys: dict[str, Path] | None = None,
    overwrite: bool = False,
    slot_row: bool = True,
    router_sgd: bool = True,
    log: Callable[[str], None] = print,
    debug: bool = False,
) -> RoundsSummary:
    """The coordinator: a SuperLink listening on ``listen`` for the owners' SuperNodes, and the
    rounds' ServerApp submitted to it; returns the ServerApp's summary once the new model is at
    ``out``. Each phase waits up to ``wait_s`` for ``owners`` owners (default: every owner that
    has not opted out) and goes on with those connected. With ``node_keys`` (owner -> its
    public node key) only SuperNodes with those keys may connect, each for its own owner."""
    merged, out = check_rounds(model, plan, out, overwrite)
    owners, node_keys = _checked_serve(merged, owners, registry, tls, node_keys)
    host, port = parse_address(listen, "--listen")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.serve-", dir=out.parent) as state:
        root = Path(state)
        home, app = root / "flwr", root / "app"
        home.mkdir()
        app.mkdir()
        text = APP_PYPROJECT.format(version=__version__, job_key=JOB_KEY)
        (app / "pyproject.toml").write_text(text)
        job = ServeJob(
            model=str(merged.path.resolve()),
            out=str(out.resolve()),
            plan=plan.to_dict(),
            owners=owners,
            wait_s=wait_s,
            registry=str(Path(registry).resolve()) if registry else None,
            slot_row=slot_row,
            router_sgd=router_sgd,
            status=str(root / "status.json"),
        )
        local = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        _write_connection(home, f"{local}:{port}", tls)
        env = _environment(home, debug)
        link = _superlink_command(host, port, root / "state.db", tls, bool(node_keys))
        with _process(link, env) as superlink:
            _wait_for(local, port, superlink, "the SuperLink")
            if node_keys:
                nodes = register_nodes(_flower("flwr"), FEDERATION, node_keys, env)
                job = replace(job, nodes={str(k): v for k, v in nodes.items()})
            write_json(root / "job.json", asdict(job))
            log(
                f"coordinator on {host}:{port}"
                + (" (TLS)" if tls else " (no TLS: use it on a trusted network only)")
                + (f", {len(node_keys)} owners' node keys registered" if node_keys else "")
                + f": each phase waits up to {wait_s:.0f} s for {owners} owners (flexmoe fed join)"
            )
            submit = [_flower("flwr"), "run", str(app), FEDERATION, "--stream"]
            submit += ["--run-config", f"{JOB_KEY}={json.dumps(str(root / 'job.json'))}"]
            with _process(submit, env) as run:
                tail = _relay(run, log, debug)
                run.wait()
        status_file = Path(job.status)
        if not status_file.is_file():
            raise FlexMoEError("fed serve", f"the rounds did not finish: {_reason(tail)}")
        status = json.loads(status_file.read_text())
    if "error" in status:
        raise FlexMoEError(None, status["error"])
    return RoundsSummary.model_validate(status)


def _checked_serve(
    merged: MergedModel,
    owners: int | None,
    registry: Path | None,
    tls: Tls | None,
    node_keys: dict[str, Path] | None,
) -> tuple[int, dict[str, Path] | None]:
    """The owners each phase waits for (default: every owner not opted out) and their node
    keys, checked before anything starts."""
    excluded = standing_exclusions(merged.path)
    active = [s.name for s in merged.table().slots[1:] if s.name not in excluded]
    owners = len(active) if owners is None else owners
    if not 1 <= owners <= len(active):
        raise FlexMoEError("--owners", f"must be 1 to {len(active)} (the owners in the model)")
    if registry is not None and not Path(registry).is_file():
        raise FlexMoEError(registry, "key registry not found")
    if tls is not None:
        tls.check()
    checked = _checked_node_keys(node_keys, active)
    if checked and tls is None:
        raise FlexMoEError(
            "--node-key",
            "Flower authenticates nodes over TLS only: give --ca, --cert and --cert-key",
        )
    return owners, checked


def _superlink_command(
    host: str, port: int, database: Path, tls: Tls | None, authenticate: bool
) -> list[str]:
    link = [_flower("flower-superlink"), "--host", host, "--port", str(port)]
    link += ["--disable-runtime-dependency-installation", "--database", str(database)]
    if tls is None:
        link.append("--insecure")
    else:
        link += ["--ssl-ca-certfile", str(tls.ca), "--ssl-certfile", str(tls.cert)]
        link += ["--ssl-keyfile", str(tls.key)]
    if authenticate:
        link.append("--enable-supernode-auth")
    return link


def _checked_node_keys(
    node_keys: dict[str, Path] | None, active: list[str]
) -> dict[str, Path] | None:
    """Each owner's public node key, under its expert's name as the model spells it."""
    if not node_keys:
        return None
    known = {name_key(n): n for n in active}
    checked = {}
    for name, path in node_keys.items():
        if name_key(name) not in known:
            raise FlexMoEError(
                name, f"--node-key: no active expert of this model ({', '.join(active)})"
            )
        check_public_node_key(path)
        checked[known[name_key(name)]] = Path(path)
    return checked


def _write_connection(home: Path, address: str, tls: Tls | None) -> None:
    """The Flower config of ``flwr run``: one SuperLink connection, ours."""
    lines = ["[superlink]", f'default = "{FEDERATION}"', "", f"[superlink.{FEDERATION}]"]
    lines.append(f"address = {json.dumps(address)}")
    if tls is None:
        lines.append("insecure = true")
    else:
        lines.append(f"root-certificates = {json.dumps(str(Path(tls.ca).resolve()))}")
    (home / "config.toml").write_text("\n".join(lines) + "\n")


# --- fed join ---------------------------------------------------------------------------------


def join(
    model: Path,
    text: OwnerText,
    coordinator: str,
    *,
    device: torch.device,
    cache_dir: Path | None,
    ca: Path | None = None,
    node_key: Path | None = None,
    once: bool = False,
    log: Callable[[str], None] = print,
    debug: bool = False,
) -> None:
    """One owner: a SuperNode connected to the coordinator's SuperLink, whose ClientApp does
    this owner's work on its copy of the merged model at ``model``. Runs until interrupted, or
    with ``once`` until the last phase of the coordinator's rounds. With ``node_key`` (its
    private node key) it authenticates to a coordinator that registered the public half."""
    merged = MergedModel.open(model)
    excluded = standing_exclusions(merged.path)
    (text,) = check_owners(merged, [text], excluded)
    host, port = parse_address(coordinator, "--coordinator")
    if ca is not None and not Path(ca).is_file():
        raise FlexMoEError("--ca", f"{ca}: file not found")
    if node_key is not None:
        check_private_node_key(node_key)
    with tempfile.TemporaryDirectory(prefix="flexmoe-owner-") as state:
        root = Path(state)
        (root / "flwr").mkdir()
        setup = root / "owner.json"
        write_json(setup, asdict(OwnerSetup.of(merged.path, text, device, cache_dir)))
        node = [_flower("flower-supernode"), "--superlink", f"{host}:{port}"]
        node += [
            "--port",
            str(free_port()),
            "--node-config",
            f"{OWNER_KEY}={json.dumps(str(setup))}",
        ]
        node += ["--insecure"] if ca is None else ["--root-certificates", str(ca)]
        if node_key is not None:
            node += ["--auth-supernode-private-key", str(Path(node_key).resolve())]
        log(f"{text.name}: joined the coordinator at {host}:{port}; its text stays here")
        refused = None
        for attempt in range(1 + REFUSED_RETRIES):
            if attempt:
                log(f"the coordinator refused this node ({refused}); trying again")
                time.sleep(REFUSED_WAIT_S)
            refused = _supernode(node, _environment(root / "flwr", debug), once, log, debug)
            if refused is None:
                return
        hint = "is this --node-key's .pub registered there?" if node_key else "--node-key?"
        raise FlexMoEError("fed join", f"the coordinator refused this node: {refused} ({hint})")


# A coordinator registers the owners' node keys just after its SuperLink starts: a node that
# arrives in between is turned away, and tries again.
REFUSED_RETRIES, REFUSED_WAIT_S = 3, 5.0


def _supernode(
    command: list[str], env: dict[str, str], once: bool, log: Callable[[str], None], debug: bool
) -> str | None:
    """Run the SuperNode until it leaves; Flower's reason when the SuperLink refused it."""
    with _process(command, env) as supernode:
        watch = _Watch(once)
        tail = _relay(supernode, log, debug, until=watch)
        if watch.refused is not None:
            return watch.refused
        if supernode.poll() is not None and supernode.returncode not in (0, -signal.SIGTERM):
            raise FlexMoEError("fed join", f"the SuperNode stopped: {_reason(tail)}")
    return None
