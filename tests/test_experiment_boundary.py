"""The experiment sits on top of the library: nothing but the CLI imports it; its settings
are data that validate themselves."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

import flexmoe
from flexmoe.errors import FlexMoEError
from flexmoe.experiment.settings import load_settings

SRC = Path(flexmoe.__file__).parent


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_library_never_imports_the_experiment() -> None:
    offenders = [
        str(path.relative_to(SRC))
        for path in SRC.rglob("*.py")
        if not {"cli", "experiment"} & set(path.relative_to(SRC).parts)
        if any(m.startswith("flexmoe.experiment") for m in _imports(path))
    ]
    assert offenders == []


def test_shipped_settings_load() -> None:
    full, quick = load_settings("full"), load_settings("quick")
    assert quick.expert.steps < full.expert.steps
    assert full.to_dict()["expert"]["z_loss"] == pytest.approx(1e-3)


def test_bad_settings_name_the_file_and_the_fault(tmp_path: Path) -> None:
    good = json.loads((SRC / "experiment" / "settings.json").read_text())["quick"]
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"quick": {**good, "epochs": 3}, "tiny": {"vocab_size": 8}}))
    with pytest.raises(FlexMoEError, match=r"settings.json:quick: unknown fields: epochs"):
        load_settings("quick", path)
    with pytest.raises(FlexMoEError, match=r"tiny: incomplete or malformed settings"):
        load_settings("tiny", path)
    with pytest.raises(FlexMoEError, match=r"no settings named 'full'"):
        load_settings("full", path)
