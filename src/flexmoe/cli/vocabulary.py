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


# Commands renamed so that a group's name says what it holds: the merged model's members, the
# signing-key registry, the server's bearer tokens (``expert`` stays the owner's own package).
COMMANDS_RENAMED = {
    "experts list": "members list",
    "experts opt-out": "members opt-out",
    "experts opt-in": "members opt-in",
    "owners keygen": "keys generate",
    "owners register": "keys register",
    "owners revoke-key": "keys revoke",
    "owners keys": "keys list",
    "owners add": "tokens add",
    "owners revoke": "tokens revoke",
    "owners list": "tokens list",
}


def _warn(old: str, new: str) -> None:
    now = new.split()[0] if new else "the positional MODEL"
    said = f"{old} is now {now}; the old spelling goes in the next release"
    warnings.warn(said, FutureWarning, stacklevel=3)


def renamed(args: list[str]) -> list[str]:
    """``args`` with the command's old option spellings replaced by the new ones, and a
    one-line warning for each old one used."""
    args = _renamed_command(args)
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


def _renamed_command(args: list[str]) -> list[str]:
    """``args`` with an old command name (its first two words) replaced by the new one."""
    at = [i for i, a in enumerate(args) if not a.startswith("-")][:2]
    new = COMMANDS_RENAMED.get(" ".join(args[i] for i in at)) if len(at) == 2 else None
    if new is None:
        return args
    old = " ".join(args[i] for i in at)
    said = f"flexmoe {old} is now flexmoe {new}; the old name goes in the next release"
    warnings.warn(said, FutureWarning, stacklevel=3)
    out = list(args)
    out[at[0]], out[at[1]] = new.split()
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
