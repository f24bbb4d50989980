"""The slot table of a merged model, as read by everything that uses the model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flexmoe.errors import FlexMoEError
from flexmoe.io import read_json
from flexmoe.merge.build import SLOTS_FILE


@dataclass(frozen=True)
class SlotInfo:
    index: int
    name: str
    owner: str
    license: str


def read_slots(model_dir: Path) -> list[SlotInfo]:
    """The slot table of a merged model, in slot order."""
    table = read_json(Path(model_dir) / SLOTS_FILE)
    try:
        return [SlotInfo(s["slot"], s["name"], s["owner"], s["license"]) for s in table["slots"]]
    except (KeyError, TypeError) as e:
        raise FlexMoEError(Path(model_dir) / SLOTS_FILE, f"malformed slot table ({e})") from e
