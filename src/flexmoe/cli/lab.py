"""The lab's commands under their old ``flexmoe`` names, for one release.

The demo, its corpus sets and its report moved out of the library into the lab package
(``lab/``, command ``flexmoe-lab``). ``flexmoe demo``, ``flexmoe report`` and ``flexmoe data
demo`` still work: they warn in one line and run ``flexmoe-lab`` with the same arguments. The
library never imports the lab; it only starts its command.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import typer

from flexmoe.cli.common import DEBUG, QUIET
from flexmoe.errors import FlexMoEError

# Every argument, --help included, goes to the lab's command as it was given.
HAND_OVER = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}
LAB = "flexmoe-lab"


def lab_program() -> str | None:
    """The lab's command: on PATH, else beside this Python (a venv that is not activated)."""
    beside = Path(sys.executable).parent / LAB
    return shutil.which(LAB) or (str(beside) if beside.is_file() else None)


def lab_handover(words: list[str], skip: int = 0) -> Callable[[typer.Context], None]:
    """A command that runs ``flexmoe-lab WORDS ARGS`` (dropping the first ``skip`` arguments)."""

    def command(ctx: typer.Context) -> None:
        old = " ".join([ctx.info_name or "", *ctx.args[:skip]])
        new = " ".join([LAB, *words])
        program = lab_program()
        if program is None:
            raise FlexMoEError(
                f"flexmoe {old}",
                f"moved to the lab package: install it (pip install -e lab; `make demo` does) "
                f"and run {new}",
            )
        warnings.warn(
            f"flexmoe {old} is now {new}; the old name goes in the next release",
            FutureWarning,
            stacklevel=1,
        )
        flags = [flag for flag, on in [("--debug", DEBUG["on"]), ("--quiet", QUIET["on"])] if on]
        sys.exit(subprocess.call([program, *flags, *words, *ctx.args[skip:]]))

    return command
