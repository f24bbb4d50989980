"""One vocabulary on the command line, and the old spellings that still work for one release.

:data:`RENAMED` holds, per command, each old option and what replaces it: a new option, a new
option with a value prefix (``--dp-clip-router 0.5`` is ``--dp-clip router=0.5``), or ``""`` for
the positional MODEL. :func:`renamed` rewrites a command line and :func:`renamed_key` a
``--config`` key, each with a one-line warning (docs/cli.md, "One vocabulary").
"""

from __future__ import annotations

import warnings

FED_PRIVACY = {  # update-level DP protects one owner: all the updates it sends
    "--dp-epsilon": "--dp-owner-epsilon",
    "--dp-delta": "--dp-owner-delta",
    "--dp-clip-router": "--dp-clip router=",
    "--dp-clip-trunk": "--dp-clip trunk=",
}
RENAMED: dict[str, dict[str, str]] = {
    "expert train": {  # DP-SGD protects one record: one training block of the owner's text
        "--dp-epsilon": "--dp-record-epsilon",
        "--dp-delta": "--dp-record-delta",
        "--max-grad-norm": "--dp-clip",
    },
    "expert sign": {"--key": "--signing-key"},
    "fed simulate": {"--key": "--signing-key", "--owner": "--data", **FED_PRIVACY},
    "fed serve": FED_PRIVACY,
    "fed join": {"--key": "--signing-key", "--owner": "--data"},
    "baseline fedavg": {"--owner": "--data"},
    "eval ppl": {"--model": ""},  # "": now the positional MODEL
    "eval baselines": {"--merged": ""},
}


def _warn(old: str, new: str) -> None:
    now = new.split()[0] if new else "the positional MODEL"
    said = f"{old} is now {now}; the old spelling goes in the next release"
    warnings.warn(said, FutureWarning, stacklevel=3)


def renamed(args: list[str]) -> list[str]:
    """``args`` with the command's old option spellings replaced by the new ones, and a
    one-line warning for each old one used."""
    words = [a for a in args if not a.startswith("-")][:2]
    names = RENAMED.get(" ".join(words)) or RENAMED.get(words[0] if words else "") or {}
    out: list[str] = []
    prefix = ""  # a value prefix for the argument that follows a renamed option
    for arg in args:
        if prefix:
            out.append(prefix + arg)
            prefix = ""
            continue
        option, eq, value = arg.partition("=")
        new = names.get(option)
        if new is None:
            out.append(arg)
            continue
        _warn(option, new)
        new_option, _, value_prefix = new.partition(" ")
        if new_option and eq:
            out.append(f"{new_option}={value_prefix}{value}")
        elif new_option:
            out.append(new_option)
            prefix = value_prefix
        elif eq:
            out.append(value)  # a positional's value alone; "--model X" leaves X to follow
    return out


def renamed_key(command: str, key: str, value: object) -> tuple[str, object]:
    """A ``--config`` key of ``command`` (``"fed simulate"``) and its value as the new
    vocabulary has them (``dp_clip_router = 0.5`` is ``dp_clip = "router=0.5"``)."""
    names = RENAMED.get(command, {})
    old = "--" + key.replace("_", "-")
    new = names.get(old)
    if not new:
        return key, value
    _warn(old, new)
    new_option, _, value_prefix = new.partition(" ")
    return new_option.lstrip("-"), f"{value_prefix}{value}" if value_prefix else value
