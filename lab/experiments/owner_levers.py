"""Levers on the owner's side measured on a finished demo run; rows into its report.

Each lever is a recipe of ``flexmoe expert train`` options (``OWNER_LEVERS`` in
``flexmoe_lab.levers``): every owner's expert is trained again with it against the run's
anchor, with the run's expert settings otherwise, merged as the run merges and scored on the
run's held-out text, the text that needs two experts included; or a change the coordinator
makes to the run's merge (``MERGE_LEVERS``: sparse differences from the public expert). The
rows go to ``RUN/owner_levers.json`` and into ``RUN/report.md`` beside the run's merge and btm.

Usage (after ``flexmoe-lab demo --out RUN [--corpora NAME]``):

    python lab/experiments/owner_levers.py RUN --corpora demo --levers public-spread,stay-close-0.1
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flexmoe.cli.common import cache_dir
from flexmoe.device import pick_device
from flexmoe_lab.corpora import corpus_set
from flexmoe_lab.levers import MERGE_LEVERS, OWNER_LEVERS
from flexmoe_lab.pipeline import measure_owner_levers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="a finished flexmoe-lab demo --out directory")
    parser.add_argument("--corpora", default="demo", help="the run's corpus set")
    every = ",".join([*OWNER_LEVERS, *MERGE_LEVERS])
    parser.add_argument("--levers", default=every, help="comma-separated")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    measure_owner_levers(
        args.run,
        args.levers.split(","),
        cache_dir=cache_dir(),
        device=pick_device(args.device),
        corpora_set=corpus_set(args.corpora),
    )


if __name__ == "__main__":
    main()
