"""Who an expert belongs to: validated names, owners and license identifiers."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from functools import cache
from typing import Any

from flexmoe.errors import FlexMoEError

MAX_LENGTH = 64


def as_field(check: Callable[[str, str], str], field: str, value: str) -> str:
    """``check(field, value)`` inside a pydantic validator: its one-line fault becomes the
    ValueError that pydantic reports with the file and the field's path."""
    try:
        return check(field, value)
    except FlexMoEError as e:
        raise ValueError(e.fault) from None


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


NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_name(field: str, value: str) -> str:
    """An expert's name, which is also its domain and how users select it: ASCII letters,
    digits, ``.``, ``_`` and ``-``, starting with a letter or digit, at most 64 characters.
    So no look-alike of another name (a Cyrillic ``а`` for a Latin ``a``), no invisible or
    no-break space, nothing a terminal would act on."""
    check_label(field, value)
    if not NAME_PATTERN.fullmatch(value):
        raise FlexMoEError(
            field,
            f"{value!r}: use ASCII letters, digits, '.', '_' and '-' (start with a "
            "letter or digit)",
        )
    return value


def name_key(name: str) -> str:
    """What two names must not share to be told apart: their case-folded form."""
    return name.casefold()


# Scripts whose letters mix in one word of an honest name; anything else mixed is a look-alike.
_SCRIPT_GROUPS = {"HIRAGANA": "CJK", "KATAKANA": "CJK", "HANGUL": "CJK", "CJK": "CJK"}


def _script(char: str) -> str | None:
    """The script of a letter, from its Unicode name (``LATIN``, ``CYRILLIC``...); None for
    digits, punctuation and marks."""
    if not unicodedata.category(char).startswith("L"):
        return None
    script = unicodedata.name(char, "UNKNOWN").split()[0]
    return _SCRIPT_GROUPS.get(script, script)


def check_owner(field: str, value: str) -> str:
    """An owner's name (any language, 1-64 characters) with no word that mixes scripts: "Вank"
    with a Cyrillic В is how a look-alike of "Bank" is spelled, never an honest name."""
    check_label(field, value)
    for word in value.split():
        scripts = {s for s in map(_script, word) if s is not None}
        if len(scripts) > 1:
            raise FlexMoEError(
                field,
                f"{value!r}: the word {word!r} mixes scripts ({', '.join(sorted(scripts))})"
                "; a look-alike of another name?",
            )
    return value


def owner_key(owner: str) -> str:
    """What two owners' names share when they look alike: compatibility-normalised (NFKC:
    full-width and ligature forms, no-break spaces), case-folded, spaces collapsed."""
    return " ".join(unicodedata.normalize("NFKC", owner).casefold().split())


def refuse_look_alike(where: object, owner: str, others: list[str]) -> None:
    """Refuse ``owner`` when it looks like another owner already in the model but is not it."""
    for other in others:
        if other != owner and owner_key(other) == owner_key(owner):
            raise FlexMoEError(
                str(where),
                f"owner {owner!r} looks like {other!r} but is not the same; one "
                "owner must be spelled one way",
            )


@cache
def _licensing() -> Any:
    from license_expression import get_spdx_licensing

    return get_spdx_licensing()


def check_license(value: str, field: str = "--license") -> str:
    """An SPDX license expression (``MIT``, ``MIT OR Apache-2.0``, ``GPL-2.0-or-later``), checked
    against the SPDX license list through the ``license-expression`` library; custom terms are
    ``LicenseRef-...``. Returns the expression in its normalised spelling."""
    check_label(field, value)
    info = _licensing().validate(value)
    unknown = [s for s in info.invalid_symbols if not s.startswith("LicenseRef-")]
    if unknown or (info.errors and not info.invalid_symbols):
        why = f"unknown license {unknown[0]!r}" if unknown else "not a valid expression"
        raise FlexMoEError(
            field,
            f"{value!r} is not an SPDX license expression ({why}); use SPDX ids such "
            "as MIT or Apache-2.0, or LicenseRef-... for custom terms",
        )
    return str(info.normalized_expression or value)
