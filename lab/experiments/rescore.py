"""Score a finished demo run's models again and rewrite its report; nothing is trained.

For a run made before a row or a measure was added to the evaluation (the text that needs two
experts, the cost per token, document-level routing): every model the run trained is scored
again, as ``flexmoe-lab demo`` scores it, and ``results.json``, the plots and ``report.md`` are
rewritten.

Usage (after ``flexmoe-lab demo --out RUN [--corpora NAME]``):

    python lab/experiments/rescore.py RUN --corpora demo
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flexmoe.cli.common import cache_dir
from flexmoe.device import pick_device
from flexmoe_lab.corpora import corpus_set
from flexmoe_lab.pipeline import rescore_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="a finished flexmoe-lab demo --out directory")
    parser.add_argument("--corpora", default="demo", help="the run's corpus set")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    rescore_run(
        args.run,
        cache_dir=cache_dir(),
        device=pick_device(args.device),
        corpora_set=corpus_set(args.corpora),
    )


if __name__ == "__main__":
    main()
