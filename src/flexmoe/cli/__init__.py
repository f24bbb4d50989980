"""The ``flexmoe`` command line: each subcommand parses its arguments and calls one function.

The commands live by role: :mod:`.owner` (data, tokenizer, anchor, expert), :mod:`.coordinator`
(merge, router, members, keys, tokens, serve, ledger, generate) and :mod:`.experiment` (eval,
baseline, audit); :mod:`.common` holds what they share. The demo and its report are the lab's
(``flexmoe-lab``, in ``lab/``); ``flexmoe demo``, ``report`` and ``data demo`` hand over to it.
"""

from __future__ import annotations

import os
import sys
import traceback
import warnings
from typing import Annotated

import typer

from flexmoe import __version__
from flexmoe.cli import coordinator, experiment, federated, owner
from flexmoe.cli.common import DEBUG, QUIET
from flexmoe.cli.lab import HAND_OVER, lab_handover
from flexmoe.cli.vocabulary import renamed
from flexmoe.errors import FlexMoEError

app = typer.Typer(
    name="flexmoe",
    help="Train one language model together without pooling data (the FlexOlmo method).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
for group, name in [
    (owner.tokenizer_app, "tokenizer"),
    (owner.anchor_app, "anchor"),
    (owner.expert_app, "expert"),
    (coordinator.merge_app, "merge"),
    (coordinator.router_app, "router"),
    (coordinator.members_app, "members"),
    (experiment.eval_app, "eval"),
    (experiment.baseline_app, "baseline"),
    (experiment.audit_app, "audit"),
    (coordinator.keys_app, "keys"),
    (coordinator.tokens_app, "tokens"),
    (federated.fed_app, "fed"),
]:
    app.add_typer(group, name=name)
experiment.baseline_app.command("fedavg")(federated.baseline_fedavg)
app.command("generate")(coordinator.generate)
app.command("serve")(coordinator.serve)
# The lab's commands, under their old names for one release (docs/cli.md): each hands its
# arguments to ``flexmoe-lab``, hidden from --help.
for old_name, lab_words in [("demo", ["demo"]), ("report", ["report"])]:
    app.command(old_name, hidden=True, context_settings=HAND_OVER)(lab_handover(lab_words))
app.command("data", hidden=True, context_settings=HAND_OVER)(lab_handover(["corpora"], skip=1))
app.command("ledger")(coordinator.ledger)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"flexmoe {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks on errors")] = False,
    quiet: Annotated[
        bool,
        typer.Option(
            "--quiet",
            "-q",
            help="no progress bars or progress lines; results only (as does "
            "TQDM_DISABLE=1 for the bars)",
        ),
    ] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="print the version"),
    ] = False,
) -> None:
    DEBUG["on"] = debug
    QUIET["on"] = quiet
    if quiet:  # also reaches the processes a command starts (the demo's owners)
        os.environ["TQDM_DISABLE"] = "1"


COMMANDS = {
    "tokenizer train": owner.tokenizer_train,
    "anchor train": owner.anchor_train,
    "anchor import": owner.anchor_import,
    "anchor rivals": owner.anchor_rivals,
    "expert train": owner.expert_train,
    "expert verify": owner.expert_verify,
    "expert sign": owner.expert_sign,
    "expert proxies": owner.expert_proxies,
    "expert eval": owner.expert_eval,
    "merge": coordinator.merge,
    "merge add": coordinator.merge_add,
    "merge remove": coordinator.merge_remove,
    "router tune": coordinator.router_tune,
    "generate": coordinator.generate,
    "members list": coordinator.members_list,
    "members opt-out": coordinator.members_opt_out,
    "members opt-in": coordinator.members_opt_in,
    "eval ppl": experiment.eval_ppl,
    "eval baselines": experiment.eval_baselines,
    "baseline unrestricted": experiment.baseline_unrestricted,
    "baseline fedavg": federated.baseline_fedavg,
    "audit extraction": experiment.audit_extraction_cmd,
    "serve": coordinator.serve,
    "keys generate": coordinator.keys_generate,
    "keys register": coordinator.keys_register,
    "keys revoke": coordinator.keys_revoke,
    "keys list": coordinator.keys_list,
    "tokens add": coordinator.tokens_add,
    "tokens revoke": coordinator.tokens_revoke,
    "tokens list": coordinator.tokens_list,
    "ledger": coordinator.ledger,
    "fed simulate": federated.fed_simulate,
    "fed serve": federated.fed_serve,
    "fed join": federated.fed_join,
    "fed keygen": federated.fed_keygen,
}
app.info.epilog = "Subcommands: " + "; ".join(f"flexmoe {name}" for name in COMMANDS) + "."


def _one_line_warning(message: Warning | str, *args: object, **kwargs: object) -> None:
    print(f"flexmoe: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    """Entry point: one-line errors with exit code 2; ``--debug`` shows the traceback."""
    run(app, "flexmoe", argv)


def run(application: typer.Typer, prog: str, argv: list[str] | None = None) -> None:
    """Run a typer ``application`` as the program ``prog`` the way flexmoe runs its own: old
    spellings rewritten with a one-line warning, a :class:`FlexMoEError` as one line on stderr
    and exit code 2, the traceback only with ``--debug``."""
    warnings.showwarning = _one_line_warning
    args = renamed(sys.argv[1:] if argv is None else argv)
    command = typer.main.get_command(application)
    try:
        command.main(args=args, prog_name=prog, standalone_mode=True)
    except FlexMoEError as e:
        if DEBUG["on"] or "--debug" in args:
            traceback.print_exc()
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
