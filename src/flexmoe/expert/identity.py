"""Who an expert belongs to: validated names, owners and license identifiers."""

from __future__ import annotations

import unicodedata
import warnings
from functools import cache
from importlib import resources

from flexmoe.errors import FlexMoEError

MAX_LENGTH = 64


def check_label(field: str, value: str) -> str:
    """A name or owner: 1-64 characters, no path separators, no control characters."""
    if not value or not value.strip():
        raise FlexMoEError(field, "must not be empty")
    if len(value) > MAX_LENGTH:
        raise FlexMoEError(field, f"is {len(value)} characters long; at most {MAX_LENGTH} allowed")
    if "/" in value or "\\" in value or value in {".", ".."}:
        raise FlexMoEError(field, f"{value!r} must not contain path separators")
    if any(unicodedata.category(c).startswith("C") for c in value):
        raise FlexMoEError(field, f"{value!r} must not contain control characters")
    return value


@cache
def known_licenses() -> frozenset[str]:
    text = resources.files("flexmoe.expert").joinpath("spdx_ids.txt").read_text(encoding="utf-8")
    return frozenset(line for line in text.splitlines() if line and not line.startswith("#"))


def check_license(value: str) -> str:
    """An SPDX identifier; an unknown one is kept with a warning (custom terms exist)."""
    check_label("--license", value)
    if value not in known_licenses() and not value.startswith("LicenseRef-"):
        warnings.warn(
            f"--license {value!r} is not a known SPDX identifier "
            "(use LicenseRef-... for custom terms)",
            UserWarning,
            stacklevel=2,
        )
    return value
