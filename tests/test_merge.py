"""Merging packages into one FlexOlmo checkpoint: plan, streaming build, compatibility."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from flexmoe.anchor import load_anchor
from flexmoe.data.documents import DataSpec
from flexmoe.errors import FlexMoEError
from flexmoe.expert.package import load_package
from flexmoe.expert.spec import ExpertIdentity, ExpertSpec
from flexmoe.expert.specialist import build_specialist
from flexmoe.merge.build import build_merged
from flexmoe.merge.layout import SLOTS_FILE, load_merged
from flexmoe.merge.plan import format_plan, plan_merge

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def packages(
    tmp_path_factory: pytest.TempPathFactory, anchor_dir: Path, corpus_dir: Path
) -> list[Path]:
    from helpers import train_packages

    return train_packages(tmp_path_factory.mktemp("packages"), anchor_dir, corpus_dir)


@pytest.fixture(scope="module")
def merged(
    tmp_path_factory: pytest.TempPathFactory, anchor_dir: Path, packages: list[Path]
) -> Path:
    out = tmp_path_factory.mktemp("merged") / "model"
    build_merged(
        plan_merge(anchor_dir, packages, top_k=2), out, max_shard_bytes=200_000, progress=False
    )
    return out


def test_merged_checkpoint_is_transformers_flexolmo(merged: Path) -> None:
    config = json.loads((merged / "config.json").read_text())
    assert config["model_type"] == "flex_olmo" and config["architectures"] == [
        "FlexOlmoForCausalLM"
    ]
    assert config["num_experts"] == 3 and config["num_experts_per_tok"] == 2
    index = json.loads((merged / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded
    theirs = AutoModelForCausalLM.from_pretrained(merged).eval()
    ours = load_merged(merged, use_bias=False)
    ids = torch.randint(2, config["vocab_size"], (2, 16))
    with torch.no_grad():
        assert (theirs(ids).logits - ours(ids).logits).abs().max().item() <= 1e-5


def test_slot_table(merged: Path, packages: list[Path], anchor_dir: Path) -> None:
    table = json.loads((merged / SLOTS_FILE).read_text())
    assert [s["name"] for s in table["slots"]] == ["public", "upper", "again"]
    assert table["anchor_fingerprint"] == load_anchor(anchor_dir).manifest.fingerprint
    assert table["slots"][1]["owner"] == "upper org" and table["slots"][1]["license"] == "MIT"
    assert (
        all(b <= 0 for s in table["slots"] for b in s["bias"])
        and len(table["slots"][2]["bias"]) == 2
    )
    assert table["slots"][1]["manifest"]["name"] == "upper"


def test_one_expert_merge_equals_the_specialist(
    anchor_dir: Path, packages: list[Path], tmp_path: Path
) -> None:
    build_merged(plan_merge(anchor_dir, packages[:1], top_k=2), tmp_path / "m", progress=False)
    anchor = load_anchor(anchor_dir)
    specialist = build_specialist(anchor, load_package(packages[0], anchor))
    ids = torch.randint(2, 400, (2, 16))
    with torch.no_grad():
        assert (
            load_merged(tmp_path / "m", use_bias=True)(ids).logits - specialist(ids).logits
        ).abs().max().item() <= 1e-5


def test_plan_and_refusals(anchor_dir: Path, packages: list[Path], merged: Path) -> None:
    text = format_plan(plan_merge(anchor_dir, packages, top_k=3))
    assert "upper org" in text and "3 experts, top-3 routing" in text
    with pytest.raises(FlexMoEError, match="already taken"):
        plan_merge(anchor_dir, [packages[0], packages[0]], top_k=2)
    with pytest.raises(FlexMoEError, match="between 1 and 3"):
        plan_merge(anchor_dir, packages, top_k=4)
    with pytest.raises(FlexMoEError, match="already exists"):
        build_merged(plan_merge(anchor_dir, packages, top_k=2), merged, progress=False)


def test_cli_dry_run_writes_nothing(anchor_dir: Path, packages: list[Path], tmp_path: Path) -> None:
    args = [
        sys.executable,
        "-m",
        "flexmoe",
        "merge",
        "--anchor",
        str(anchor_dir),
        "--out",
        str(tmp_path / "m"),
        "--dry-run",
    ]
    for p in packages:
        args += ["--expert", str(p)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "slot" in result.stdout and "again org" in result.stdout
    assert not (tmp_path / "m").exists()


def test_selection_masks(merged: Path) -> None:
    from flexmoe.inference.selection import Selection
    from flexmoe.merge.layout import read_slots

    slots = read_slots(merged)
    assert Selection(exclude=frozenset({"upper"})).mask(slots).tolist() == [True, False, True]
    assert Selection(exclude=frozenset({"again org"})).mask(slots).tolist() == [True, True, False]
    assert Selection(include=frozenset({"upper"})).mask(slots).tolist() == [True, True, False]
    assert Selection(licenses=frozenset({"MIT"})).mask(slots).tolist() == [True, True, True]
    with pytest.raises(FlexMoEError, match="unknown expert or owner: nobody"):
        Selection(exclude=frozenset({"nobody"})).mask(slots)


def test_excluding_equals_a_model_merged_without(
    anchor_dir: Path, packages: list[Path], merged: Path, tmp_path: Path
) -> None:
    from flexmoe.inference.selection import set_expert_mask

    build_merged(
        plan_merge(anchor_dir, packages[:1], top_k=2), tmp_path / "without", progress=False
    )
    full, without = (
        load_merged(merged, use_bias=True),
        load_merged(tmp_path / "without", use_bias=True),
    )
    ids = torch.randint(2, 400, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[True, True, True], [True, True, False]])  # row 1 opts "again" out
    set_expert_mask(full, mask)
    with torch.no_grad():
        mixed, alone = full(ids).logits, without(ids).logits
    set_expert_mask(full, None)
    with torch.no_grad():
        everyone = full(ids).logits
    assert (mixed[1] - alone[1]).abs().max().item() <= 1e-5
    assert (mixed[0] - everyone[0]).abs().max().item() <= 1e-5


def test_generation_attribution_and_opt_out(merged: Path) -> None:
    from flexmoe.data.tokenizer import load_tokenizer
    from flexmoe.inference.generate import generate
    from flexmoe.inference.selection import Selection
    from flexmoe.merge.layout import read_slots

    slots, tok, model = (
        read_slots(merged),
        load_tokenizer(merged),
        load_merged(merged, use_bias=True),
    )
    both = generate(model, tok, "the union", slots=slots, max_new_tokens=6, seed=1, per_token=True)
    assert both.new_tokens == 6 and both.prompt_tokens == 3
    assert sum(both.prompt_shares.values()) == pytest.approx(1.0)
    assert sum(both.generated_shares.values()) == pytest.approx(1.0)
    assert (
        both.per_token is not None
        and len(both.per_token) == both.prompt_tokens + both.new_tokens - 1
    )
    out = generate(
        model,
        tok,
        "the union",
        slots=slots,
        max_new_tokens=6,
        seed=1,
        selection=Selection(exclude=frozenset({"upper"})),
    )
    assert out.prompt_shares["upper"] == 0.0 and out.generated_shares["upper"] == 0.0
    assert both.prompt_shares["upper"] > 0.0
    # the next call without the exclusion uses the expert again: no reload, no leftover mask
    again = generate(model, tok, "the union", slots=slots, max_new_tokens=6, seed=1, per_token=True)
    assert again.text == both.text and again.prompt_shares == both.prompt_shares


def test_cli_generate(merged: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "flexmoe", "generate", str(merged), "the union", "--attribution",
         "--max-new-tokens", "5", "--exclude", "again", "--device", "cpu"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("the union")
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("again"))
    assert line.split()[-2:] == ["0.0%", "0.0%"]


def test_standing_choice_is_durable_audited_and_honoured(merged: Path, tmp_path: Path) -> None:
    import shutil
    import sqlite3

    from flexmoe.merge.layout import STANDING_FILE as DB_FILE
    from flexmoe.merge.standing import StandingStore, standing_exclusions

    model = tmp_path / "model"
    shutil.copytree(merged, model)
    cli = [sys.executable, "-m", "flexmoe"]
    out = subprocess.run(
        [*cli, "members", "opt-out", str(model), "upper", "--reason", "consent withdrawn"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert standing_exclusions(model) == frozenset({"upper"})
    listed = subprocess.run(
        [*cli, "members", "list", str(model)], capture_output=True, text=True, timeout=120
    ).stdout
    assert any(
        ln.split()[1] == "upper" and " out " in ln and "consent withdrawn" in ln
        for ln in listed.splitlines()
    )
    gen = subprocess.run(
        [
            *cli,
            "generate",
            str(model),
            "the union",
            "--attribution",
            "--max-new-tokens",
            "3",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    upper = next(ln for ln in gen.stdout.splitlines() if ln.startswith("upper"))
    assert upper.split()[-2:] == ["0.0%", "0.0%"]  # honoured with no flag given
    store = StandingStore(model)
    store.set("upper", opted_out=False, actor="test")
    assert store.opted_out() == frozenset()
    assert [(a[1], a[2]) for a in store.audit()] == [("upper", "opt-out"), ("upper", "opt-in")]
    with pytest.raises(FlexMoEError, match="always active"):
        store.set("public", opted_out=True)
    with pytest.raises(FlexMoEError, match="no such expert"):
        store.set("nobody", opted_out=True)
    store.close()
    db = sqlite3.connect(model / DB_FILE)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("DELETE FROM audit")


def _state(model_dir: Path) -> dict[str, torch.Tensor]:
    from flexmoe.model.checkpoint import read_state_dict

    return read_state_dict(model_dir)


def _same_model(a: Path, b: Path) -> None:
    sa, sb = _state(a), _state(b)
    assert sorted(sa) == sorted(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    ta, tb = (json.loads((d / SLOTS_FILE).read_text()) for d in (a, b))
    for slot in (*ta["slots"], *tb["slots"]):
        slot.pop("package_sha256") if slot["manifest"] is None else None
    assert ta == tb
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (a, b))
    assert ca == cb


def test_merge_add_and_remove_equal_a_fresh_merge(
    anchor_dir: Path, packages: list[Path], merged: Path, tmp_path: Path
) -> None:
    from flexmoe.merge.edit import add_expert, remove_expert
    from flexmoe.merge.standing import StandingStore, standing_exclusions

    one, alone = tmp_path / "one", tmp_path / "again-only"
    build_merged(plan_merge(anchor_dir, packages[:1], top_k=2), one, progress=False)
    build_merged(plan_merge(anchor_dir, packages[1:], top_k=2), alone, progress=False)
    store = StandingStore(one)
    store.set("upper", opted_out=True, reason="paused")
    store.close()
    add_expert(one, packages[1], progress=False)  # in place
    _same_model(one, merged)
    assert standing_exclusions(one) == frozenset({"upper"})  # the owners' choice travels along
    # removing slot 1 moves "again" down to slot 1; equals merging "again" alone
    remove_expert(one, "upper", out=tmp_path / "removed", progress=False)
    _same_model(tmp_path / "removed", alone)
    assert standing_exclusions(tmp_path / "removed") == frozenset()
    assert [a[2] for a in StandingStore(tmp_path / "removed").audit()] == ["opt-out"]
    with pytest.raises(FlexMoEError, match="already in this model"):
        add_expert(one, packages[1], progress=False)
    with pytest.raises(FlexMoEError, match="no such expert"):
        remove_expert(one, "nobody", progress=False)
    with pytest.raises(FlexMoEError, match="public expert cannot be removed"):
        remove_expert(one, "public", progress=False)
    with pytest.warns(UserWarning, match="top-k lowered to 1"):
        remove_expert(tmp_path / "removed", "again", progress=False)
    assert json.loads((tmp_path / "removed" / "config.json").read_text())["num_experts"] == 1


def test_merge_add_reads_no_other_package(
    anchor_dir: Path, packages: list[Path], tmp_path: Path
) -> None:
    import shutil

    from flexmoe.merge.edit import add_expert

    gone = tmp_path / "gone"
    shutil.copytree(packages[0], gone)
    build_merged(plan_merge(anchor_dir, [gone], top_k=2), tmp_path / "m", progress=False)
    shutil.rmtree(gone)  # the first owner's package is no longer anywhere
    shutil.move(str(anchor_dir), str(tmp_path / "anchor-away"))  # nor is the anchor
    try:
        add_expert(tmp_path / "m", packages[1], progress=False)
    finally:
        shutil.move(str(tmp_path / "anchor-away"), str(anchor_dir))
    from flexmoe.merge.layout import read_slots

    assert [s.name for s in read_slots(tmp_path / "m")] == ["public", "upper", "again"]


def test_opt_out_during_a_rewrite_lands_in_the_new_model(merged: Path, tmp_path: Path) -> None:
    import shutil
    import threading
    import time

    from flexmoe.merge.layout import MergedModel
    from flexmoe.merge.standing import StandingStore, standing_exclusions

    model = tmp_path / "model"
    shutil.copytree(merged, model)
    StandingStore(model).close()
    errors: list[BaseException] = []
    layout = MergedModel(model)
    table = layout.table()
    config, sources = layout.config(table), layout.sources()

    def owner() -> None:
        try:
            store = StandingStore(model)  # opened on the directory about to be replaced
            store.set("upper", opted_out=True, reason="now")
            store.close()
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    thread = threading.Thread(target=owner)
    first = sources[0]

    def load_late() -> torch.Tensor:  # runs while the edit holds the stores' locks
        thread.start()
        time.sleep(0.5)  # the owner's change is waiting for the lock meanwhile
        return first.load()

    slow = [type(first)(first.name, first.shape, first.dtype, load_late), *sources[1:]]
    layout.write(model, sources=slow, config=config, table=table, progress=False)
    thread.join(timeout=60)
    assert not errors and standing_exclusions(model) == frozenset({"upper"})


def test_selection_refusals(merged: Path) -> None:
    from flexmoe.inference.selection import Selection
    from flexmoe.merge.layout import read_slots

    slots = read_slots(merged)
    with pytest.raises(FlexMoEError, match="excludes every owner's expert"):
        Selection(exclude=frozenset({"upper", "again"})).mask(slots)
    with pytest.raises(FlexMoEError, match="excludes every owner's expert"):
        Selection(licenses=frozenset({"Apache-2.0"})).mask(slots)
    with pytest.raises(FlexMoEError, match="public expert 'public' is always active"):
        Selection(exclude=frozenset({"public"})).mask(slots)
    # the owners' opt-outs alone may leave only the public expert: that is their right
    everyone_out = Selection(opted_out=frozenset({"upper", "again"}))
    assert everyone_out.mask(slots).tolist() == [True, False, False]


def test_excluding_an_owner_leaves_out_its_experts_and_never_the_public_one() -> None:
    """By owner: an owner's every expert goes; the coordinator's rivals go and its public expert
    stays (always active), which excluding by the public expert's name says in one line."""
    from flexmoe.inference.selection import Selection
    from flexmoe.merge.slots import SlotInfo

    slots = [
        SlotInfo(0, "public", "coordinator", "public"),
        SlotInfo(1, "public-0", "coordinator", "CC0-1.0"),
        SlotInfo(2, "legal", "Law Firm", "CC-BY-4.0"),
        SlotInfo(3, "code", "Code Org", "MIT"),
    ]

    def active(**choice: frozenset[str]) -> list[bool]:
        return Selection(**choice).mask(slots).tolist()

    assert active(exclude=frozenset({"coordinator"})) == [True, False, True, True]
    assert active(exclude=frozenset({"Law Firm"})) == [True, True, False, True]
    assert active(include=frozenset({"coordinator"})) == [True, True, False, False]
    assert active(exclude=frozenset({"coordinator", "code"})) == [True, False, True, False]
    with pytest.raises(FlexMoEError, match="excluding its owner, 'coordinator', leaves out"):
        active(exclude=frozenset({"public"}))
    with pytest.raises(FlexMoEError, match="excludes every owner's expert"):
        active(exclude=frozenset({"coordinator", "Law Firm", "Code Org"}))


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flexmoe", *args], capture_output=True, text=True, timeout=180
    )


def test_cli_eval_honours_opt_out_and_selection(
    merged: Path, corpus_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`eval ppl` (in this process, as a command line) leaves out what --exclude names and
    what an owner opted out of, read on every load; excluding every owner is refused."""
    import shutil

    from test_hostile import _refused, main_ok

    from flexmoe.cli import main

    model = tmp_path / "model"
    shutil.copytree(merged, model)
    data = ["--data", f"other={corpus_dir / 'other.jsonl'}", "--json", "--device", "cpu"]
    data += ["--cache-dir", str(tmp_path / "cache")]

    def bpb(*extra: str) -> float:
        capsys.readouterr()
        with pytest.raises(SystemExit) as done:
            main(["eval", "ppl", str(model), *data, *extra])
        assert done.value.code in (0, None)
        return float(json.loads(capsys.readouterr().out)[0]["bits_per_byte"])

    everyone, without = bpb(), bpb("--exclude", "upper")
    assert everyone != without
    main_ok(["members", "opt-out", str(model), "upper"], capsys)
    assert bpb() == without  # the standing choice is read by every load
    bad = ["eval", "ppl", str(model), *data, "--exclude", "upper", "--exclude", "again"]
    assert "excludes every owner's expert" in _refused(bad, capsys)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("tamper", "sha256 does not match"),
        ("truncate", "not a readable safetensors file"),
        ("pickle", "not a readable safetensors file"),
        ("nan", "holds NaN or Inf values"),
        ("anchor", "trained on another anchor"),
        ("tokenizer", "another tokenizer"),
    ],
)
def test_cli_merge_refuses_bad_packages(
    anchor_dir: Path,
    packages: list[Path],
    tmp_path: Path,
    damage: str,
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`merge` and `merge add` refuse each damage in one line and write nothing (in this
    process; the pickled tensors also in a process of their own, as a user runs it)."""
    import shutil

    from safetensors.torch import load_file, save_file
    from test_hostile import _refused

    from flexmoe.expert.manifest import MANIFEST_FILE, TENSORS_FILE
    from flexmoe.io import sha256_file

    bad = tmp_path / "bad"
    shutil.copytree(packages[1], bad)
    tensors_file, manifest_file = bad / TENSORS_FILE, bad / MANIFEST_FILE
    manifest = json.loads(manifest_file.read_text())
    if damage == "tamper":
        data = bytearray(tensors_file.read_bytes())
        data[-5] ^= 0x10
        tensors_file.write_bytes(bytes(data))
    elif damage == "truncate":
        tensors_file.write_bytes(tensors_file.read_bytes()[:-100])
    elif damage == "pickle":
        torch.save({"x": torch.zeros(1)}, tensors_file)
    elif damage == "nan":
        tensors = load_file(tensors_file)
        tensors["layers.0.up_proj.weight"][1, 1] = float("inf")
        save_file(tensors, str(tensors_file))
    elif damage == "anchor":
        manifest["anchor_fingerprint"] = "f" * 64
    elif damage == "tokenizer":
        manifest["tokenizer_fingerprint"] = "f" * 64
    if damage != "tamper":
        manifest["files"][TENSORS_FILE] = sha256_file(tensors_file)
    manifest_file.write_text(json.dumps(manifest))
    out = tmp_path / "m"
    merge = ["merge", "--anchor", str(anchor_dir), "--expert", str(packages[0])]
    merge += ["--expert", str(bad), "--out", str(out)]
    assert message in _refused(merge, capsys)
    if damage == "pickle":
        result = _run(*merge)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not out.exists() and not list(tmp_path.glob(".m.*"))
    build_merged(plan_merge(anchor_dir, packages[:1], top_k=2), out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert message in _refused(["merge", "add", str(out), str(bad)], capsys)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing changed


def test_kill_9_during_opt_out_changes_leaves_old_or_new_state(
    merged: Path, tmp_path: Path
) -> None:
    import shutil
    import signal
    import sqlite3
    import time

    from flexmoe.merge.layout import STANDING_FILE as DB_FILE
    from flexmoe.merge.standing import StandingStore

    model = tmp_path / "model"
    shutil.copytree(merged, model)
    StandingStore(model).close()
    child = (
        "import sys\nfrom flexmoe.merge.standing import StandingStore\n"
        "store = StandingStore(sys.argv[1])\ni = 0\n"
        "while True:\n"
        "    store.set('upper', opted_out=i % 2 == 0, reason=f'change {i}')\n"
        "    i += 1\n"
        "    if i == 20: print('running', flush=True)\n"
    )
    for delay in (0.05, 0.2, 0.5):
        proc = subprocess.Popen(
            [sys.executable, "-c", child, str(model)], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == "running"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        db = sqlite3.connect(model / DB_FILE)
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        opted_out, reason = db.execute(
            "SELECT opted_out, reason FROM status WHERE name = 'upper'"
        ).fetchone()
        action, last_reason = db.execute(
            "SELECT action, reason FROM audit WHERE name = 'upper' ORDER BY id DESC LIMIT 1"
        ).fetchone()
        db.close()
        # the state and its audit row were committed together, or neither was
        assert (action == "opt-out") == bool(opted_out) and reason == last_reason
        store = StandingStore(model)
        assert store.opted_out() == (frozenset({"upper"}) if opted_out else frozenset())
        store.close()


def test_router_tune_changes_only_the_router_and_records_it(
    merged: Path, corpus_dir: Path, tmp_path: Path
) -> None:
    from flexmoe.evaluate.perplexity import evaluate_model
    from flexmoe.merge.tune import tune_router
    from flexmoe.training.config import TrainConfig

    spec = DataSpec("upper", (str(corpus_dir / "other.jsonl"),))
    cfg = TrainConfig(steps=15, batch_size=8, seq_len=32, lr=3e-2, warmup_steps=1,
                      weight_decay=0.0, eval_every=0, checkpoint_every=0)  # fmt: skip
    out = tmp_path / "tuned"
    tune_router(merged, [spec], out=out, cfg=cfg, device=CPU, cache_dir=None, progress=False)
    before, after = _state(merged), _state(out)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith("mlp.gate.weight") for k in changed)
    from flexmoe.data.split import Split

    kwargs = {"device": CPU, "cache_dir": None, "seq_len": 32, "split": Split.VALIDATION}
    old = evaluate_model(merged, [spec], **kwargs)[0].bits_per_byte  # type: ignore[arg-type]
    new = evaluate_model(out, [spec], **kwargs)[0].bits_per_byte  # type: ignore[arg-type]
    assert new < old  # held-out text of the tuning domain
    record = json.loads((out / SLOTS_FILE).read_text())["router_tuning"]
    assert record["data"] == {"upper": record["data"]["upper"]} and record["steps"] == 15
    assert json.loads((merged / SLOTS_FILE).read_text())["router_tuning"] is None
    listed = _run("members", "list", str(out))
    assert "routing tuned after merging on" in listed.stdout and "not as strict" in listed.stdout
    with pytest.raises(FlexMoEError, match="new directory"):
        tune_router(merged, [spec], out=merged, cfg=cfg, device=CPU, cache_dir=None)
    assert theirs_loads(out)


def theirs_loads(model_dir: Path) -> bool:
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.randint(2, 400, (1, 8))
    with torch.no_grad():
        return bool(
            (model(ids).logits - load_merged(model_dir, use_bias=False)(ids).logits).abs().max()
            <= 1e-5
        )


def test_demo_merge_stage_opts_out_exactly(
    anchor_dir: Path, packages: list[Path], corpus_dir: Path, tmp_path: Path
) -> None:
    import shutil

    from helpers import WORDS, make_texts, write_jsonl

    from flexmoe.evaluate.extraction import AuditSettings
    from flexmoe.merge.standing import StandingStore
    from flexmoe_lab.pipeline import QUICK, _audit_stage, _opt_out_stage

    out = tmp_path / "demo"
    out.mkdir()
    upper = write_jsonl(tmp_path / "upper.jsonl", make_texts(200, 7, [w.upper() for w in WORDS]))
    specs = {
        "public": DataSpec("public", (str(corpus_dir / "public.jsonl"),)),
        "upper": DataSpec("upper", (str(upper),)),
    }
    copies = []
    for p in packages:
        shutil.copytree(p, out / p.name)
        copies.append(out / p.name)
    lines: list[str] = []
    build_merged(plan_merge(anchor_dir, copies, top_k=2), out / "merged", progress=False)
    settings = replace(QUICK, top_k=2)
    opt = _opt_out_stage(
        out, out / "merged", specs, settings, CPU, tmp_path / "cache", lines.append,
        opt_out="upper", prompt="the union",
    )  # fmt: skip
    assert opt.bpb_difference_vs_merged_without <= 1e-5
    assert opt.opted_out_bpb > 0
    assert opt.generation_after.generated["upper"] == 0.0
    assert opt.generation_before.generated["upper"] > 0.0
    assert [row[2] for row in opt.audit] == ["opt-out", "opt-in"]
    assert (out / "merged-without-upper").is_dir()
    assert StandingStore(out / "merged").opted_out() == set()  # back in
    quick_audit = replace(settings, audit=AuditSettings(documents=2, samples=1, prefix_tokens=8,
                                                        suffix_tokens=8))  # fmt: skip
    audit = _audit_stage(anchor_dir, copies, out / "merged", specs, quick_audit, CPU, "upper")
    assert [r.model for r in audit.results] == ["anchor", "specialist:upper", "flexmoe"]
    assert all(r.documents == 2 for r in audit.results)
    # the router-tuning variant the paper's way: owners send hashes of public documents
    from flexmoe.training.config import TrainConfig
    from flexmoe_lab.pipeline import _owner_text_tune_stage, _tune_stage

    tune_cfg = TrainConfig(steps=2, batch_size=2, seq_len=32, lr=1e-2, warmup_steps=1,
                           weight_decay=0.0, eval_every=0, checkpoint_every=0)  # fmt: skip
    record = _tune_stage(
        out, anchor_dir, out / "merged", out / "merged-tuned", specs, "public",
        replace(settings, tune=tune_cfg, proxy_documents=5), CPU, tmp_path / "cache",
    )  # fmt: skip

    def texts(path: Path) -> list[str]:
        return [json.loads(line)["text"] for line in path.read_text().splitlines()]

    public_texts = set(texts(corpus_dir / "public.jsonl"))
    owner_texts = set(texts(upper))
    sent = (out / "proxy" / "upper.json").read_text()
    assert len(json.loads(sent)["public_sha256"]) == 5
    assert not [t for t in owner_texts if t[:40] in sent]  # the owner sends hashes only
    for domain in ("upper", "public"):  # nothing owner-written reaches the tuning inputs
        tuning = texts(out / "proxy" / f"{domain}.jsonl")
        assert tuning and set(tuning) <= public_texts and not set(tuning) & owner_texts
    assert set(record.data) == set(specs) and record.steps == 2
    ablation = _owner_text_tune_stage(
        out / "owner-text", out / "merged", out / "owner-text" / "merged-tuned", specs,
        replace(settings, tune=tune_cfg, proxy_bytes=1500), CPU, tmp_path / "cache",
    )  # fmt: skip
    for domain in specs:
        proxy = texts(out / "owner-text" / "proxy" / f"{domain}.jsonl")
        assert 0 < sum(len(t.encode()) for t in proxy) <= 1500
    assert ablation.steps == 2
    table = json.loads((out / "merged-tuned" / SLOTS_FILE).read_text())
    assert table["router_tuning"]["documents_sha256"] == record.documents_sha256


def test_router_levers_change_only_the_rows(
    merged: Path, anchor_dir: Path, corpus_dir: Path, tmp_path: Path
) -> None:
    """The calibration lever rescales each owner's margin to one spread on public text and
    writes a checkpoint transformers loads; the ceiling trains only the rows, on exactly the
    held-out text that is scored."""
    from flexmoe.data.packing import pack_documents
    from flexmoe.data.split import load_splits
    from flexmoe.evaluate.perplexity import eval_documents, evaluate_loaded
    from flexmoe.training.config import TrainConfig
    from flexmoe_lab.levers import calibrated_rows, ffn_inputs
    from flexmoe_lab.pipeline import QUICK, _calibrated_stage, _ceiling_stage

    public = DataSpec("public", (str(corpus_dir / "public.jsonl"),))
    out = _calibrated_stage(anchor_dir, merged, tmp_path / "calibrated", public, CPU, None)
    before, after = _state(merged), _state(out)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith("mlp.gate.weight") for k in changed)
    for key in changed:
        assert torch.equal(before[key][0], after[key][0])  # the public row is the anchor's
    table = json.loads((out / SLOTS_FILE).read_text())
    assert table["router_calibration"]["public_tokens"] > 0 and table["router_tuning"] is None
    assert theirs_loads(out)
    anchor = load_anchor(anchor_dir)
    stream = pack_documents(load_splits([public]).train, anchor.tokenizer, cache_dir=None)
    inputs = ffn_inputs(anchor.model, stream)  # the very tokens the stage measured
    rows = torch.stack([after[f"model.layers.{i}.mlp.gate.weight"] for i in range(len(changed))])
    margins = torch.einsum("tlh,lnh->tln", inputs, rows[:, 1:] - rows[:, :1])
    spread = margins.std(0)
    assert torch.allclose(spread, spread[:, :1].expand_as(spread), rtol=1e-3)
    assert torch.allclose(calibrated_rows(rows, inputs), rows, atol=1e-5)  # a fixed point

    from helpers import WORDS, make_texts, write_jsonl

    texts = make_texts(200, 7, [w.upper() for w in WORDS])
    upper = DataSpec("upper", (str(write_jsonl(tmp_path / "upper.jsonl", texts)),))
    specs = {"public": public, "upper": upper}
    tune = TrainConfig(steps=1, batch_size=4, seq_len=32, lr=3e-2, warmup_steps=1,
                       weight_decay=0.0, eval_every=0, checkpoint_every=0)  # fmt: skip
    settings = replace(QUICK, tune=tune, ceiling_steps=12, eval_bytes=3000)
    ceiling = _ceiling_stage(merged, tmp_path / "ceiling", specs, settings, CPU, None)
    record = json.loads((ceiling / SLOTS_FILE).read_text())["router_tuning"]
    scored = {d: len(eval_documents(s, max_bytes=3000)) for d, s in specs.items()}
    assert record["data"] == scored and record["steps"] == 12
    changed = {k for k, v in _state(ceiling).items() if not torch.equal(before[k], v)}
    assert changed and all(k.endswith("mlp.gate.weight") for k in changed)

    def score(model_dir: Path) -> list[float]:
        scores = evaluate_loaded(load_merged(model_dir), anchor.tokenizer, list(specs.values()),
                                 device=CPU, cache_dir=None, seq_len=32, max_bytes=3000)  # fmt: skip
        return [s.bits_per_byte for s in scores]

    assert sum(score(ceiling)) < sum(score(merged))  # fitted on the scored text


def test_router_tune_from_owners_proxies_on_the_command_line(
    merged: Path,
    anchor_dir: Path,
    corpus_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An owner writes proxies.json (hashes only); the coordinator tunes on the public
    documents they name; a hash of a non-public document is refused in one line, exit 2 (each
    command line run in this process)."""
    from test_hostile import _refused

    from flexmoe.cli import main

    sent = tmp_path / "proxies.json"
    public = str(corpus_dir / "public.jsonl")
    proxies = ["expert", "proxies", "--anchor", str(anchor_dir), "--data"]
    proxies += [str(corpus_dir / "other.jsonl"), "--public-data", public, "--name", "other"]
    with pytest.raises(SystemExit) as done:
        main([*proxies, "--count", "6", "--out", str(sent), "--device", "cpu"])
    assert done.value.code in (0, None)
    assert "6 public documents chosen" in capsys.readouterr().out
    assert set(json.loads(sent.read_text())) >= {"expert", "public_sha256", "classifier"}
    tuned = tmp_path / "tuned"
    tune = ["router", "tune", str(merged), "--proxies", str(sent), "--public-data", public]
    with pytest.raises(SystemExit) as done:
        main(
            [
                *tune,
                "--out",
                str(tuned),
                "--steps",
                "2",
                "--batch-size",
                "2",
                "--seq-len",
                "32",
                "--device",
                "cpu",
                "--cache-dir",
                str(tmp_path / "cache"),
            ]
        )
    assert done.value.code in (0, None)
    capsys.readouterr()  # its progress
    record = json.loads((tuned / SLOTS_FILE).read_text())["router_tuning"]
    assert set(record["data"]) == {"other"} and record["steps"] == 2
    assert not list(tmp_path.glob("*.jsonl"))  # the resolved proxies were temporary
    forged = json.loads(sent.read_text())
    forged["public_sha256"] = ["0" * 64]
    sent.write_text(json.dumps(forged))
    line = _refused([*tune, "--out", str(tmp_path / "refused"), "--device", "cpu"], capsys)
    assert line == (
        f"flexmoe: error: {sent}: 1 hashes are not public documents (first 0000000000000000)"
    )
    assert not (tmp_path / "refused").exists()


def test_merge_add_replace_swaps_in_a_newer_version_of_the_same_owner(
    anchor_dir: Path, corpus_dir: Path, packages: list[Path], merged: Path, tmp_path: Path
) -> None:
    """``merge add --replace NAME PKG``: a newer package of the same expert and owner takes the
    slot, and the result equals a fresh merge with it; another owner's package is refused; the
    owners' opt-outs stay."""
    import shutil
    from dataclasses import replace

    from flexmoe.expert.train import EXPERT_DEFAULTS, train_expert
    from flexmoe.merge.edit import add_expert
    from flexmoe.merge.standing import StandingStore, standing_exclusions

    cfg = replace(EXPERT_DEFAULTS, steps=8, batch_size=4, seq_len=32, lr=1e-2, warmup_steps=1,
                  eval_every=0, checkpoint_every=0, seed=7)  # fmt: skip
    newer, impostor = tmp_path / "upper-v2", tmp_path / "upper-other-owner"
    for out, owner in ((newer, "upper org"), (impostor, "someone else")):
        train_expert(
            ExpertSpec(
                anchor=anchor_dir,
                data=[DataSpec("upper", (str(corpus_dir / "other.jsonl"),))],
                identity=ExpertIdentity(name="upper", owner=owner, license="MIT"),
                schedule=cfg,
            ),
            out=out,
            device=CPU,
            cache_dir=None,
            progress=False,
        )
    model = tmp_path / "model"
    shutil.copytree(merged, model)
    with StandingStore(model) as store:
        store.set("again", opted_out=True, reason="paused")
    add_expert(model, newer, replace="upper", progress=False)
    fresh = tmp_path / "fresh"
    build_merged(plan_merge(anchor_dir, [newer, packages[1]], top_k=2), fresh, progress=False)
    _same_model(model, fresh)
    assert standing_exclusions(model) == frozenset({"again"})
    for name, package, match in (
        ("upper", impostor, "only 'upper org' may replace its expert"),
        ("again", newer, "is expert 'upper', not a version of 'again'"),
        ("public", newer, "public expert cannot be replaced"),
        ("nobody", newer, "no such expert"),
    ):
        with pytest.raises(FlexMoEError, match=match):
            add_expert(model, package, replace=name, out=tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()
