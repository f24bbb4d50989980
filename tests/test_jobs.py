"""The demo's training jobs run side by side on a CPU, each in its own process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flexmoe.errors import FlexMoEError
from flexmoe_lab import jobs as jobs_module
from flexmoe_lab.jobs import CommandJob, run_jobs, side_by_side

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(
    ("jobs", "budget", "device", "expected"),
    [
        (4, 2, CPU, (2, 1)),  # this machine: two owners at once, one thread each
        (4, 16, CPU, (4, 4)),
        (3, 8, CPU, (3, 2)),
        (1, 8, CPU, (1, 8)),
        (4, 1, CPU, (1, 1)),  # OMP_NUM_THREADS=1: one after the other
        (4, 16, CUDA, (1, 16)),  # one GPU: one at a time
    ],
)
def test_owners_run_side_by_side_as_the_cores_allow(
    monkeypatch: pytest.MonkeyPatch,
    jobs: int,
    budget: int,
    device: torch.device,
    expected: tuple[int, int],
) -> None:
    monkeypatch.setattr(jobs_module.torch, "get_num_threads", lambda: budget)
    assert side_by_side(jobs, device) == expected


def _job(name: str, data: Path, anchor_dir: Path, out: Path) -> CommandJob:
    settings = {
        "anchor": anchor_dir, "data": [f"{name}={data}"], "owner": f"{name} owner",
        "license": "CC0-1.0", "out": out / name, "force": True, "steps": 2, "batch_size": 2,
        "seq_len": 32, "warmup_steps": 1, "eval_every": 0, "checkpoint_every": 0,
        "device": "cpu", "cache_dir": out / "cache",
    }  # fmt: skip
    return CommandJob(f"the {name} expert", settings, out / name, f"training {name}")


def test_side_by_side_owners_each_ship_a_package_and_a_failure_names_its_owner(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, anchor_dir: Path, corpus_dir: Path
) -> None:
    """Two owners at once both finish (no log left behind, one line each); a third whose text
    is missing fails in one line naming it and its log, which is kept, and the others' packages
    are whole."""
    monkeypatch.setattr(jobs_module.torch, "get_num_threads", lambda: 2)
    data = corpus_dir / "other.jsonl"
    lines: list[str] = []
    jobs = [_job(n, data, anchor_dir, tmp_path) for n in ("first", "second")]
    run_jobs(jobs, CPU, lines.append)
    for name in ("first", "second"):
        assert (tmp_path / name / "manifest.json").is_file()
        assert not (tmp_path / f".{name}.log").exists()
        assert not (tmp_path / f".{name}.toml").exists()
    assert lines[0] == "2 training jobs, 2 at a time with 1 thread(s) each"
    assert sum("(1/2" in line or "(2/2" in line for line in lines) == 2

    broken = [
        _job("third", tmp_path / "missing.jsonl", anchor_dir, tmp_path),
        _job("fourth", data, anchor_dir, tmp_path),
    ]
    with pytest.raises(
        FlexMoEError, match=r"training the third expert, which failed: .*missing"
    ) as e:
        run_jobs(broken, CPU, lines.append)
    assert str(tmp_path / ".third.log") in str(e.value)
    assert (tmp_path / ".third.log").is_file()
    assert not (tmp_path / "third").exists()
    assert (tmp_path / "fourth" / "manifest.json").is_file()  # it ran beside, and finished
