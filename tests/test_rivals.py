"""The coordinator's public rival experts ship with the anchor; owners train against them and
the merge keeps them, both by default."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from flexmoe.anchor import load_anchor
from flexmoe.cli import main
from flexmoe.data.split import load_splits
from flexmoe.errors import FlexMoEError
from flexmoe.expert.manifest import MANIFEST_FILE, RIVALS_DIR
from flexmoe.expert.package import load_package, rival_version
from flexmoe.expert.rivals import resolve_rivals, shipped_rivals
from flexmoe.expert.specialist import build_specialist
from flexmoe.merge.layout import read_slots
from flexmoe.model.checkpoint import moe_layers

TINY = ["--steps", "4", "--batch-size", "4", "--seq-len", "32", "--warmup-steps", "1",
        "--eval-every", "0", "--checkpoint-every", "0", "--device", "cpu"]  # fmt: skip


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(args)
    found = capsys.readouterr()
    return int(exc.value.code or 0), found.out + found.err


@pytest.fixture(scope="module")
def shipping(tmp_path_factory: pytest.TempPathFactory, anchor_dir: Path) -> Path:
    """A copy of the tiny anchor that ships two rivals."""
    anchor = tmp_path_factory.mktemp("shipping") / "anchor"
    shutil.copytree(anchor_dir, anchor)
    with pytest.raises(SystemExit) as exc:
        main(["anchor", "rivals", "--anchor", str(anchor), "--license", "CC0-1.0", *TINY])
    assert exc.value.code in (0, None)
    return anchor


def _names(slots: list) -> list[str]:
    return [s.name for s in slots]


def _manifest(package: Path) -> dict:
    return json.loads((package / MANIFEST_FILE).read_text())


def test_rivals_split_the_public_text_and_ship_in_the_anchor(
    shipping: Path, public_spec, corpus_dir: Path
) -> None:
    found = shipped_rivals(shipping)
    assert [p.name for p in found] == ["public-0", "public-1"]
    assert sorted(p.name for p in (shipping / RIVALS_DIR).iterdir()) == ["public-0", "public-1"]
    counts = []
    for package in found:
        manifest = _manifest(package)
        assert manifest["owner"] == "coordinator" and manifest["license"] == "CC0-1.0"
        counts.append(int(manifest["description"].split("(")[1].split()[0]))
        assert manifest["training"]["rivals"] == []  # not against each other
    assert sum(counts) == len(load_splits([public_spec]).train) and min(counts) > 0


def test_rivals_are_not_replaced_without_force_and_a_failure_leaves_none(
    shipping: Path, tmp_path: Path, anchor_dir: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    before = (shipping / RIVALS_DIR / "public-0" / MANIFEST_FILE).read_bytes()
    code, said = _cli(["anchor", "rivals", "--anchor", str(shipping), "--license", "MIT", *TINY],
                      capsys)  # fmt: skip
    assert code == 2
    assert said.strip() == (
        f"flexmoe: error: {shipping / RIVALS_DIR}: the anchor already ships rivals; "
        "pass --force to replace them"
    )
    assert (shipping / RIVALS_DIR / "public-0" / MANIFEST_FILE).read_bytes() == before

    import flexmoe.expert.rival_training as train

    fresh = tmp_path / "anchor"
    shutil.copytree(anchor_dir, fresh)
    real, calls = train.train_expert, []

    def second_fails(spec, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(spec.identity.name)
        if len(calls) == 2:
            raise FlexMoEError("public-1", "disk full")
        return real(spec, **kwargs)

    monkeypatch.setattr(train, "train_expert", second_fails)
    code, said = _cli(["anchor", "rivals", "--anchor", str(fresh), "--license", "MIT", *TINY],
                      capsys)  # fmt: skip
    assert code == 2 and "disk full" in said and calls == ["public-0", "public-1"]
    assert not (fresh / RIVALS_DIR).exists() and shipped_rivals(fresh) == []
    assert sorted(p.name for p in fresh.iterdir()) == sorted(p.name for p in anchor_dir.iterdir())


def test_owners_train_against_the_shipped_rivals_unless_told_not_to(
    shipping: Path, tmp_path: Path, corpus_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    owner = ["expert", "train", "--anchor", str(shipping), "--data",
             f"upper={corpus_dir / 'other.jsonl'}", "--owner", "org", "--license", "MIT", *TINY]  # fmt: skip
    code, said = _cli([*owner, "--out", str(tmp_path / "with")], capsys)
    assert code == 0, said
    used = _manifest(tmp_path / "with")["training"]
    shipped = [(p / MANIFEST_FILE).read_bytes() for p in shipped_rivals(shipping)]
    assert used["rivals"] == [  # a typed list in the manifest: each rival's name and version
        {"name": f"public-{i}", "version": rival_version(hashlib.sha256(raw).hexdigest())}
        for i, raw in enumerate(shipped)
    ]
    assert used["rival_top_k"] == 3 and "rivals" not in used["hyperparameters"]
    code, said = _cli([*owner, "--out", str(tmp_path / "without"), "--no-rivals"], capsys)
    assert code == 0, said
    used = _manifest(tmp_path / "without")["training"]
    assert used["rivals"] == [] and used["rival_top_k"] == 0
    code, said = _cli([*owner, "--out", str(tmp_path / "both"), "--no-rivals", "--rival",
                       str(shipped_rivals(shipping)[0])], capsys)  # fmt: skip
    assert code == 2 and said.strip() == "flexmoe: error: --no-rivals: contradicts --rival"
    assert not (tmp_path / "both").exists()
    # DP-SGD trains the two-expert model: the shipped rivals are left out, given ones refused
    assert resolve_rivals(shipping, None, private=True) == []
    assert resolve_rivals(shipping, None, private=False) == shipped_rivals(shipping)

    # the owner's own model (btm's member, its specialist) is the one it trained: with rivals
    anchor, package = load_anchor(shipping), load_package(tmp_path / "with")
    specialist = build_specialist(anchor, package)
    moe = moe_layers(specialist)[1]
    assert moe.num_experts == 4 and moe.top_k == 3
    rival = load_package(shipped_rivals(shipping)[1])
    assert torch.equal(moe.experts[3].down_proj.weight, rival.tensors["layers.1.down_proj.weight"])
    assert torch.equal(moe.router.rows[1], package.tensors["layers.1.router"])
    assert moe_layers(build_specialist(anchor, load_package(tmp_path / "without")))[1].top_k == 2
    bare = tmp_path / "bare"
    shutil.copytree(shipping, bare, ignore=shutil.ignore_patterns(RIVALS_DIR))
    with pytest.raises(
        FlexMoEError, match="trained against the rival 'public-0', which the anchor"
    ):
        build_specialist(load_anchor(bare), package)

    merge = ["merge", "--anchor", str(shipping), "--expert", str(tmp_path / "with")]
    code, said = _cli([*merge, "--out", str(tmp_path / "merged")], capsys)
    assert code == 0, said
    assert _names(read_slots(tmp_path / "merged")) == ["public", "public-0", "public-1", "upper"]
    code, said = _cli([*merge, "--out", str(tmp_path / "alone"), "--no-rivals"], capsys)
    assert code == 0, said
    assert _names(read_slots(tmp_path / "alone")) == ["public", "upper"]
    rival = str(shipped_rivals(shipping)[1])  # named as well: one slot, not two
    code, said = _cli([*merge, "--expert", rival, "--out", str(tmp_path / "named")], capsys)
    assert code == 0, said
    assert sorted(_names(read_slots(tmp_path / "named"))) == ["public", "public-0", "public-1",
                                                              "upper"]  # fmt: skip
    assert "warning" not in said

    # the coordinator trains its rivals again: the owner's model no longer matches them
    moved = tmp_path / "moved"
    shutil.copytree(shipping, moved)
    code, said = _cli(["anchor", "rivals", "--anchor", str(moved), "--license", "CC0-1.0",
                       *TINY, "--steps", "3", "--force"], capsys)  # fmt: skip
    assert code == 0, said
    with pytest.raises(FlexMoEError, match="another version of the rival 'public-0' than the"):
        build_specialist(load_anchor(moved), package)
    code, said = _cli(["merge", "--anchor", str(moved), "--expert", str(tmp_path / "with"),
                       "--out", str(tmp_path / "stale")], capsys)  # fmt: skip
    assert (
        code == 0
        and (
            f"flexmoe: warning: {tmp_path / 'with'}: trained against another version of the rival "
            "'public-0' than the anchor ships; the merge keeps the anchor's (--no-rivals: none)"
        )
        in said
    )
    code, said = _cli(["merge", "--anchor", str(moved), "--expert", str(tmp_path / "without"),
                       "--out", str(tmp_path / "older")], capsys)  # fmt: skip
    assert code == 0 and "trained against rivals [], the anchor ships [public-0, public-1]" in said


def test_owners_train_against_the_rivals_at_the_merges_top_k() -> None:
    from flexmoe.expert.rivals import RIVAL_TOP_K
    from flexmoe.merge import DEFAULT_TOP_K

    assert RIVAL_TOP_K == DEFAULT_TOP_K


def test_a_package_made_before_the_typed_list_reads_its_rivals_from_the_hyperparameters() -> None:
    from flexmoe.expert.manifest import RivalUse, TrainingSummary

    hyperparameters = {
        "lr": 0.001,
        "rivals": "public-0,public-1",
        "rival_manifests": "0123456789abcdef",
        "rival_top_k": 3,
    }
    older = {
        "steps": 2,
        "tokens": 64,
        "final_train_loss": 5.0,
        "final_val_loss": None,
        "seed": 0,
        "hyperparameters": hyperparameters,
    }
    summary = TrainingSummary.model_validate(older)
    assert summary.rivals == [
        RivalUse(name="public-0", version="0123456789abcdef"),
        RivalUse(name="public-1", version=None),
    ]
    assert summary.rival_top_k == 3 and summary.hyperparameters == {"lr": 0.001}
    none = TrainingSummary.model_validate({**older, "hyperparameters": {"rivals": ""}})
    assert none.rivals == [] and none.rival_top_k == 0
