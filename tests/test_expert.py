"""A data owner trains an expert alone and ships only the expert."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import WORDS, make_texts, write_jsonl
from safetensors.torch import load_file, save_file

from flexmoe.anchor import load_anchor
from flexmoe.data.documents import DataSpec
from flexmoe.data.packing import pack_documents
from flexmoe.data.split import load_splits
from flexmoe.errors import FlexMoEError
from flexmoe.expert.manifest import MANIFEST_FILE, TENSORS_FILE
from flexmoe.expert.package import load_package
from flexmoe.expert.spec import (
    ExpertIdentity,
    ExpertSpec,
    Objectives,
    PublicSample,
    PublicShare,
    Rivals,
)
from flexmoe.expert.specialist import build_specialist
from flexmoe.expert.train import EXPERT_DEFAULTS, build_trainable_moe, train_expert
from flexmoe.expert.verify import verify_package
from flexmoe.io import sha256_file
from flexmoe.model.checkpoint import moe_layers
from flexmoe.training.loop import validation_loss

CPU = torch.device("cpu")
SECRET_WORDS = ["zorblax", "quintarian", "velmorph", "skorrid", "thandrake", "plimsoul", "grevanth"]
CFG = replace(
    EXPERT_DEFAULTS,
    steps=60,
    batch_size=4,
    seq_len=32,
    lr=1e-2,
    warmup_steps=2,
    eval_every=30,
    checkpoint_every=0,
    eval_batches=4,
)


@pytest.fixture(scope="module")
def owner_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("owner-private-data")
    # The owner's domain: a narrow slice of the public vocabulary, plus private record names.
    texts = [
        f"{SECRET_WORDS[i % 7]} record {i}: " + t
        for i, t in enumerate(make_texts(80, seed=11, words=WORDS[:6]))
    ]
    write_jsonl(root / "owner.jsonl", texts)
    return root


@pytest.fixture(scope="module")
def package(
    tmp_path_factory: pytest.TempPathFactory,
    anchor_dir: Path,
    owner_dir: Path,
    public_spec: DataSpec,
) -> Path:
    out = tmp_path_factory.mktemp("pkg") / "secret-expert"
    train_expert(
        ExpertSpec(
            anchor=anchor_dir,
            data=[DataSpec("secret", (str(owner_dir),))],
            identity=ExpertIdentity(name="secret", owner="Owner Org", license="CC-BY-4.0"),
            schedule=CFG,
            public=PublicShare(data=[public_spec]),
        ),
        out=out,
        device=CPU,
        cache_dir=None,
        progress=False,
    )
    return out


def test_package_holds_only_the_expert(package: Path, anchor_dir: Path) -> None:
    assert sorted(p.name for p in package.iterdir()) == [TENSORS_FILE, MANIFEST_FILE]
    manifest = json.loads((package / MANIFEST_FILE).read_text())
    anchor = load_anchor(anchor_dir)
    assert manifest["anchor_fingerprint"] == anchor.manifest.fingerprint
    assert manifest["tokenizer_fingerprint"] == anchor.manifest.tokenizer_fingerprint
    assert manifest["router_init"]["method"] == "anchor-hidden"
    assert (
        manifest["training"]["steps"] == 60
        and manifest["training"]["hyperparameters"]["public_fraction"] == 0.25
    )
    tensors = load_file(package / TENSORS_FILE)
    h, f, layers = 32, 64, 2
    assert len(tensors) == 5 * layers
    assert sum(t.numel() for t in tensors.values()) == layers * (3 * h * f + h + 1)
    assert all(tensors[f"layers.{i}.bias"].item() <= 0 for i in range(layers))


def test_no_training_text_or_path_in_the_package(package: Path, owner_dir: Path) -> None:
    blob = b"".join(p.read_bytes() for p in sorted(package.iterdir()))
    text = (owner_dir / "owner.jsonl").read_text()
    docs = [json.loads(line)["text"] for line in text.splitlines()]
    windows = {d[i : i + 32].encode() for d in docs for i in range(0, len(d) - 31)}
    assert not [w for w in windows if w in blob]
    for needle in (str(owner_dir), owner_dir.name, "owner.jsonl", *SECRET_WORDS):
        assert needle.encode() not in blob, needle


def test_frozen_tensors_stay_bit_identical(anchor_dir: Path, owner_dir: Path) -> None:
    from flexmoe.training.loop import train

    anchor = load_anchor(anchor_dir)
    before = {k: v.clone() for k, v in anchor.model.state_dict().items()}
    model = build_trainable_moe(anchor.model, anchor.public_router, anchor.public_router.clone())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        *(
            f"model.layers.{i}.mlp.experts.1.{p}.weight"
            for i in range(2)
            for p in ("gate_proj", "up_proj", "down_proj")
        ),
        *(f"model.layers.{i}.mlp.router.rows.1" for i in range(2)),
        *(f"model.layers.{i}.mlp.router.biases.0" for i in range(2)),
    }
    docs = load_splits([DataSpec("secret", (str(owner_dir),))]).train
    train(
        model,
        train_stream=pack_documents(docs, anchor.tokenizer),
        val_stream=None,
        cfg=CFG,
        device=CPU,
        progress=False,
    )
    state = model.state_dict()
    for key, value in before.items():
        moe_key = key.replace(".mlp.", ".mlp.experts.0.") if ".mlp." in key else key
        assert torch.equal(state[moe_key], value), key
    for i in range(2):
        assert torch.equal(state[f"model.layers.{i}.mlp.router.rows.0"], anchor.public_router[i])
        assert not torch.equal(
            state[f"model.layers.{i}.mlp.experts.1.up_proj.weight"],
            before[f"model.layers.{i}.mlp.up_proj.weight"],
        )


def test_specialist_learns_the_owner_domain_and_keeps_public(
    package: Path, anchor_dir: Path, owner_dir: Path, public_spec: DataSpec
) -> None:
    anchor = load_anchor(anchor_dir)
    specialist = build_specialist(anchor, load_package(package, anchor))
    owner_val = pack_documents(
        load_splits([DataSpec("secret", (str(owner_dir),))]).validation, anchor.tokenizer
    )
    public_val = pack_documents(load_splits([public_spec]).validation, anchor.tokenizer)
    owner_anchor, owner_spec = (
        validation_loss(anchor.model, owner_val, CFG, CPU),
        validation_loss(specialist, owner_val, CFG, CPU),
    )
    public_anchor, public_spec_loss = (
        validation_loss(anchor.model, public_val, CFG, CPU),
        validation_loss(specialist, public_val, CFG, CPU),
    )
    assert owner_spec < owner_anchor - 0.5  # clearly below
    assert public_spec_loss < public_anchor * 1.05  # within a few percent
    for layer in moe_layers(specialist):
        assert layer.top_k == 2 and layer.use_bias


def test_verify_accepts_fresh_and_rejects_flipped_byte(
    package: Path, anchor_dir: Path, tmp_path: Path
) -> None:
    rows = dict(verify_package(package, anchor_dir))
    assert rows["name"] == "secret" and "matches" in rows["anchor fingerprint"]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / MANIFEST_FILE).write_bytes((package / MANIFEST_FILE).read_bytes())
    data = bytearray((package / TENSORS_FILE).read_bytes())
    data[len(data) // 2] ^= 0x01
    (bad / TENSORS_FILE).write_bytes(bytes(data))
    with pytest.raises(FlexMoEError, match="sha256 does not match"):
        verify_package(bad, anchor_dir)


def _rehash(pkg: Path) -> None:
    manifest = json.loads((pkg / MANIFEST_FILE).read_text())
    manifest["files"][TENSORS_FILE] = sha256_file(pkg / TENSORS_FILE)
    (pkg / MANIFEST_FILE).write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("nan", "holds NaN or Inf values"),
        ("shape", "has shape (3,), expected (32,)"),
        ("dtype", "has dtype float16, expected float32"),
        ("missing", "missing tensors: layers.0.router"),
        ("pickle", "not a readable safetensors file"),
        ("extra-file", "unexpected files in the package: notes.txt"),
        ("anchor", "trained on another anchor"),
        ("positive-bias", "is positive"),
    ],
)
def test_verify_rejects(
    package: Path, anchor_dir: Path, tmp_path: Path, damage: str, message: str
) -> None:
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(package, bad)
    tensors = load_file(bad / TENSORS_FILE)
    if damage == "nan":
        tensors["layers.1.up_proj.weight"][0, 0] = float("nan")
    elif damage == "shape":
        tensors["layers.0.router"] = torch.zeros(3)
    elif damage == "dtype":
        tensors["layers.0.router"] = tensors["layers.0.router"].half()
    elif damage == "missing":
        del tensors["layers.0.router"]
    elif damage == "positive-bias":
        tensors["layers.0.bias"] = torch.tensor(0.5)
    if damage == "pickle":
        torch.save({"x": torch.zeros(1)}, bad / TENSORS_FILE)  # a pickle must never be loaded
    elif damage == "extra-file":
        (bad / "notes.txt").write_text("hello")
    elif damage == "anchor":
        manifest = json.loads((bad / MANIFEST_FILE).read_text())
        manifest["anchor_fingerprint"] = "0" * 64
        (bad / MANIFEST_FILE).write_text(json.dumps(manifest))
    else:
        save_file(tensors, str(bad / TENSORS_FILE))
    _rehash(bad)
    with pytest.raises(FlexMoEError) as exc:
        verify_package(bad, anchor_dir)
    assert message in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("name", "a/b", "path separators"),
        ("owner", "evil\x07corp", "control characters"),
        ("name", "x" * 65, "at most 64"),
        ("owner", "", "must not be empty"),
    ],
)
def test_bad_identity(field: str, value: str, message: str) -> None:
    kwargs = {"name": "ok", "owner": "ok", "license": "MIT", field: value}
    with pytest.raises(FlexMoEError, match=message):
        ExpertIdentity(**kwargs)


def test_licenses_are_spdx_expressions() -> None:
    """Checked by the license-expression library: expressions and LicenseRef-... pass (in their
    normalised spelling); anything else is refused."""
    for given, kept in (("MIT OR Apache-2.0", "MIT OR Apache-2.0"), ("mit", "MIT"),
                        ("GPL-2.0-or-later", "GPL-2.0-or-later"),
                        ("LicenseRef-acme-terms", "LicenseRef-acme-terms")):  # fmt: skip
        assert ExpertIdentity(name="ok", owner="ok", license=given).license == kept
    for bad in ("My-Own-License", "MIT AND (", "Proprietary"):
        with pytest.raises(FlexMoEError, match="not an SPDX license expression"):
            ExpertIdentity(name="ok", owner="ok", license=bad)


def test_bad_inputs(anchor_dir: Path, tmp_path: Path, owner_dir: Path) -> None:
    identity = ExpertIdentity(name="x", owner="y", license="MIT")
    short = write_jsonl(tmp_path / "short.jsonl", ["tiny text"])
    with pytest.raises(FlexMoEError, match="shorter than one block"):
        train_expert(
            ExpertSpec(
                anchor=anchor_dir,
                data=[DataSpec("x", (str(short),))],
                identity=identity,
                schedule=CFG,
            ),
            out=tmp_path / "p",
            device=CPU,
            cache_dir=None,
            progress=False,
        )
    (tmp_path / "plain").mkdir()
    with pytest.raises(FlexMoEError, match=r"no config.json|not a flexmoe anchor"):
        train_expert(
            ExpertSpec(
                anchor=tmp_path / "plain",
                data=[DataSpec("x", (str(owner_dir),))],
                identity=identity,
                schedule=CFG,
            ),
            out=tmp_path / "p",
            device=CPU,
            cache_dir=None,
            progress=False,
        )
    assert not (tmp_path / "p").exists()


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "flexmoe", *args]


def test_cli_verify_and_eval(
    package: Path,
    anchor_dir: Path,
    owner_dir: Path,
    corpus_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`expert verify` as its own process; a broken package refused in one line and `expert
    eval`'s scores, run in this process."""
    from test_hostile import _refused

    from flexmoe.cli import main

    ok = subprocess.run(
        _cli("expert", "verify", str(package), "--anchor", str(anchor_dir)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0 and "package is sound" in ok.stdout
    (package.parent / "broken").mkdir(exist_ok=True)
    _refused(
        ["expert", "verify", str(package.parent / "broken"), "--anchor", str(anchor_dir)], capsys
    )
    data = ["--data", f"secret={owner_dir}", "--data", f"public={corpus_dir / 'public.jsonl'}"]
    with pytest.raises(SystemExit) as done:
        main(
            [
                "expert",
                "eval",
                str(package),
                "--anchor",
                str(anchor_dir),
                "--json",
                "--cache-dir",
                str(tmp_path / "c"),
                *data,
            ]
        )
    assert done.value.code in (0, None)
    rows = {r["domain"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["secret"]["specialist"]["bits_per_byte"] < rows["secret"]["anchor"]["bits_per_byte"]


@pytest.mark.slow
def test_kill_9_then_resume_matches_an_uninterrupted_run(
    anchor_dir: Path, owner_dir: Path, tmp_path: Path
) -> None:
    """kill -9 leaves a resumable checkpoint and no package; resuming gives the same expert."""
    args = ["expert", "train", "--anchor", str(anchor_dir), "--data", str(owner_dir), "--name", "secret",
            "--owner", "o", "--license", "MIT", "--steps", "40", "--batch-size", "4", "--seq-len", "32",
            "--lr", "3e-3", "--warmup-steps", "2", "--eval-every", "0", "--checkpoint-every", "2",
            "--device", "cpu", "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = subprocess.run(
        _cli(*args, "--out", str(tmp_path / "a")),
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert straight.returncode == 0, straight.stderr
    proc = subprocess.Popen(
        _cli(*args, "--out", str(tmp_path / "b")),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    state = tmp_path / ".b.work" / "checkpoint" / "trainer_state.json"
    deadline = time.time() + 120
    while time.time() < deadline and not (
        state.is_file() and json.loads(state.read_text())["step"] >= 6
    ):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "b").exists()  # never a half-written package
    resumed = subprocess.run(
        _cli(*args, "--out", str(tmp_path / "b"), "--resume"),
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    a, b = load_file(tmp_path / "a" / TENSORS_FILE), load_file(tmp_path / "b" / TENSORS_FILE)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key


@pytest.mark.slow
@pytest.mark.parametrize("sharding", [[], ["--fsdp", "--checkpoint-every", "2"]])
def test_torchrun_expert_matches_one_process(
    anchor_dir: Path, owner_dir: Path, tmp_path: Path, sharding: list[str]
) -> None:
    """Two DDP or FSDP2 processes write one package, equal to the one-process package (FSDP also
    gathers its shards for checkpoints on the way); --tokens sets steps."""
    args = ["expert", "train", "--anchor", str(anchor_dir), "--data", str(owner_dir), "--name", "secret",
            "--owner", "o", "--license", "MIT", "--tokens", "640", "--batch-size", "4", "--seq-len", "32",
            "--lr", "3e-3", "--warmup-steps", "1", "--eval-every", "0", "--checkpoint-every", "0",
            "--device", "cpu", "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        _cli(*args, "--out", str(tmp_path / "one")),
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr
    torchrun = Path(sys.executable).with_name("torchrun")
    two = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node=2", "-m", "flexmoe", *args, *sharding, "--out", str(tmp_path / "two")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    m1 = json.loads((tmp_path / "one" / MANIFEST_FILE).read_text())
    m2 = json.loads((tmp_path / "two" / MANIFEST_FILE).read_text())
    assert m1["training"]["steps"] == m2["training"]["steps"] == 5
    assert m2["training"]["final_train_loss"] == pytest.approx(
        m1["training"]["final_train_loss"], abs=1e-4
    )
    a, b = load_file(tmp_path / "one" / TENSORS_FILE), load_file(tmp_path / "two" / TENSORS_FILE)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-4), key


def test_owner_proxies_rank_public_documents_like_its_own(anchor_dir: Path) -> None:
    """The owner's classifier puts the public documents that resemble its data first; the
    coordinator resolves only hashes of public documents and refuses any other."""
    from helpers import WORDS, make_texts

    from flexmoe.anchor import load_anchor
    from flexmoe.data.documents import Document
    from flexmoe.expert.proxies import choose_proxies, resolve_proxies

    anchor = load_anchor(anchor_dir)
    upper = [w.upper() for w in WORDS]
    own = [Document("own", str(i), t) for i, t in enumerate(make_texts(30, 3, upper))]
    plain = make_texts(20, 4)
    alike = make_texts(4, 5, upper)
    public = [Document("public", str(i), t) for i, t in enumerate(plain + alike)]
    choice = choose_proxies(anchor, "own", own, public, count=4, device=torch.device("cpu"))
    chosen = resolve_proxies(choice, public, "proxies.json")
    assert {d.text for d in chosen} == set(alike)
    assert {d.domain for d in chosen} == {"own"}
    forged = choice.model_copy(update={"public_sha256": [own[0].text_sha256]})
    with pytest.raises(FlexMoEError, match=r"proxies\.json: 1 hashes are not public documents"):
        resolve_proxies(forged, public, "proxies.json")


def test_spread_public_sample_reaches_every_part_of_the_public_text() -> None:
    import numpy as np

    from flexmoe.data.packing import SPREAD_CHUNK, TokenStream, mix_streams

    own = TokenStream(tokens=np.zeros(3 * SPREAD_CHUNK, dtype=np.uint16), num_bytes=1, num_docs=1)
    public = TokenStream(
        tokens=np.arange(1, 20 * SPREAD_CHUNK + 1, dtype=np.uint16) // SPREAD_CHUNK + 1,
        num_bytes=1,
        num_docs=1,
    )  # fmt: skip  (token = 1 + the index of its piece of the public stream)
    prefix = mix_streams(own, public, 0.5).tokens[3 * SPREAD_CHUNK :]
    spread = mix_streams(own, public, 0.5, spread=True).tokens[3 * SPREAD_CHUNK :]
    assert len(prefix) == len(spread) == 3 * SPREAD_CHUNK
    assert set(np.unique(prefix)) <= {1, 2, 3, 4}  # the first pieces only
    assert {1, 20} <= set(np.unique(spread).tolist())  # from the start to the end
    assert np.array_equal(mix_streams(own, public, 0.0, spread=True).tokens, own.tokens)


def test_closeness_penalty_is_zero_at_the_copy_and_pulls_back(anchor_dir: Path) -> None:
    from flexmoe.expert.train import closeness_penalty

    anchor = load_anchor(anchor_dir)
    model = build_trainable_moe(anchor.model, anchor.public_router, anchor.public_router.clone())
    penalty = closeness_penalty(2.0)
    assert float(penalty(model).detach()) == 0.0
    own = moe_layers(model)[0].experts[1].up_proj.weight
    with torch.no_grad():
        own.mul_(2.0)  # moved by |W_0| in one of six projections
    loss = penalty(model)
    assert abs(float(loss.detach()) - 2.0 / 6) < 1e-5
    loss.backward()
    assert own.grad is not None and float((own.grad * own).sum().detach()) > 0  # pulls to W_0


def test_owner_levers_are_recorded_in_the_package(
    anchor_dir: Path, owner_dir: Path, public_spec: DataSpec, tmp_path: Path
) -> None:

    cfg = replace(CFG, steps=2, eval_every=0)
    manifest, _ = train_expert(
        ExpertSpec(
            anchor=anchor_dir,
            data=[DataSpec("secret", (str(owner_dir),))],
            identity=ExpertIdentity(name="secret", owner="Owner Org", license="CC-BY-4.0"),
            schedule=cfg,
            public=PublicShare(data=[public_spec], sample=PublicSample.SPREAD),
            objectives=Objectives(stay_close=0.5),
        ),
        out=tmp_path / "p",
        device=CPU,
        cache_dir=None,
        progress=False,
    )
    found = manifest.training.hyperparameters
    assert found["public_sample"] == "spread" and found["stay_close"] == 0.5
    for flag, message in (
        (["--public-sample", "middle"], "--public-sample: choose prefix or spread"),
        (["--stay-close", "-1"], "--stay-close: must be >= 0"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "flexmoe", "expert", "train", "--anchor", str(anchor_dir),
             "--data", str(owner_dir), "--owner", "O", "--license", "MIT",
             "--out", str(tmp_path / "q"), *flag],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert not (tmp_path / "q").exists()


def test_router_objective_labels_the_owners_tokens_and_trains_the_margin(
    anchor_dir: Path, owner_dir: Path, public_spec: DataSpec, tmp_path: Path
) -> None:
    import numpy as np

    from flexmoe.expert.train import ROUTER_OBJECTIVE, OwnBlocks, router_objective

    stream = OwnBlocks(np.arange(100, dtype=np.uint16), 100, 1, own_tokens=30)
    stream.batch([0, 3], 10)  # tokens 0-9 (own) and 30-39 (public)
    assert stream.drawn[0].tolist() == [[True] * 10, [False] * 10]
    stream.batch([2], 10)
    assert stream.drawn[0].tolist() == [[True] * 10]
    anchor = load_anchor(anchor_dir)
    model = build_trainable_moe(anchor.model, anchor.public_router, anchor.public_router.clone())
    model.train()
    mixed = OwnBlocks(np.arange(2, 200, dtype=np.uint16) % 90 + 2, 1, 1, own_tokens=64)
    batch = mixed.batch([0, 4], 32)  # one own block, one public
    model(input_ids=batch[:, :-1])
    loss = router_objective(1.0, mixed)(model)
    assert abs(float(loss.detach()) - math.log(2)) < 1e-4  # r_1 = r_0, b_1 = 0: margins 0
    loss.backward()
    row = moe_layers(model)[0].router.rows[1]
    assert row.grad is not None and float(row.grad.abs().sum()) > 0
    cfg = replace(CFG, steps=2, eval_every=0)
    identity = ExpertIdentity(name="secret", owner="Owner Org", license="CC-BY-4.0")
    manifest, _ = train_expert(
        ExpertSpec(
            anchor=anchor_dir,
            data=[DataSpec("secret", (str(owner_dir),))],
            identity=identity,
            schedule=cfg,
            public=PublicShare(data=[public_spec]),
            objectives=Objectives(router=0.5),
        ),
        out=tmp_path / "p",
        device=CPU,
        cache_dir=None,
        progress=False,
    )
    assert manifest.training.hyperparameters["router_objective"] == 0.5
    with pytest.raises(FlexMoEError, match="--router-objective: cannot be used with no public"):
        train_expert(
            ExpertSpec(
                anchor=anchor_dir,
                data=[DataSpec("secret", (str(owner_dir),))],
                identity=identity,
                schedule=cfg,
                objectives=Objectives(router=0.5),
            ),
            out=tmp_path / "q",
            device=CPU,
            cache_dir=None,
            progress=False,
        )
    # By default it is on where public text is mixed in, and off (not refused) where none is.
    for public, weight in (([public_spec], ROUTER_OBJECTIVE), (None, 0.0)):
        manifest, _ = train_expert(
            ExpertSpec(
                anchor=anchor_dir,
                data=[DataSpec("secret", (str(owner_dir),))],
                identity=identity,
                schedule=cfg,
                public=PublicShare(data=public or ()),
            ),
            out=tmp_path / "d",
            device=CPU,
            cache_dir=None,
            overwrite=True,
            progress=False,
        )
        assert manifest.training.hyperparameters["router_objective"] == weight


def test_an_expert_trains_against_frozen_rivals_at_the_merge_top_k(
    anchor_dir: Path, owner_dir: Path, public_spec: DataSpec, package: Path, tmp_path: Path
) -> None:
    anchor = load_anchor(anchor_dir)
    rival = load_package(package, anchor)
    model = build_trainable_moe(
        anchor.model, anchor.public_router, anchor.public_router.clone(), [rival, rival], 3
    )
    moe = moe_layers(model)[1]
    assert moe.num_experts == 4 and moe.top_k == 3
    assert torch.equal(moe.experts[3].up_proj.weight, rival.tensors["layers.1.up_proj.weight"])
    assert torch.equal(moe.router.rows[2], rival.tensors["layers.1.router"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".experts.1." in n or "rows.1" in n or "biases.0" in n for n in trainable)
    cfg = replace(CFG, steps=2, eval_every=0)
    manifest, _ = train_expert(
        ExpertSpec(
            anchor=anchor_dir,
            data=[DataSpec("secret", (str(owner_dir),))],
            identity=ExpertIdentity(name="secret", owner="Owner Org", license="CC-BY-4.0"),
            schedule=cfg,
            public=PublicShare(data=[public_spec]),
            rivals=Rivals(packages=[package], top_k=2),
        ),
        out=tmp_path / "p",
        device=CPU,
        cache_dir=None,
        progress=False,
    )
    assert [r.name for r in manifest.training.rivals] == ["secret"]
    assert manifest.training.rival_top_k == 2
    assert verify_package(tmp_path / "p", anchor_dir)  # raises at a failed check
