"""The demo's training jobs that share nothing, each a flexmoe command in its own process: every
owner's expert (``flexmoe expert train``, handed only that owner's files, as at home) and the
unrestricted upper bound (``flexmoe baseline unrestricted``).

On a CPU the processes run side by side, as many at once as the cores torch may use (one thread
each on two cores), so that the start-up of one overlaps the training of another and many cores
serve several small models rather than one (on 2 cores the demo's four experts took 272 s side
by side against 295 s one after the other; one model alone should keep every thread: the
unrestricted bound on one thread of two took twice as long). On a GPU they run one at a time.
Side by side, each job's output goes to a log beside its output directory (kept only when it
fails) and one line says when it starts and when it ends.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from tqdm import tqdm

from flexmoe.errors import FlexMoEError
from flexmoe.io import atomic_write_bytes, toml_text

POLL_SECONDS = 0.5
_STEPS = re.compile(r"(\d+/\d+) \[")  # tqdm's "12/60 [00:04<..."


@dataclass(frozen=True)
class CommandJob:
    """One flexmoe command (``command``) with its options by name (``settings``, passed as a
    ``--config`` file), writing ``out``."""

    what: str  # for messages: "the code expert"
    settings: dict[str, Any]
    out: Path
    announce: str  # the line logged when it starts
    command: tuple[str, ...] = ("expert", "train")


def side_by_side(jobs: int, device: torch.device) -> tuple[int, int]:
    """How many job processes run at once, and the threads each may use."""
    budget = max(1, torch.get_num_threads())
    if device.type != "cpu" or jobs < 2 or budget < 2:
        return 1, budget
    at_once = min(jobs, budget)
    return at_once, budget // at_once


def run_jobs(
    jobs: list[CommandJob], device: torch.device, log: Callable[[str], None] = print
) -> None:
    """Every job, in its own process; raises the first failure once the running ones end."""
    at_once, threads = side_by_side(len(jobs), device)
    if at_once == 1:
        for job in jobs:
            log(job.announce)
            _run(job, env=None, output=None)
        return
    log(f"{len(jobs)} training jobs, {at_once} at a time with {threads} thread(s) each")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    pending = list(jobs)
    running: list[_Running] = []
    failed: list[_Running] = []
    done = 0
    bar = tqdm(total=len(jobs), desc="training jobs", unit="job", disable=None)  # a terminal's

    def say(line: str) -> None:
        with bar.external_write_mode():
            log(line)

    with bar:
        while pending or running:
            while pending and not failed and len(running) < at_once:
                job = pending.pop(0)
                say(job.announce)
                running.append(_Running.start(job, env))
            time.sleep(POLL_SECONDS)
            for proc in [r for r in running if r.process.poll() is not None]:
                running.remove(proc)
                if proc.finish():
                    done += 1
                    bar.update(1)
                    say(f"{proc.summary()} ({done}/{len(jobs)}, {proc.seconds():.0f} s)")
                else:
                    failed.append(proc)
            if not bar.disable:  # a terminal's bar only: each job's last step, read from its log
                bar.set_postfix_str(", ".join(r.progress() for r in running))
    if failed:
        proc = failed[0]
        # the log leads: a long output path or summary cannot cut it off the one line
        raise FlexMoEError(
            proc.log, f"the log of training {proc.job.what}, which failed: {proc.summary()}"
        )


@dataclass
class _Running:
    job: CommandJob
    process: subprocess.Popen[bytes]
    config: Path
    log: Path
    handle: IO[bytes]
    started: float
    last: str = ""

    @classmethod
    def start(cls, job: CommandJob, env: dict[str, str]) -> _Running:
        config = _write_config(job)
        log = job.out.parent / f".{job.out.name}.log"
        handle = log.open("wb")
        process = _popen(job, config, env, handle)
        return cls(job, process, config, log, handle, time.perf_counter())

    def finish(self) -> bool:
        """Closes its files; True when it succeeded (its log is then removed)."""
        self.handle.close()
        self.config.unlink(missing_ok=True)
        self.last = _last_line(self.log)
        ok = self.process.returncode == 0
        if ok:
            self.log.unlink(missing_ok=True)
        return ok

    def progress(self) -> str:
        """Its name and the step its progress bar last showed (``code 12/60``)."""
        with self.log.open("rb") as f:
            f.seek(max(0, self.log.stat().st_size - 400))
            tail = f.read().decode("utf-8", errors="replace")
        steps = _STEPS.findall(tail)
        return f"{self.job.out.name} {steps[-1]}" if steps else self.job.out.name

    def summary(self) -> str:
        return self.last or f"exit code {self.process.returncode}"

    def seconds(self) -> float:
        return time.perf_counter() - self.started


def _write_config(job: CommandJob) -> Path:
    config = job.out.parent / f".{job.out.name}.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(config, toml_text(job.settings).encode("utf-8"))
    return config


def _popen(
    job: CommandJob, config: Path, env: dict[str, str] | None, output: IO[bytes] | None
) -> Any:
    command = [sys.executable, "-m", "flexmoe", *job.command, "--config", str(config)]
    return subprocess.Popen(command, env=env, stdout=output, stderr=output)


def _run(job: CommandJob, *, env: dict[str, str] | None, output: IO[bytes] | None) -> None:
    config = _write_config(job)
    try:
        if _popen(job, config, env, output).wait() != 0:
            raise FlexMoEError(job.out, f"training {job.what} failed (see above)")
    finally:
        config.unlink(missing_ok=True)


def _last_line(log: Path) -> str:
    """The last non-empty line a process wrote (progress bars end lines with carriage returns)."""
    text = log.read_bytes().decode("utf-8", errors="replace").replace("\r", "\n")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""
