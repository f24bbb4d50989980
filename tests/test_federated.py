"""Federated rounds on Flower: owners refine their slots and the router on their own text;
only packages and router updates reach the coordinator."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flexmoe.data.documents import DataSpec
from flexmoe.errors import FlexMoEError
from flexmoe.federated.flower import RoundPlan, simulate
from flexmoe.federated.owner import OwnerText, router_update, slot_update, trunk_update
from flexmoe.federated.rounds import VERSIONS_DIR, Coordinator
from flexmoe.federated.trunk import ROWS
from flexmoe.merge.build import build_merged
from flexmoe.merge.layout import SLOTS_FILE, MergedModel
from flexmoe.merge.plan import plan_merge
from flexmoe.model.checkpoint import read_state_dict
from flexmoe.training.config import TrainConfig

CPU = torch.device("cpu")
CFG = TrainConfig(steps=3, batch_size=4, seq_len=32, lr=1e-2, warmup_steps=1, weight_decay=0.0,
                  eval_every=0, checkpoint_every=0, z_loss=1e-3)  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Flower's simulation runs each owner in a Ray worker of one thread (num_cpus=1), and a
    float sum over two threads rounds differently: every side of a bit-for-bit comparison runs
    on one (this process and the processes it starts)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory, anchor_dir: Path, corpus_dir: Path) -> Path:
    from helpers import train_packages

    root = tmp_path_factory.mktemp("fed")
    packages = train_packages(root / "packages", anchor_dir, corpus_dir)
    build_merged(plan_merge(anchor_dir, packages, top_k=2), root / "merged", progress=False)
    return root / "merged"


def _texts(corpus_dir: Path) -> list[OwnerText]:
    public = (DataSpec("public", (str(corpus_dir / "public.jsonl"),)),)
    return [
        OwnerText("upper", (DataSpec("upper", (str(corpus_dir / "other.jsonl"),)),), public),
        OwnerText("again", (DataSpec("again", (str(corpus_dir / "public.jsonl"),)),), public),
    ]


def _direct(merged: Path, texts: list[OwnerText], work: Path, out: Path) -> None:
    """The same round without Flower: each owner's work called in this process."""
    coordinator = Coordinator(MergedModel.open(merged), work / "coordinator")
    packages = {}
    for text in texts:
        task = coordinator.task("slot", 1, CFG)
        packages[text.name] = work / text.name
        slot_update(coordinator.merged, coordinator.state, task, text, work / text.name,
                    device=CPU, cache_dir=None)  # fmt: skip
    coordinator.take_slots(1, packages)
    updates = {}
    for text in texts:
        task = coordinator.task("router", 1, CFG)
        change, result = router_update(coordinator.merged, coordinator.state, task, text,
                                       device=CPU, cache_dir=None)  # fmt: skip
        updates[text.name] = ({ROWS: change}, result.tokens)
    coordinator.take_changes(1, "router", updates)
    coordinator.write(out, progress=False)


def test_a_simulated_round_equals_the_owners_work_done_directly_and_records_versions(
    merged: Path, corpus_dir: Path, tmp_path: Path
) -> None:
    texts = _texts(corpus_dir)
    plan = RoundPlan(rounds=1, phases=("slot", "router"), slot=CFG, router=CFG)
    coordinator = Coordinator(MergedModel.open(merged), tmp_path / "work")
    simulate(coordinator, texts, plan, device=CPU, cache_dir=None)
    out = coordinator.write(tmp_path / "federated", progress=False).path
    _direct(merged, texts, tmp_path / "direct-work", tmp_path / "direct")

    before, after, direct = (read_state_dict(p) for p in (merged, out, tmp_path / "direct"))
    assert all(torch.equal(after[k], direct[k]) for k in after)  # Flower moved it all exactly
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert {k for k in changed if ".experts." in k} == {
        k for k in before if ".experts.1." in k or ".experts.2." in k
    }  # both owners' slots refined; the public expert and every other tensor as they were
    assert {k for k in changed if ".experts." not in k} == {
        k for k in before if k.endswith("mlp.gate.weight")
    }

    table = json.loads((out / SLOTS_FILE).read_text())
    record = table["federation"]
    assert [(v["version"], v["phase"]) for v in record["router_versions"]] == [
        (0, "merge"), (1, "slots"), (2, "router"),
    ]  # fmt: skip
    assert record["current_slots"] == {"upper": 1, "again": 1}
    (round_,) = record["rounds"]
    assert round_["participants"] == {"slot": ["again", "upper"], "router": ["again", "upper"]}
    assert round_["bytes_sent"]["upper"] > 0 and not round_["secure_aggregation"]
    upper = next(s for s in table["slots"] if s["name"] == "upper")
    assert upper["manifest"]["training"]["hyperparameters"]["federated_round"] == 1
    versions = out / VERSIONS_DIR
    assert {p.name for p in (versions / "slots").iterdir()} == {
        "upper-v0", "upper-v1", "again-v0", "again-v1",
    }  # fmt: skip
    rows = load_file(versions / "router-v2.safetensors")["rows"]
    assert torch.equal(rows[0], after["model.layers.0.mlp.gate.weight"].float())


def test_secure_aggregation_gives_the_coordinator_only_the_average(
    merged: Path, corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under SecAgg+ the coordinator never takes one owner's change, of the rows or the trunk:
    it receives the token-weighted average (equal to the plain one up to SecAgg+'s
    quantization)."""
    texts = _texts(corpus_dir)
    plan = RoundPlan(rounds=1, phases=("router", "trunk"), slot=CFG, router=CFG, trunk=CFG)
    plain = Coordinator(MergedModel.open(merged), tmp_path / "plain")
    simulate(plain, texts, plan, device=CPU, cache_dir=None)

    def refuse(*args: object) -> None:
        raise AssertionError("the coordinator took the owners' separate updates")

    monkeypatch.setattr(Coordinator, "take_changes", refuse)
    secure = Coordinator(MergedModel.open(merged), tmp_path / "secure")
    simulate(secure, texts, replace(plan, secagg=True), device=CPU, cache_dir=None)
    start = plain._rows(0)
    average = secure.state.rows - start
    assert (average - (plain.state.rows - start)).abs().max() < 1e-4
    assert average.abs().max() > 1e-3
    key = "model.layers.1.self_attn.o_proj.weight"
    stored = plain.sources[key].load().float()
    trunk = secure.state.trunk[key] - stored
    assert (trunk - (plain.state.trunk[key] - stored)).abs().max() < 1e-4
    assert trunk.abs().max() > 1e-3
    for text in texts:  # no saved state is one owner's update
        task = plain.task("router", 1, CFG)
        state = type(plain.state)(rows=start, slots={})
        own, _ = router_update(plain.merged, state, task, text, device=CPU, cache_dir=None)
        assert (own - secure._rows(1) + start).abs().max() > 1e-3
    assert secure.record.rounds[0].secure_aggregation


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flexmoe", *args], capture_output=True, text=True, timeout=300
    )


def test_fed_simulate_refuses_bad_input_in_one_line(
    merged: Path,
    anchor_dir: Path,
    corpus_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Each refusal is one line, exit code 2, nothing written (run in this process, as
    test_hostile's are; one by a separate process, as a user runs it)."""
    from test_hostile import _refused

    from flexmoe.merge.standing import StandingStore

    data = str(corpus_dir / "other.jsonl")
    out = tmp_path / "out"
    cases = [
        ((str(merged), "--data", f"nobody={data}"), "nobody: no such expert in this model"),
        ((str(merged), "--data", "upper=missing.jsonl"), "missing.jsonl: file not found"),
        ((str(anchor_dir), "--data", f"upper={data}"), "not a merged model"),
        ((str(merged), "--data", f"upper={data}", "--rounds", "0"), "--rounds: must be"),
        ((str(merged), "--data", f"upper={data}", "--recipe", "slot,dense"), "--recipe"),
        (
            (str(merged), "--data", f"upper={data}", "--signing-key", f"again={data}"),
            "--signing-key",
        ),
    ]
    for args, message in cases:
        line = _refused(["fed", "simulate", *args, "--out", str(out), "--device", "cpu"], capsys)
        assert message in line
    assert not out.exists()

    import shutil

    model = tmp_path / "model"
    shutil.copytree(merged, model)
    with StandingStore(model) as store:
        store.set("upper", opted_out=True)
    done = _cli("fed", "simulate", str(model), "--data", f"upper={data}", "--out", str(out))
    assert done.returncode == 2
    assert "upper: has opted out of this model" in done.stderr
    with pytest.raises(FlexMoEError, match="new directory"):
        from flexmoe.federated.run import federate

        plan = RoundPlan(rounds=1, phases=("router",), slot=CFG, router=CFG)
        federate(model, _texts(corpus_dir), plan, model, device=CPU, cache_dir=None)


def _inline(coordinator: Coordinator, texts: list[OwnerText], plan: RoundPlan, *,
            device: torch.device, cache_dir: Path | None, log: object, debug: bool) -> None:  # fmt: skip
    """The rounds without Flower, each owner's work called here (the first test shows that
    the simulation gives the same)."""
    work = coordinator.work / "owners"
    first = coordinator.first_round
    for number in range(first, first + plan.rounds):
        for kind in plan.phases:
            task = coordinator.task(kind, number, plan.cfg(kind))
            if kind == "slot":
                packages = {t.name: work / f"{number}-{t.name}" for t in texts}
                for t in texts:
                    slot_update(coordinator.merged, coordinator.state, task, t,
                                packages[t.name], device=device, cache_dir=cache_dir)  # fmt: skip
                coordinator.take_slots(number, packages)
            else:
                update = trunk_update if kind == "trunk" else router_update
                updates = {}
                for t in texts:
                    change, result = update(
                        coordinator.merged,
                        coordinator.state,
                        task,
                        t,
                        device=device,
                        cache_dir=cache_dir,
                    )
                    changes = change if isinstance(change, dict) else {ROWS: change}
                    updates[t.name] = (changes, result.tokens)
                coordinator.take_changes(number, kind, updates)


def test_an_opt_out_reverts_to_versions_it_never_shaped_and_a_round_rebuilds_them_exactly(
    merged: Path, corpus_dir: Path, tmp_path: Path
) -> None:
    """Rounds of slot, router and trunk phases (FedAdam on the trunk). Rounds 1 and 2 without
    ``again`` (opted out) are the reference. Round 1 without it, ``again`` opting in for round 2
    and out again: the weights go back to round 1's, bit for bit; round 2 rebuilt without it
    gives the reference's weights, bit for bit (the server optimiser's state included)."""
    import shutil

    from flexmoe.cli.coordinator import members_opt_in, members_opt_out
    from flexmoe.federated.run import federate
    from flexmoe.federated.server import ServerOptimizer, ServerOptimizerName

    upper, again = _texts(corpus_dir)
    adam = ServerOptimizer(ServerOptimizerName.FEDADAM, lr=1e-2)
    phases = ("slot", "router", "trunk")
    plan = RoundPlan(rounds=1, phases=phases, slot=CFG, router=CFG, trunk=CFG, server=adam)
    start = tmp_path / "start"
    shutil.copytree(merged, start)
    members_opt_out(start, "again")
    assert not (start / VERSIONS_DIR).exists()  # nothing federated yet: only the standing

    def run(model: Path, out: Path, texts: list[OwnerText], rounds: int = 1) -> Path:
        federate(model, texts, replace(plan, rounds=rounds), out, device=CPU, cache_dir=None,
                 progress=False, runner=_inline)  # fmt: skip
        return out

    reference = run(start, tmp_path / "reference", [upper], rounds=2)
    first = run(start, tmp_path / "first", [upper])
    members_opt_in(first, "again")
    second = run(first, tmp_path / "second", [upper, again])
    shaped = json.loads((second / SLOTS_FILE).read_text())["federation"]
    assert "again" in shaped["router_versions"][-1]["shaped_by"]
    assert "again" not in shaped["router_versions"][3]["shaped_by"]
    assert "again" in shaped["trunk_versions"][2]["shaped_by"]

    members_opt_out(second, "again")  # back to round 1's versions, in place
    table = json.loads((second / SLOTS_FILE).read_text())["federation"]
    assert table["current_router"] == 3 and table["current_slots"] == {"upper": 1, "again": 0}
    assert table["current_trunk"] == 1
    assert _same_weights(second, first)
    listed = _cli("members", "list", str(second))
    assert "router version 3 (round 1, depends on upper)" in listed.stdout
    assert "trunk version 1 (round 1, depends on upper)" in listed.stdout

    rebuilt = run(second, tmp_path / "rebuilt", [upper])
    assert _same_weights(rebuilt, reference)
    with pytest.raises(FlexMoEError, match="--trunk-embeddings differs"):  # the model's: output
        federate(rebuilt, [upper], replace(plan, trunk_embeddings="none"), tmp_path / "other",
                 device=CPU, cache_dir=None, progress=False, runner=_inline)  # fmt: skip
    assert not _same_weights(rebuilt, first)

    from flexmoe.merge.edit import remove_expert

    with pytest.raises(FlexMoEError, match="federated rounds changed this model"):
        remove_expert(rebuilt, "upper", out=tmp_path / "removed")  # its versions would lie


def _same_weights(a: Path, b: Path) -> bool:
    left, right = read_state_dict(a), read_state_dict(b)
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def test_an_owner_that_drops_out_leaves_the_round_to_the_others(
    merged: Path, corpus_dir: Path, tmp_path: Path
) -> None:
    """An owner whose client fails mid-round (here: its text is too short to train on) is
    left out of that round; when every owner fails, the command says so in one line and
    writes nothing."""
    from helpers import write_jsonl

    short = write_jsonl(tmp_path / "short.jsonl", ["too short"])
    upper, _ = _texts(corpus_dir)
    broken = OwnerText("again", (DataSpec("again", (str(short),)),))
    plan = RoundPlan(rounds=1, phases=("slot", "router"), slot=CFG, router=CFG)
    coordinator = Coordinator(MergedModel.open(merged), tmp_path / "work")
    lines: list[str] = []
    simulate(coordinator, [upper, broken], plan, device=CPU, cache_dir=None, log=lines.append)
    (round_,) = coordinator.record.rounds
    assert round_.participants == {"slot": ["upper"], "router": ["upper"]}
    assert round_.failures == {"slot": 1, "router": 1}
    assert coordinator.record.current_slots == {"upper": 1, "again": 0}
    assert any("1 owners, 1 failed" in line for line in lines)
    assert any("an owner failed: " in line and "shorter than one" in line for line in lines)

    out = tmp_path / "out"
    done = _cli("fed", "simulate", str(merged), "--data", f"again={short}", "--out", str(out),
                "--rounds", "1", "--slot-steps", "1", "--router-steps", "1", "--batch-size", "2",
                "--seq-len", "32", "--device", "cpu")  # fmt: skip
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("flexmoe: error: ") and "every owner failed" in line
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_the_fedavg_baseline_trains_the_dense_anchor_on_flower(
    anchor_dir: Path, corpus_dir: Path, tmp_path: Path
) -> None:
    from flexmoe.federated.dense import RECORD_FILE
    from flexmoe.federated.run import fedavg
    from flexmoe.inference.selection import load_selected

    plan = RoundPlan(rounds=2, phases=("dense",), slot=CFG, router=CFG, dense=CFG)
    out = fedavg(anchor_dir, _texts(corpus_dir), plan, tmp_path / "fedavg", device=CPU,
                 cache_dir=None)  # fmt: skip
    before, after = read_state_dict(anchor_dir), read_state_dict(out)
    trained = [k for k in after if not torch.equal(before[k], after[k])]
    assert len(trained) == len(after)  # every parameter (the embeddings are tied or not)
    record = json.loads((out / RECORD_FILE).read_text())
    assert [r["round"] for r in record["rounds"]] == [1, 2]
    floats = sum(v.numel() for v in load_selected(out).parameters()) * 4
    assert record["rounds"][0]["bytes_sent"] == {"again": floats, "upper": floats}
    listed = _cli("eval", "baselines", "--help")
    assert "fedavg" in listed.stdout and "flexmoe:federated" in listed.stdout


def test_the_dense_baseline_takes_the_trunk_recipe(
    anchor_dir: Path, corpus_dir: Path, tmp_path: Path
) -> None:
    """With FedAdam on the coordinator (the merged model's trunk recipe, on the dense model),
    the first server step moves every parameter whose averaged change is not zero by the server
    lr (Adam's first step is lr times the change's sign)."""
    from flexmoe.federated.dense import RECORD_FILE
    from flexmoe.federated.run import fedavg
    from flexmoe.federated.server import ServerOptimizer, ServerOptimizerName

    adam = ServerOptimizer(ServerOptimizerName.FEDADAM, lr=1e-2, tau=1e-12)
    plan = RoundPlan(rounds=1, phases=("dense",), slot=CFG, router=CFG, dense=replace(CFG, lr=0.1))
    texts = _texts(corpus_dir)
    out = fedavg(
        anchor_dir,
        texts,
        plan,
        tmp_path / "dense",
        device=CPU,
        cache_dir=None,
        server=adam,
        local_sgd=True,
    )
    before, after = read_state_dict(anchor_dir), read_state_dict(out)
    moved = torch.cat([(after[k].float() - before[k].float()).flatten() for k in after]).abs()
    assert moved.max().item() == pytest.approx(1e-2, rel=1e-3)
    assert (moved > 0.99e-2).float().mean().item() > 0.5
    record = json.loads((out / RECORD_FILE).read_text())["hyperparameters"]
    assert record["server_optimizer"] == "fedadam" and record["local_optimizer"] == "sgd"


ROUND = tuple(
    "--rounds 1 --recipe slot,router,trunk --slot-steps 2 --router-steps 2 --trunk-steps 2 "
    "--server-optimizer fedadam --server-lr 0.01 --batch-size 4 --seq-len 32".split()
)


def _flexmoe(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "flexmoe", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _certificates(root: Path) -> tuple[Path, Path, Path]:
    """A CA and a certificate it signs for 127.0.0.1 (with its key), as PEM files."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(1)
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    import ipaddress

    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(2)
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    paths = root / "ca.pem", root / "server.pem", root / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


def test_a_deployment_over_loopback_equals_the_simulation(
    merged: Path, corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fed serve` (SuperLink + ServerApp) and two `fed join` (SuperNodes) as separate processes
    over loopback, with TLS and each owner's node key registered, write the same weights, bit for
    bit, as `fed simulate`, for a round of slot, router and trunk phases with FedAdam on the
    trunk; a node whose key the coordinator did not register is refused in one line; each
    owner's process leaves by itself after the last phase (--once); no Flower process is left
    behind. (The reference is `fed simulate`'s plan and texts with each owner's work called in
    this process, which the first test shows equal to Flower's simulation.)"""
    import flexmoe.federated.run as run_module
    from flexmoe.cli import main
    from flexmoe.federated.deploy import free_port
    from flexmoe.federated.nodes import generate_node_key

    public, other = str(corpus_dir / "public.jsonl"), str(corpus_dir / "other.jsonl")
    address = f"127.0.0.1:{free_port()}"
    ca, cert, key = _certificates(tmp_path)
    names = ("upper", "again", "stranger")
    keys = {n: tmp_path / f"{n}.key" for n in names}
    registered = [f"--node-key={n}={generate_node_key(keys[n])}" for n in names[:2]]
    generate_node_key(keys["stranger"])
    serve = _flexmoe(
        *("fed", "serve", str(merged), "--out", str(tmp_path / "deployed"), "--listen", address),
        *("--wait", "120", "--ca", str(ca), "--cert", str(cert), "--cert-key", str(key)),
        *registered,
        *ROUND,
    )
    joining = ("--public-data", public, "--coordinator", address, "--ca", str(ca), "--once")
    owners = [
        _flexmoe(
            *("fed", "join", str(merged), "--data", f"{name}={data}", *joining),
            *("--node-key", str(keys[node]), "--device", "cpu"),
        )
        for name, data, node in (
            ("upper", other, "upper"),
            ("again", public, "again"),
            ("upper", other, "stranger"),
        )
    ]
    try:
        served = serve.communicate(timeout=400)
        joined = [o.communicate(timeout=60) for o in owners]
    finally:
        for process in (serve, *owners):
            process.kill()
    stranger = owners.pop()
    assert stranger.returncode == 2
    assert joined.pop()[1].strip().splitlines()[-1] == (
        "flexmoe: error: fed join: the coordinator refused this node: Failed to activate "
        "SuperNode. (is this --node-key's .pub registered there?)"
    )
    assert serve.returncode == 0, served[1]
    assert "1 federated rounds (slot,router,trunk) with 2 owners" in served[0]
    assert f"coordinator on {address} (TLS)" in served[1]
    assert "round 1 (1/1) trunk: 2 owners" in served[1]
    for process, (_, err) in zip(owners, joined, strict=True):
        assert process.returncode == 0, err
        assert "round 1 slot: trained on" in err and "rounds are over; leaving" in err
    real = run_module.federate
    monkeypatch.setattr(
        run_module, "federate", lambda *a, **kw: real(*a, **{**kw, "runner": _inline})
    )
    simulate = ["fed", "simulate", str(merged), "--data", f"upper={other}", "--data"]
    simulate += [f"again={public}", "--public-data", public, "--out", str(tmp_path / "simulated")]
    with pytest.raises(SystemExit) as done:
        main([*simulate, "--device", "cpu", *ROUND])
    assert done.value.code in (0, None)
    deployed, simulated, before = (
        read_state_dict(p) for p in (tmp_path / "deployed", tmp_path / "simulated", merged)
    )
    assert all(torch.equal(deployed[k], simulated[k]) for k in simulated)
    assert any(not torch.equal(deployed[k], before[k]) for k in before)
    record = json.loads((tmp_path / "deployed" / SLOTS_FILE).read_text())["federation"]
    assert record["rounds"][0]["participants"] == {
        "slot": ["again", "upper"], "router": ["again", "upper"], "trunk": ["again", "upper"],
    }  # fmt: skip
    assert record["trunk_versions"][1]["optimizer"]["name"] == "fedadam"
    assert not list(tmp_path.glob(".deployed.*"))  # the coordinator's state went with it
    assert not _running(address)  # no SuperLink or SuperNode left behind


def _running(needle: str) -> list[str]:
    """Command lines of the processes that hold ``needle`` (Linux's /proc)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            line = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in line and "pytest" not in line:
            found.append(line)
    return found


def test_fed_serve_and_join_fail_in_one_line(
    merged: Path, corpus_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No owner joins within --wait: one line, nothing written; `fed join` checks its owner
    and files before it connects; an owner whose copy of the model differs is refused."""
    from test_hostile import _refused

    from flexmoe.federated.deploy import free_port, join
    from flexmoe.federated.messages import MODEL_KEY, check_model

    out = tmp_path / "out"
    address = f"127.0.0.1:{free_port()}"
    done = _cli("fed", "serve", str(merged), "--out", str(out), "--listen", address,
                "--wait", "2", *ROUND)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "flexmoe: error: round: round 1: no owner is connected"
    )
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
    data = str(corpus_dir / "other.jsonl")
    found = _refused(
        ["fed", "join", str(merged), "--coordinator", address, "--data", f"nobody={data}"], capsys
    )
    assert found == "flexmoe: error: nobody: no such expert in this model (experts: upper, again)"
    (upper, _) = _texts(corpus_dir)
    missing = replace(upper, data=(DataSpec("upper", ("missing.jsonl",)),))
    for text, where, message in (
        (missing, address, "missing.jsonl: file not found"),
        (upper, "nowhere", "--coordinator: expected HOST:PORT"),
        (upper, "127.0.0.1:0", "--coordinator: expected HOST:PORT"),
    ):
        with pytest.raises(FlexMoEError, match=message):
            join(merged, text, where, device=CPU, cache_dir=None)
    check_model({MODEL_KEY: MergedModel.open(merged).fingerprint()}, MergedModel.open(merged))
    with pytest.raises(FlexMoEError, match="differs from the coordinator's"):
        check_model({MODEL_KEY: "0" * 64}, MergedModel.open(merged))


def test_update_privacy_clips_and_noises_each_update_and_records_the_epsilon(
    merged: Path, corpus_dir: Path, tmp_path: Path
) -> None:
    """--dp-owner-epsilon: each owner's router change leaves clipped to the norm and noised
    with the accountant's multiplier; the model records every owner's epsilon; slot phases
    refuse it."""
    from flexmoe.federated.privacy import UpdatePrivacy, privatize

    change = {"a": torch.full((10,), 3.0), "b": torch.full((6,), 4.0)}
    clipped, norm = privatize(change, clip=1.0, noise_multiplier=0.0)
    assert norm == pytest.approx((90 + 96) ** 0.5)
    total = sum(float(t.pow(2).sum()) for t in clipped.values()) ** 0.5
    assert total == pytest.approx(1.0)
    first, _ = privatize(change, clip=1.0, noise_multiplier=1.0)
    second, _ = privatize(change, clip=1.0, noise_multiplier=1.0)
    assert not torch.equal(first["a"], second["a"])  # fresh noise, not a seed anyone knows

    clip = {"router": 1e-3, "trunk": 1e-3}
    privacy = UpdatePrivacy.for_budget(1.0, 2, clip=clip)
    with pytest.raises(FlexMoEError, match="--dp-owner-epsilon: only router and trunk phases"):
        RoundPlan(rounds=1, phases=("slot", "router"), slot=CFG, router=CFG, privacy=privacy)
    phases = ("router", "trunk")
    plan = RoundPlan(rounds=1, phases=phases, slot=CFG, router=CFG, trunk=CFG, privacy=privacy)
    coordinator = Coordinator(MergedModel.open(merged), tmp_path / "work")
    before = coordinator.state.rows.clone()
    simulate(coordinator, _texts(corpus_dir), plan, device=CPU, cache_dir=None)
    # each phase: the token-weighted average of two owners' noise, sigma * clip / sqrt(2) per
    # value; the rows took two such averages, the trunk one
    sigma = privacy.noise_multiplier * 1e-3 / 2**0.5
    noise = (coordinator.state.rows - before).norm().item()
    assert 0.8 < noise / (sigma * (2 * before.numel()) ** 0.5) < 1.2
    key = "model.layers.1.self_attn.o_proj.weight"
    trunk = coordinator.state.trunk[key] - coordinator.sources[key].load().float()
    assert 0.8 < trunk.norm().item() / (sigma * trunk.numel() ** 0.5) < 1.2
    record = coordinator.record
    assert record.epsilon == {
        "again": pytest.approx(1.0, abs=0.01),
        "upper": pytest.approx(1.0, abs=0.01),
    }
    assert record.delta == 1e-5
    (entry,) = record.rounds
    assert entry.privacy is not None and entry.privacy.clip == clip


def test_a_trunk_phase_trains_what_every_owner_shares_through_the_server_optimiser(
    merged: Path, corpus_dir: Path, tmp_path: Path
) -> None:
    """A trunk phase changes attention, norms, the public expert, the output layer (by default)
    and the router rows, never an owner's expert or the input embeddings; the server optimiser's state travels with the version, so
    two rounds in one run equal one round and then another from the written model."""
    from flexmoe.federated.run import federate
    from flexmoe.federated.server import ServerOptimizer, ServerOptimizerName

    adam = ServerOptimizer(ServerOptimizerName.FEDADAM, lr=1e-2)
    plan = RoundPlan(rounds=2, phases=("trunk",), slot=CFG, router=CFG, trunk=CFG, server=adam)

    def run(model: Path, out: Path, rounds: int) -> Path:
        texts, plan_ = _texts(corpus_dir), replace(plan, rounds=rounds)
        federate(model, texts, plan_, out, device=CPU, cache_dir=None, runner=_inline)
        return out

    two = run(merged, tmp_path / "two", 2)
    one = run(merged, tmp_path / "one", 1)
    assert _same_weights(run(one, tmp_path / "one-more", 1), two)
    before, after = read_state_dict(merged), read_state_dict(two)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    shared = (".self_attn.", "norm", ".experts.0.", "mlp.gate.weight", "lm_head.")
    assert changed == {k for k in before if any(part in k for part in shared)}
    record = json.loads((two / SLOTS_FILE).read_text())["federation"]
    trunk = record["trunk_versions"]
    expected = [(0, 0, None), (1, 1, 0), (2, 2, 1)]
    assert [(v["version"], v["round"], v["parent"]) for v in trunk] == expected
    assert record["current_trunk"] == 2 and trunk[2]["optimizer"]["step"] == 2
    assert trunk[2]["shaped_by"] == ["again", "upper"]
    assert trunk[1]["file"] is None  # superseded by version 2, shaped by the same owners
    assert [v["phase"] for v in record["router_versions"]] == ["merge", "trunk", "trunk"]
    stored = load_file(two / VERSIONS_DIR / trunk[2]["file"])
    key = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(stored[f"trunk.{key}"], after[key].float())
    assert f"m.{key}" in stored and "v.rows" in stored
