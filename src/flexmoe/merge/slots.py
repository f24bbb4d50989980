"""The slot table of a merged model, as read by everything that uses the model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flexmoe.errors import FlexMoEError
from flexmoe.io import read_json
from flexmoe.merge.build import SLOTS_FILE


@dataclass(frozen=True)
class SlotInfo:
    index: int
    name: str
    owner: str
    license: str
    signer: str | None = None  # the signing key's fingerprint, when the package was signed
    epsilon: float | None = None  # DP-SGD's spent epsilon, when trained with it


def read_slots(model_dir: Path) -> list[SlotInfo]:
    """The slot table of a merged model, in slot order."""
    table = read_json(Path(model_dir) / SLOTS_FILE)
    try:
        return [
            SlotInfo(
                s["slot"], s["name"], s["owner"], s["license"],
                signer=(s.get("signer") or {}).get("fingerprint"),
                epsilon=_epsilon(s.get("manifest")),
            )
            for s in table["slots"]
        ]  # fmt: skip
    except (KeyError, TypeError) as e:
        raise FlexMoEError(Path(model_dir) / SLOTS_FILE, f"malformed slot table ({e})") from e


def _epsilon(manifest: dict[str, Any] | None) -> float | None:
    privacy = ((manifest or {}).get("training") or {}).get("privacy")
    return float(privacy["epsilon"]) if privacy else None
