"""Differentially private expert training: DP-SGD through Opacus (issue 15, part 3)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import train_packages
from safetensors.torch import load_file
from test_hostile import _refused, main_ok

from flexmoe.anchor import load_anchor
from flexmoe.cli import main
from flexmoe.errors import FlexMoEError
from flexmoe.expert.manifest import (
    MANIFEST_FILE,
    TENSORS_FILE,
    PrivacyRecord,
    accountant_epsilon,
    read_manifest,
)
from flexmoe.expert.private import PrivacySettings, PrivateRouter, _register
from flexmoe.expert.train import build_trainable_moe
from flexmoe.model.checkpoint import moe_layers
from flexmoe.training.loop import next_token_loss


def _train_args(anchor_dir: Path, corpus_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "expert", "train", "--anchor", str(anchor_dir), "--data", str(corpus_dir / "other.jsonl"),
        "--name", "upper", "--owner", "upper org", "--license", "MIT", "--out", str(out),
        "--steps", "6", "--batch-size", "2", "--seq-len", "32", "--warmup-steps", "1",
        "--eval-every", "0", "--checkpoint-every", "0", "--device", "cpu", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def dp_package(
    tmp_path_factory: pytest.TempPathFactory, anchor_dir: Path, corpus_dir: Path
) -> Path:
    out = tmp_path_factory.mktemp("dp") / "upper"
    with pytest.raises(SystemExit) as done:
        main(
            _train_args(
                anchor_dir,
                corpus_dir,
                out,
                "--dp-record-epsilon",
                "8",
                "--dp-record-delta",
                "1e-4",
                "--dp-clip",
                "0.5",
            )
        )
    assert done.value.code in (0, None)
    return out


def test_a_dp_package_records_the_accountants_epsilon(dp_package: Path) -> None:
    training = read_manifest(dp_package).training
    privacy = training.privacy
    assert privacy is not None
    assert training.hyperparameters["router_objective"] == 0.0  # off by default under DP-SGD
    assert privacy.target_epsilon == 8 and privacy.delta == 1e-4 and privacy.max_grad_norm == 0.5
    assert privacy.steps == 6 and privacy.noise_multiplier > 0 and privacy.unit_tokens == 33
    # The manifest's epsilon is what a fresh accountant gives for those terms, within budget.
    assert privacy.epsilon == pytest.approx(accountant_epsilon(privacy), rel=1e-9)
    assert 0 < privacy.epsilon <= 8 * 1.001


def test_a_dp_package_verifies_and_merges(
    dp_package: Path, anchor_dir: Path, corpus_dir: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    with pytest.raises(SystemExit):
        main(["expert", "verify", str(dp_package), "--anchor", str(anchor_dir)])
    out = capsys.readouterr().out
    assert "DP-SGD: epsilon" in out and "package is sound" in out
    other = train_packages(tmp_path / "plain", anchor_dir, corpus_dir)[1]  # "again"
    merged = tmp_path / "merged"
    main_ok(["merge", "--anchor", str(anchor_dir), "--expert", str(dp_package), "--expert",
             str(other), "--out", str(merged)], capsys)  # fmt: skip
    epsilon = read_manifest(dp_package).training.privacy.epsilon  # type: ignore[union-attr]
    with pytest.raises(SystemExit):
        main(["members", "list", str(merged)])
    listing = capsys.readouterr().out.splitlines()
    assert "DP eps" in listing[0]
    assert f"{epsilon:.3g}" in next(line for line in listing if " upper " in line)
    assert " - " in next(line for line in listing if " again " in line)


def test_a_manifest_cannot_claim_a_smaller_epsilon(
    dp_package: Path, anchor_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "pkg"
    shutil.copytree(dp_package, bad)
    manifest = json.loads((bad / MANIFEST_FILE).read_text())
    manifest["training"]["privacy"]["epsilon"] = 0.5
    (bad / MANIFEST_FILE).write_text(json.dumps(manifest))
    line = _refused(["expert", "verify", str(bad), "--anchor", str(anchor_dir)], capsys)
    assert "training.privacy.epsilon" in line and "pkg" in line


def test_dp_noise_and_sampling_do_not_follow_the_seed(
    dp_package: Path, anchor_dir: Path, corpus_dir: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """Anyone can read --seed in the manifest; noise derived from it could be subtracted. (The
    second run spells the options the old way, which still works, with one warning each.)"""
    again = tmp_path / "again"
    with pytest.raises(SystemExit) as done:
        main(
            _train_args(
                anchor_dir,
                corpus_dir,
                again,
                "--dp-epsilon",
                "8",
                "--dp-delta",
                "1e-4",
                "--max-grad-norm",
                "0.5",
            )
        )
    assert done.value.code in (0, None)
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning:" in line]
    assert warned == [
        f"flexmoe: warning: {old} is now {new}; the old spelling goes in the next release"
        for old, new in (
            ("--dp-epsilon", "--dp-record-epsilon"),
            ("--dp-delta", "--dp-record-delta"),
            ("--max-grad-norm", "--dp-clip"),
        )
    ]
    records = [read_manifest(d).training.privacy for d in (dp_package, again)]
    assert records[0] == records[1]  # the same settings, read from either spelling
    first, second = load_file(dp_package / TENSORS_FILE), load_file(again / TENSORS_FILE)
    key = "layers.0.down_proj.weight"
    assert not torch.equal(first[key], second[key])


def test_dp_settings_are_checked(
    anchor_dir: Path, corpus_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for extra, words in (
        (["--dp-record-epsilon", "0"], "--dp-record-epsilon"),
        (["--dp-record-epsilon", "1", "--dp-record-delta", "1.5"], "--dp-record-delta"),
        (["--dp-record-epsilon", "1", "--dp-clip", "-1"], "--dp-clip"),
        (["--dp-record-epsilon", "1", "--grad-accum", "2"], "--grad-accum"),
        (["--dp-record-epsilon", "1", "--batch-size", "4000"], "--batch-size"),
    ):
        line = _refused(_train_args(anchor_dir, corpus_dir, tmp_path / "x", *extra), capsys)
        assert words in line, line
        assert not (tmp_path / "x").exists()
    with pytest.raises(FlexMoEError):
        PrivacySettings(float("inf"), 1e-5)


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_per_sample_gradients_equal_each_samples_own(anchor_dir: Path) -> None:
    """Opacus' per-sample gradients of the trained tensors (expert 1's projections through its
    linear hooks, r_1 and b_1 through ours) equal each sample's gradient taken alone."""
    from opacus import GradSampleModule

    _register()
    anchor = load_anchor(anchor_dir)
    layers = anchor.config.num_hidden_layers
    rows = torch.randn(layers, anchor.config.hidden_size) * 0.1
    model = build_trainable_moe(anchor.model, anchor.public_router, rows)
    with torch.no_grad():  # a nonzero bias, as after training
        for moe in moe_layers(model):
            moe.router.biases[0].fill_(-0.3)
    for moe in moe_layers(model):
        moe.router = PrivateRouter(moe.router)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    batch = torch.randint(3, anchor.config.vocab_size, (3, 17))
    alone = []
    for i in range(len(batch)):
        model.zero_grad()
        next_token_loss(model, batch[i : i + 1]).backward()
        alone.append([p.grad.clone() for p in params])  # type: ignore[union-attr]
    model.zero_grad()
    wrapped = GradSampleModule(model, loss_reduction="mean")
    next_token_loss(wrapped, batch).backward()
    for j, p in enumerate(params):
        per_sample = p.grad_sample  # type: ignore[attr-defined]
        assert per_sample.shape == (3, *p.shape)
        for i in range(len(batch)):
            torch.testing.assert_close(per_sample[i], alone[i][j], rtol=1e-4, atol=1e-6)
    wrapped._close()


def test_privacy_record_is_range_checked() -> None:
    from pydantic import ValidationError

    good = {"epsilon": 1.0, "target_epsilon": 1.0, "delta": 1e-5, "max_grad_norm": 1.0,
            "noise_multiplier": 1.0, "sample_rate": 0.01, "steps": 10, "unit_tokens": 129}  # fmt: skip
    PrivacyRecord.model_validate(good)
    for field, value in (("epsilon", float("nan")), ("delta", 1.0), ("sample_rate", 0.0),
                         ("noise_multiplier", -1.0), ("steps", -1)):  # fmt: skip
        with pytest.raises(ValidationError):
            PrivacyRecord.model_validate({**good, field: value})
