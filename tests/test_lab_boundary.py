"""The lab sits on top of the library: the library never imports it (the old command names
only start its command); its settings are data that validate themselves."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

import flexmoe
import flexmoe_lab
from flexmoe.errors import FlexMoEError
from flexmoe_lab.settings import load_settings

SRC = Path(flexmoe.__file__).parent
LAB = Path(flexmoe_lab.__file__).parent


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_library_never_imports_the_lab() -> None:
    offenders = [
        str(path.relative_to(SRC))
        for path in SRC.rglob("*.py")
        if any(m.split(".")[0] == "flexmoe_lab" for m in _imports(path))
    ]
    assert offenders == []
    assert not (SRC / "experiment").exists()


def test_the_lab_uses_the_library_public_names_only() -> None:
    private = [
        f"{path.name}: {node.module}.{alias.name}"
        for path in LAB.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("flexmoe.")
        for alias in node.names
        if alias.name.startswith("_")
    ]
    assert private == []


def test_shipped_settings_load() -> None:
    full, quick = load_settings("full"), load_settings("quick")
    assert quick.expert.steps < full.expert.steps
    assert full.to_dict()["expert"]["z_loss"] == pytest.approx(1e-3)


def test_bad_settings_name_the_file_and_the_fault(tmp_path: Path) -> None:
    good = json.loads((LAB / "settings.json").read_text())["quick"]
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"quick": {**good, "epochs": 3}, "tiny": {"vocab_size": 8}}))
    with pytest.raises(FlexMoEError, match=r"settings.json:quick: unknown fields: epochs"):
        load_settings("quick", path)
    with pytest.raises(FlexMoEError, match=r"tiny: incomplete or malformed settings"):
        load_settings("tiny", path)
    with pytest.raises(FlexMoEError, match=r"no settings named 'full'"):
        load_settings("full", path)
