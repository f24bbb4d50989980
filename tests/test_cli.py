"""The command line: every subcommand is listed and reachable; errors are one line, exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flexmoe.cli import COMMANDS, app, main


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flexmoe", *args], capture_output=True, text=True, timeout=120
    )


def test_help_lists_every_subcommand() -> None:
    result = _run(["--help"])
    assert result.returncode == 0
    flat = " ".join(result.stdout.split())
    for name in COMMANDS:
        assert f"flexmoe {name}" in flat, name


def test_command_table_matches_registered_commands() -> None:
    registered = {c.name for c in app.registered_commands if not c.hidden}  # old names: hidden
    registered |= {
        f"{g.name} {c.name}"
        for g in app.registered_groups
        for c in g.typer_instance.registered_commands
    }
    registered |= {  # a group that is also a command of its own (``flexmoe merge``)
        g.name
        for g in app.registered_groups
        if g.typer_instance.registered_callback is not None
        and g.typer_instance.registered_callback.invoke_without_command
    }
    assert registered == set(COMMANDS)


@pytest.mark.parametrize("name", list(COMMANDS))
def test_each_subcommand_has_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*name.split(), "--help"])
    assert exc.value.code == 0
    assert "Usage" in capsys.readouterr().out


def test_bad_input_is_one_line_exit_2(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    result = _run(
        ["tokenizer", "train", "--data", f"public={missing}", "--out", str(tmp_path / "t")]
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [f"flexmoe: error: {missing}: file not found"]
    assert not (tmp_path / "t").exists()


def test_debug_shows_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    result = _run(
        ["--debug", "tokenizer", "train", "--data", f"x={missing}", "--out", str(tmp_path / "t")]
    )
    assert result.returncode == 2
    assert "Traceback" in result.stderr


def test_usage_error_exit_2() -> None:
    result = _run(["anchor", "train"])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def test_version() -> None:
    result = _run(["--version"])
    assert result.returncode == 0 and result.stdout.startswith("flexmoe ")


def test_the_command_line_starts_without_torch() -> None:
    """`flexmoe --help` and the option defaults must not pay for importing torch (seconds)."""
    code = "import sys, flexmoe.cli; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
