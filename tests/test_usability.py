"""The tool in users' hands: one data syntax, the public share from the anchor, defaults defined
once, config files, --json, --quiet, help on every option, TensorBoard logs and model cards."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import typer
from helpers import train_packages

from flexmoe.anchor import ANCHOR_MANIFEST
from flexmoe.cli import app, main
from flexmoe.data.public import find_public_corpus
from flexmoe.errors import FlexMoEError
from flexmoe.expert.package import load_package
from flexmoe.io import read_json, write_json
from flexmoe.merge import DEFAULT_TOP_K
from flexmoe.training.config import (
    ANCHOR_TRAINING,
    EXPERT_TRAINING,
    ROUTER_TUNING,
    UNRESTRICTED_TRAINING,
    TrainConfig,
)

TINY = ["--steps", "2", "--batch-size", "4", "--seq-len", "32", "--eval-every", "0",
        "--checkpoint-every", "0", "--device", "cpu"]  # fmt: skip


def cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run the command line in this process: exit code, stdout, stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(args)
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


def expert(anchor: Path, out: Path, *args: str) -> list[str]:
    return ["expert", "train", "--anchor", str(anchor), "--owner", "Upper Org", "--license",
            "MIT", "--out", str(out), *TINY, *args]  # fmt: skip


def _commands() -> dict[str, Any]:
    """Every command's click object by its name (typer may bring its own click)."""
    root: Any = typer.main.get_command(app)
    found: dict[str, Any] = {}
    for name, command in root.commands.items():
        found[name] = command
        for sub, c in getattr(command, "commands", {}).items():
            found[f"{name} {sub}"] = c
    return found


# --- One data syntax; the public share travels with the anchor ---


def test_expert_takes_domain_files_and_the_anchors_public_corpus(
    tmp_path: Path, anchor_dir: Path, corpus_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    upper = corpus_dir / "other.jsonl"
    code, out, _ = cli(expert(anchor_dir, tmp_path / "a", "--data", f"upper={upper}", "--json"),
                       capsys)  # fmt: skip
    assert code == 0
    summary = json.loads(out)
    assert summary["name"] == "upper" and summary["steps"] == 2
    manifest = load_package(tmp_path / "a").manifest
    assert manifest.name == "upper"
    # No --public-data: the anchor's public corpus is mixed in at the default share.
    assert manifest.training.hyperparameters["public_fraction"] == 0.25

    code, _, _ = cli(expert(anchor_dir, tmp_path / "b", "--data", str(upper), "--name", "upper",
                            "--no-public-data"), capsys)  # fmt: skip
    assert code == 0
    assert load_package(tmp_path / "b").manifest.training.hyperparameters["public_fraction"] == 0
    # The options become one typed spec; a part that does not fit is one line naming it.
    args = expert(
        anchor_dir, tmp_path / "c", "--data", f"upper={upper}", "--public-fraction", "1.5"
    )
    code, _, err = cli(args, capsys)
    assert code == 2 and not (tmp_path / "c").exists()
    assert err.strip() == "flexmoe: error: public.fraction: Input should be less than 1"


def test_public_data_takes_comma_lists_and_warns_of_another_corpus(
    tmp_path: Path, anchor_dir: Path, corpus_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    both = f"{corpus_dir / 'public.jsonl'},{corpus_dir / 'other.jsonl'}"
    args = expert(anchor_dir, tmp_path / "p", "--data", f"upper={corpus_dir / 'other.jsonl'}",
                  "--public-data", both)  # fmt: skip
    code, _, err = cli(args, capsys)
    assert code == 0, err
    assert "not the anchor's public corpus (1 of 1 recorded files given, 1 others)" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "upper=X", "--name", "low"], "domain 'upper' is not the expert's --name 'low'"),
        (["--data", "a=X", "--data", "b=X"], "an expert trains on one domain, got 2: a, b"),
        (["--data", "=X"], "expected DOMAIN=FILES or FILES, got '=X'"),
    ],
)
def test_expert_data_mistakes_are_one_line(
    tmp_path: Path, anchor_dir: Path, corpus_dir: Path, capsys: pytest.CaptureFixture[str],
    args: list[str], message: str,
) -> None:  # fmt: skip
    args = [a.replace("X", str(corpus_dir / "other.jsonl")) for a in args]
    message = message.replace("X", str(corpus_dir / "other.jsonl"))
    code, _, err = cli(expert(anchor_dir, tmp_path / "x", *args), capsys)
    assert code == 2
    assert err.strip().splitlines() == [f"flexmoe: error: --data: {message}"]
    assert not (tmp_path / "x").exists()


def test_public_corpus_is_found_shipped_with_the_anchor_and_checked(
    tmp_path: Path, anchor_dir: Path, corpus_dir: Path
) -> None:
    anchor = tmp_path / "anchor"
    shutil.copytree(anchor_dir, anchor)
    manifest = read_json(anchor / ANCHOR_MANIFEST)
    record = manifest["public_data"]["files"][0]
    assert record["path"] == str((corpus_dir / "public.jsonl").resolve())
    record["path"] = str(tmp_path / "elsewhere" / "public.jsonl")  # the coordinator's machine
    write_json(anchor / ANCHOR_MANIFEST, manifest)
    from flexmoe.anchor import open_anchor

    corpus = open_anchor(anchor, verify=False).manifest.public_data
    with pytest.raises(
        FlexMoEError, match=r"not on this machine; copy it to .*public/public\.jsonl"
    ):
        find_public_corpus(anchor, corpus)
    (anchor / "public").mkdir()
    (anchor / "public" / "public.jsonl").write_bytes(b'{"text": "another corpus"}\n')
    with pytest.raises(FlexMoEError, match="differs from the anchor's public corpus"):
        find_public_corpus(anchor, corpus)
    shutil.copy(corpus_dir / "public.jsonl", anchor / "public" / "public.jsonl")
    (spec,) = find_public_corpus(anchor, corpus)
    assert spec.domain == "public" and spec.paths == (str(anchor / "public" / "public.jsonl"),)


# --- Defaults defined once, shown by --help ---


@pytest.mark.parametrize(
    ("command", "defaults"),
    [
        ("anchor train", ANCHOR_TRAINING),
        ("expert train", EXPERT_TRAINING),
        ("router tune", ROUTER_TUNING),
        ("baseline unrestricted", UNRESTRICTED_TRAINING),
    ],
)
def test_training_options_come_from_the_config(command: str, defaults: TrainConfig) -> None:
    params = {p.name: p for p in _commands()[command].params}
    for f in fields(TrainConfig):
        if f.name in params:
            assert params[f.name].default == getattr(defaults, f.name), (command, f.name)
            assert params[f.name].help == f.metadata["help"]
    assert {"steps", "lr", "seq_len", "batch_size", "seed", "config"} <= set(params)


def test_top_k_default_is_one_constant(capsys: pytest.CaptureFixture[str]) -> None:
    from flexmoe_lab.settings import SETTINGS_FILE, load_settings

    code, out, _ = cli(["merge", "--help"], capsys)
    assert code == 0 and f"default: ({DEFAULT_TOP_K}, or every expert when" in " ".join(out.split())
    assert load_settings("full").top_k == load_settings("quick").top_k == DEFAULT_TOP_K
    assert all("top_k" not in s for s in json.loads(SETTINGS_FILE.read_text()).values())
    params = {p.name: p for p in _commands()["baseline unrestricted"].params}
    assert params["top_k"].default == DEFAULT_TOP_K


def test_every_option_has_help() -> None:
    missing = [
        f"{name} {p.opts[0]}"
        for name, command in _commands().items()
        for p in command.params
        if p.param_type_name == "option" and not (p.help or "").strip()
    ]
    assert missing == []


# --- Config files ---


def test_config_file_with_flags_overriding(
    tmp_path: Path, anchor_dir: Path, corpus_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "run.toml"
    config.write_text(
        f'anchor = "{anchor_dir}"\ndata = ["upper={corpus_dir / "other.jsonl"}"]\n'
        f'owner = "Upper Org"\nlicense = "MIT"\nout = "{tmp_path / "pkg"}"\n'
        "steps = 3\nbatch-size = 4\nseq_len = 32\nlr = 0.005\neval_every = 0\n"
        'checkpoint_every = 0\ndevice = "cpu"\nno-public-data = true\njson = true\n'
    )
    assert tomllib.loads(config.read_text())["steps"] == 3
    code, out, err = cli(["expert", "train", "--config", str(config), "--steps", "2"], capsys)
    assert code == 0, err
    assert json.loads(out)["steps"] == 2  # `json` is the flag's name for `as_json`
    hyper = load_package(tmp_path / "pkg").manifest.training.hyperparameters
    assert hyper["steps"] == 2  # the flag wins
    assert hyper["lr"] == 0.005 and hyper["batch_size"] == 4  # the file's
    assert hyper["public_fraction"] == 0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("stepz = 3\n", "unknown option 'stepz' for this command (see --help)"),
        ("steps = [1, 2]\n", "steps: takes one value, got a list"),
        ("[training]\nsteps = 3\n", "training: expected a value, got a table"),
        ("steps = \n", "not valid TOML"),
    ],
)
def test_config_file_mistakes_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    config = tmp_path / "run.toml"
    config.write_text(text)
    code, _, err = cli(["anchor", "train", "--config", str(config)], capsys)
    assert code == 2
    (line,) = err.strip().splitlines()
    assert line.startswith(f"flexmoe: error: {config}: {message}")


# --- --json, --quiet, TensorBoard ---


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory, anchor_dir: Path, corpus_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("merged")
    packages = train_packages(root, anchor_dir, corpus_dir, licenses=("MIT", "Apache-2.0"))
    args = ["merge", "--anchor", str(anchor_dir), "--out", str(root / "m")]
    for p in packages:
        args += ["--expert", str(p)]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code in (0, None)
    return root


def test_json_on_result_commands(
    tmp_path: Path, merged: Path, anchor_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from flexmoe.serve.ledger import Ledger

    model = tmp_path / "m"
    shutil.copytree(merged / "m", model)
    book = Ledger(model)
    book.record("r1", endpoint="completions", prompt_tokens=3, completion_tokens=4,
                shares={"public": 0.5, "upper": 0.5})  # fmt: skip
    book.close()

    def run(*args: str) -> Any:
        code, out, err = cli([*args, "--json"], capsys)
        assert code == 0, err
        return json.loads(out)

    listed = run("members", "list", str(model))
    assert [e["name"] for e in listed["experts"]] == ["public", "upper", "again"]
    assert listed["experts"][1]["opted_out"] is False and listed["router_tuning"] is None
    verified = run("expert", "verify", str(merged / "upper"), "--anchor", str(anchor_dir))
    assert verified["sound"] is True
    plan = run("merge", "--anchor", str(anchor_dir), "--expert", str(merged / "upper"),
               "--out", str(tmp_path / "no"), "--dry-run")  # fmt: skip
    assert plan["top_k"] == 2 and plan["out"] is None and not (tmp_path / "no").exists()
    assert [s["expert"] for s in plan["slots"]] == ["public", "upper"]
    assert run("ledger", str(model))[0]["responses"] == 1
    assert run("members", "opt-out", str(model), "upper") == {"expert": "upper", "opted_out": True}
    assert run("tokens", "list", str(model)) == []
    made = run("tokens", "add", str(model), "upper")
    assert made["expert"] == "upper" and made["token"].startswith("fmx_upper_")
    assert [r["expert"] for r in run("tokens", "list", str(model))] == ["upper"]


def test_quiet_and_tqdm_disable_silence_progress(
    tmp_path: Path, anchor_dir: Path, corpus_dir: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.delenv("TQDM_DISABLE", raising=False)  # restored after; --quiet sets it

    def stderr(name: str, *extra: str) -> str:
        args = expert(anchor_dir, tmp_path / name, "--data",
                      f"upper={corpus_dir / 'other.jsonl'}", "--no-public-data")  # fmt: skip
        code, _, err = cli([*extra, *args], capsys)
        assert code == 0, err
        return err

    default = stderr("default")
    assert "step/s" in default or "s/step" in default  # the bar is drawn by default
    monkeypatch.setenv("TQDM_DISABLE", "1")
    quiet = [stderr("tqdm-disable")]
    monkeypatch.delenv("TQDM_DISABLE")
    quiet.append(stderr("quiet", "--quiet"))
    for err in quiet:
        assert "step/s" not in err and "s/step" not in err and "%|" not in err


def test_log_dir_writes_tensorboard_events(
    tmp_path: Path, anchor_dir: Path, corpus_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = expert(anchor_dir, tmp_path / "pkg", "--data", f"upper={corpus_dir / 'other.jsonl'}",
                  "--log-dir", str(tmp_path / "runs"), "--steps", "3")  # fmt: skip
    code, _, err = cli(args, capsys)
    assert code == 0, err
    (run,) = (tmp_path / "runs").iterdir()
    events = EventAccumulator(str(run))
    events.Reload()
    assert {"train/loss", "train/lr", "train/tokens_per_second", "val/loss"} <= set(
        events.Tags()["scalars"]
    )
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
    history = load_package(tmp_path / "pkg").manifest.training
    assert events.Scalars("train/loss")[-1].value == pytest.approx(history.final_train_loss)


# --- Model cards ---


def _card(directory: Path) -> tuple[dict[str, Any], str]:
    from huggingface_hub import ModelCard

    card = ModelCard.load(directory / "README.md")
    return card.data.to_dict(), card.text


def test_model_cards_in_anchor_and_merged_follow_edits(
    tmp_path: Path, merged: Path, anchor_dir: Path, corpus_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    meta, text = _card(anchor_dir)
    assert meta["library_name"] == "transformers" and "flexmoe" in meta["tags"]
    assert "1 file(s)" in text

    meta, text = _card(merged / "m")
    assert meta["license"] == "other" and meta["license_name"] == "Apache-2.0 AND MIT"
    assert meta["base_model"] == anchor_dir.name and "mixture-of-experts" in meta["tags"]
    assert "| 1 | upper | upper org | MIT |" in text and "| 2 | again | again org |" in text

    one = tmp_path / "one"
    code, _, err = cli(["merge", "remove", str(merged / "m"), "again", "--out", str(one)], capsys)
    assert code == 0, err
    meta, text = _card(one)
    assert meta["license"] == "mit" and "| again |" not in text
    code, _, err = cli(["merge", "add", str(one), str(merged / "again")], capsys)
    assert code == 0, err
    meta, text = _card(one)
    assert meta["license"] == "other" and "| 2 | again | again org | Apache-2.0 |" in text


def test_card_cells_cannot_break_the_table() -> None:
    from flexmoe.card import cell as _cell

    assert _cell("a|b\n<script>") == "a\\|b &lt;script&gt;"


LIGHT = """
import sys
from flexmoe.cli import main

for argv in ({commands}):
    sys.argv = ["flexmoe", *argv]
    try:
        main()
    except SystemExit as e:
        assert e.code in (0, None), (argv, e.code)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
print("heavy:", heavy[:5])
"""


def test_metadata_commands_do_not_load_torch(ui_model: Path, tmp_path: Path) -> None:
    """Listing the experts, an owner's opt-out and opt-in, and the tokens' list read and change
    only metadata: they must not import torch or transformers (seconds of CPU each;
    benchmarks/cli_startup.py times them)."""
    import subprocess
    import sys

    model = str(shutil.copytree(ui_model, tmp_path / "model"))
    commands = [
        ["members", "list", model],
        ["members", "opt-out", model, "upper", "--reason", "test"],
        ["members", "opt-in", model, "upper"],
        ["tokens", "list", model],
        ["--help"],
    ]
    script = LIGHT.format(commands=", ".join(repr(c) for c in commands))
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "heavy: []" in done.stdout, done.stdout[-2000:]


def test_old_option_spellings_still_work_with_a_one_line_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--key` (expert sign, fed simulate, fed join) is now `--signing-key`, `--owner
    NAME=FILES` (fed simulate, fed join, baseline fedavg) `--data`, and `eval ppl --model` and
    `eval baselines --merged` the positional MODEL: the old spelling is read as the new one, with
    one warning line; the new one warns of nothing."""
    from flexmoe.cli import renamed
    from flexmoe.cli.vocabulary import renamed_key

    with pytest.warns(FutureWarning, match="--key is now --signing-key"):
        new = renamed(["fed", "simulate", "M", "--key=a=k"])
    assert new == ["fed", "simulate", "M", "--signing-key=a=k"]
    assert renamed(["merge", "--key", "x"]) == ["merge", "--key", "x"]  # not renamed there
    with pytest.warns(FutureWarning, match="--owner is now --data"):
        assert renamed(["baseline", "fedavg", "--owner", "a=f"])[2] == "--data"
    owner = ["expert", "train", "--owner", "Law Firm"]  # there, --owner is the organisation
    assert renamed(owner) == owner
    with pytest.warns(FutureWarning, match="--model is now the positional MODEL"):
        ppl = renamed(["eval", "ppl", "--model", "M", "--data", "x"])
    assert ppl == ["eval", "ppl", "M", "--data", "x"]
    with pytest.warns(FutureWarning, match="--merged is now the positional MODEL"):
        assert renamed(["eval", "baselines", "--merged=M"]) == ["eval", "baselines", "M"]
    # DP options are named for what they protect: one record (expert train), one owner (fed)
    with pytest.warns(FutureWarning, match="--dp-clip-(router|trunk) is now --dp-clip"):
        clip = renamed(["fed", "serve", "M", "--dp-clip-router", "0.3", "--dp-clip-trunk=2"])
    assert clip == ["fed", "serve", "M", "--dp-clip", "router=0.3", "--dp-clip=trunk=2"]
    with pytest.warns(FutureWarning, match="--dp-epsilon is now --dp-owner-epsilon"):
        assert renamed(["fed", "simulate", "--dp-epsilon", "8"])[2] == "--dp-owner-epsilon"
    with pytest.warns(FutureWarning, match="--dp-epsilon is now --dp-record-epsilon"):
        assert renamed(["expert", "train", "--dp-epsilon=8"])[2] == "--dp-record-epsilon=8"
    with pytest.warns(FutureWarning, match="--dp-clip-trunk is now --dp-clip"):
        assert renamed_key("fed simulate", "dp_clip_trunk", 2.0) == ("dp-clip", "trunk=2.0")
    assert renamed_key("fed simulate", "rounds", 3) == ("rounds", 3)
    # groups named for what they hold: members, keys, tokens (was experts and owners)
    for old, new in (
        (["-q", "experts", "list", "M"], ["-q", "members", "list", "M"]),
        (["owners", "revoke-key", "R", "ab12"], ["keys", "revoke", "R", "ab12"]),
        (["owners", "add", "M", "upper"], ["tokens", "add", "M", "upper"]),
    ):
        words = [w for w in old if not w.startswith("-")][:2]
        with pytest.warns(FutureWarning, match=f"flexmoe {' '.join(words)} is now"):
            assert renamed(old) == new
    assert renamed(["expert", "train", "--owner", "x"]) == ["expert", "train", "--owner", "x"]
    missing = str(tmp_path / "nokey")
    for spelling, warned in (("--key", True), ("--signing-key", False)):
        with pytest.raises(SystemExit) as e:
            main(["expert", "sign", str(tmp_path), spelling, missing])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"{missing}: file not found" in err
        assert ("warning: --key is now --signing-key" in err) == warned


def test_serve_listens_on_host_port_and_still_takes_the_old_host_and_port() -> None:
    from flexmoe.cli.coordinator import _listen

    assert _listen("0.0.0.0:9000", None, None) == ("0.0.0.0", 9000)
    with pytest.warns(FutureWarning, match="--host and --port are now --listen HOST:PORT"):
        assert _listen("127.0.0.1:8000", None, 8123) == ("127.0.0.1", 8123)
    with pytest.raises(FlexMoEError, match="--listen: expected HOST:PORT, got '8000'"):
        _listen("8000", None, None)


def test_the_lab_commands_old_names_hand_over_to_flexmoe_lab() -> None:
    """`flexmoe demo`, `flexmoe report` and `flexmoe data demo` moved to `flexmoe-lab`: the old
    names warn in one line and run it with the same arguments (its help here, and its one-line
    error for a bad corpus set name, exit code 2)."""
    for old, new in ((["demo"], "demo"), (["report"], "report"), (["data", "demo"], "corpora")):
        done = subprocess.run(
            [sys.executable, "-m", "flexmoe", *old, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert f"flexmoe {' '.join(old)} is now flexmoe-lab {new}" in done.stderr
        assert done.stderr.count("\n") == 1 and "flexmoe-lab" in done.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "flexmoe", "data", "demo", "--corpora", "nope"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("flexmoe-lab:")
