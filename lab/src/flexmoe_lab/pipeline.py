"""The demo pipeline, end to end.

corpora -> tokenizer -> anchor and the coordinator's public rival experts -> one expert per
owner domain (each trained in its own process that is given only that domain's files and the
public corpus; side by side on a CPU) -> merge -> every baseline and variant scored on the same
held-out text -> one owner's opt-out -> extraction audit -> report with plots. With
``--ablations`` also the variants that explain the result: the unrestricted upper bound (all
data in one place, for comparison only), the federated stage (its experts trained beside the
owners'), router tuning, the router levers, every top-k.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from flexmoe.anchor import HISTORY_FILE, Anchor, AnchorManifest, load_anchor, train_anchor
from flexmoe.data.documents import DataSpec, Document, write_jsonl
from flexmoe.data.packing import pack_documents
from flexmoe.data.split import Split, load_splits
from flexmoe.data.tokenizer import load_tokenizer
from flexmoe.device import on_device
from flexmoe.errors import FlexMoEError
from flexmoe.evaluate.baselines import PosteriorEnsemble, build_baseline
from flexmoe.evaluate.extraction import audit_extraction, sample_passages
from flexmoe.evaluate.mixed import HeldOutText, alternating
from flexmoe.evaluate.perplexity import eval_documents, evaluate_loaded
from flexmoe.evaluate.registry import (
    ANCHOR,
    BTM,
    CALIBRATED,
    FEDAVG,
    FEDERATED,
    FLEXMOE,
    OWNER_TEXT_TUNED,
    RANDOM_INIT,
    ROUTER_CEILING,
    Evaluation,
    specialist,
)
from flexmoe.evaluate.suite import run_suite
from flexmoe.expert.manifest import RIVALS_DIR, read_manifest
from flexmoe.expert.package import load_package
from flexmoe.expert.proxies import choose_proxies, read_proxies, resolve_proxies, write_proxies
from flexmoe.expert.rival_training import public_clusters, train_rivals, write_clusters
from flexmoe.expert.rivals import RIVAL_OWNER, rival_name, shipped_rivals
from flexmoe.expert.specialist import build_specialist
from flexmoe.inference.generate import format_attribution, generate
from flexmoe.inference.selection import Selection, current_mask, set_expert_mask
from flexmoe.io import atomic_write_bytes, read_json, write_json
from flexmoe.merge.build import build_merged
from flexmoe.merge.edit import remove_expert
from flexmoe.merge.layout import load_merged, read_slots
from flexmoe.merge.plan import plan_merge
from flexmoe.merge.slots import RouterTuning
from flexmoe.merge.standing import StandingStore, standing_exclusions
from flexmoe.merge.tune import proxy_sample, tune_router, tune_router_on
from flexmoe.model.checkpoint import moe_layers
from flexmoe.model.config import PRESETS, Preset
from flexmoe.router_init import RouterInitMethod
from flexmoe.training.config import MEMORY_FIELDS, UNRESTRICTED_LEAVE_OUT, TrainConfig
from flexmoe.training.loop import TrainResult
from flexmoe_lab.corpora import DEMO, CorpusSet, DemoDomain, corpora_dir, fetch_corpora
from flexmoe_lab.federated import (
    announce,
    federated_stages,
    first_experts,
    owner_costs,
)
from flexmoe_lab.jobs import CommandJob, run_jobs
from flexmoe_lab.levers import (
    LEVER_RESULTS,
    MERGE_LEVERS,
    OWNER_LEVERS,
    calibrated_rows,
    distilled_rows,
    ffn_inputs,
    levers_section,
    write_rows,
    write_sparse_deltas,
)
from flexmoe_lab.narrative import demo_report, summary
from flexmoe_lab.report import (
    DP_RESULTS,
    ROUNDS_PLOT,
    plot_files,
    privacy_section,
    rounds_plot,
)
from flexmoe_lab.results import (
    AnchorRecord,
    AuditRecord,
    DemoResults,
    ExpertRecord,
    Generation,
    OptOutRecord,
    RunSettings,
)
from flexmoe_lab.settings import DemoSettings, load_settings

ANCHOR_HIDDEN = RouterInitMethod.ANCHOR_HIDDEN


FULL = load_settings("full")
QUICK = load_settings("quick")
RIVAL_LICENSE = "CC0-1.0"  # what the demo's coordinator declares for its public rivals
NO_RIVALS = {"no_rivals": True}  # stages measured against the public expert alone


def _owner_job(
    domain: DemoDomain,
    corpus: Path,
    anchor_dir: Path,
    out: Path,
    cfg: TrainConfig,
    cache_dir: Path,
    device: torch.device,
    announce: str,
    router_init: RouterInitMethod = ANCHOR_HIDDEN,
    seed: int = 0,
    options: dict[str, Any] | None = None,
) -> CommandJob:
    """One owner's process: it is handed only its own files, as a config file of the settings
    any owner would use (the public share is the anchor's own public corpus), and ``options`` of
    ``flexmoe expert train`` by name (a lever's recipe)."""
    settings = {
        "anchor": anchor_dir,
        "data": [f"{domain.name}={corpus}"],
        "id_field": "id",
        "owner": domain.owner,
        "license": domain.license,
        "out": out,
        "force": True,
        **{k: v for k, v in cfg.to_dict().items() if k not in MEMORY_FIELDS},
        "device": str(device),
        "cache_dir": cache_dir,
        "router_init": router_init.value,
        "seed": seed,
        **(options or {}),
    }
    return CommandJob(f"the {domain.name} expert", settings, out, announce)


def run_demo(
    out: Path,
    *,
    cache_dir: Path,
    device: torch.device,
    quick: bool = False,
    ablations: bool = False,
    corpora_set: CorpusSet = DEMO,
    log: Callable[[str], None] = print,
) -> DemoResults:
    """The whole pipeline on the demo corpora; writes ``report.md``, plots and JSON to ``out``.

    The federated stage (``flexmoe:federated`` at the specialists' compute, and ``fedavg``)
    runs with the rest. ``ablations`` adds the variants: every expert trained again from random
    router rows (``flexmoe:random-init``), the router levers and ceiling, router tuning on public
    proxies (``flexmoe:tuned``), every other top-k and the biases flipped, the unrestricted
    bound, and what ``--dp-owner-epsilon`` costs in the federated rounds.
    """
    run = _DemoRun.start(out, cache_dir, device, QUICK if quick else FULL, corpora_set, log)
    settings, owners, specs = run.settings, corpora_set.owners, run.specs
    anchor_dir, merged_dir = out / "anchor", out / "merged"
    manifest, anchor_result = run.anchor(anchor_dir, "quick" if quick else "full")
    rivals = run.rivals(anchor_dir)
    unrestricted_dir, federated_experts = out / "unrestricted", out / "federated" / "experts"
    joint, unrestricted = _unrestricted_job(unrestricted_dir, anchor_dir, run)
    first = first_experts(settings)
    expert_jobs = _expert_jobs(
        out / "experts", "[2/6]", owners, anchor_dir, run.corpora, settings, device, run.tokens
    )
    federated_jobs = _expert_jobs(
        federated_experts,
        "[federated]",
        owners,
        anchor_dir,
        run.corpora,
        first,
        device,
        run.tokens,
    )
    log(announce(settings, federated_experts.parent))
    run_jobs([*expert_jobs, *federated_jobs], device, log)
    if ablations:  # one model: every thread (1 of 2 takes twice as long)
        run_jobs([unrestricted], device, log)
    package_dirs = [job.out for job in expert_jobs]
    experts = _expert_records(owners, package_dirs, load_anchor(anchor_dir))
    run.stage("training")
    log(
        f"[3/6] merging the anchor, {len(rivals)} public rivals and {len(owners)} owners' experts "
        f"(top-{settings.top_k}) -> {merged_dir}"
    )
    plan = plan_merge(anchor_dir, [*rivals, *package_dirs], top_k=settings.top_k)
    build_merged(plan, merged_dir, overwrite=True)
    run.stage("merge")
    extra: dict[str, Path] = {}
    if ablations:
        extra = _ablation_stages(
            out,
            anchor_dir,
            merged_dir,
            run.corpora,
            specs,
            corpora_set,
            settings,
            device,
            run.tokens,
            log,
        )
        run.stage("ablation")
    tuning = run.tuned(anchor_dir, merged_dir) if ablations else None
    federated = federated_stages(
        out,
        anchor_dir,
        owners,
        specs,
        settings,
        [*rivals, *(job.out for job in federated_jobs)],
        device,
        run.tokens,
        log,
        run.score,
        privacy=ablations,
    )
    run.stage("federated")
    models = {**extra, **federated.models}
    evaluation = run.evaluate(
        anchor_dir,
        package_dirs,
        merged_dir,
        unrestricted_dir if ablations else None,
        models,
        tuned_dir=out / "merged-tuned" if ablations else None,
        every_variant=ablations,
    )
    opt_out, audit = run.opt_out_and_audit(anchor_dir, package_dirs, merged_dir)
    costs = owner_costs(out, package_dirs, federated.record, evaluation)
    results = DemoResults(
        settings=_settings_record(corpora_set, settings, joint, quick=quick, ablations=ablations),
        anchor=AnchorRecord(fingerprint=manifest.fingerprint, training=manifest.training),
        experts=experts,
        rivals={p.name: read_manifest(p).description for p in rivals},
        evaluation=evaluation,
        router_tuning=tuning,
        federated=federated.record,
        accounting=costs,
        opt_out=opt_out,
        audit=audit,
        seconds=run.seconds(),
        stage_seconds=run.stage_seconds,
        device=str(run.device),
        corpora_description=corpora_set.description,
    )
    run.write(results, anchor_result.history)
    return results


def _finished_run(
    out: Path,
    cache_dir: Path,
    device: torch.device,
    corpora_set: CorpusSet,
    log: Callable[[str], None],
) -> tuple[DemoResults, _DemoRun]:
    """A finished run's results and its context (its settings, corpora and held-out text),
    checked to be on ``corpora_set``; the run's own anchor is kept (and its DP table)."""
    results = DemoResults.read(out / "results.json")
    if results.settings.corpora != corpora_set.name:
        raise FlexMoEError(out, f"this run is on the {results.settings.corpora} corpora")
    settings = QUICK if results.settings.quick else FULL
    return results, _DemoRun.start(
        out, cache_dir, device, settings, corpora_set, log, new_anchor=False
    )


def _lever_model(
    name: str,
    out: Path,
    run: _DemoRun,
    corpora_set: CorpusSet,
    device: torch.device,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Lever ``name``'s merged model, built at ``out/owner-levers/NAME/merged``; its options."""
    settings, anchor_dir = run.settings, out / "anchor"
    root, merged = out / "owner-levers" / name, out / "owner-levers" / name / "merged"
    if name in MERGE_LEVERS:  # at the coordinator, from the run's own packages
        options: dict[str, Any] = MERGE_LEVERS[name]
        log(f"[lever {name}] the run's merge changed at the coordinator -> {merged}")
        if "delta_keep" in options:
            write_sparse_deltas(out / "merged", merged, options["delta_keep"])
        else:
            _distill_stage(out, merged, run, options["distill_steps"], corpora_set)
    elif "rivals" in OWNER_LEVERS[name]:  # trained once, merged with or without them
        options = OWNER_LEVERS[name]
        recipe = {k: v for k, v in options.items() if not k.startswith("rivals")}
        pair = out / "owner-levers" / name.rsplit("-", 1)[0]  # shared by -in and -out
        rivals, packages = _rivals_stage(pair, run, corpora_set, options["rivals"], recipe)
        kept = rivals if options["rivals_in_merge"] else []
        plan = plan_merge(anchor_dir, [*kept, *packages], top_k=settings.top_k)
        build_merged(plan, merged, overwrite=True)
    else:
        options = OWNER_LEVERS[name]
        packages = _train_experts(
            root / "experts",
            f"[lever {name}]",
            corpora_set.owners,
            anchor_dir,
            run.corpora,
            settings,
            device,
            run.tokens,
            log,
            options={**NO_RIVALS, **options},
        )
        plan = plan_merge(anchor_dir, packages, top_k=settings.top_k)
        build_merged(plan, merged, overwrite=True)
    return options


def measure_owner_levers(
    out: Path,
    levers: list[str],
    *,
    cache_dir: Path,
    device: torch.device,
    corpora_set: CorpusSet = DEMO,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Each owner-side lever (:data:`OWNER_LEVERS`) on a finished run: every owner's expert
    trained again with the lever's options against the run's anchor, merged as the run merges,
    scored on the run's held-out text (the text that needs two experts included). The rows go
    to ``out/owner_levers.json`` (one per lever, a new measurement replacing an older one) and
    into the report."""
    known = [*OWNER_LEVERS, *MERGE_LEVERS]
    unknown = [name for name in levers if name not in known]
    if unknown:
        raise FlexMoEError("--levers", f"unknown {unknown[0]!r}; choose {', '.join(known)}")
    results, run = _finished_run(out, cache_dir, device, corpora_set, log)
    settings = run.settings
    anchor_dir = out / "anchor"
    data: list[DataSpec | HeldOutText] = [*run.specs.values(), *run.mixtures()]
    path = out / LEVER_RESULTS
    found: dict[str, Any] = (
        read_json(path) if path.is_file() else {"corpora": corpora_set.name, "rows": []}
    )
    for name in levers:
        merged = out / "owner-levers" / name / "merged"
        options = _lever_model(name, out, run, corpora_set, device, log)
        scores = evaluate_loaded(
            load_merged(merged, device=device),
            load_tokenizer(merged),
            data,
            device=device,
            cache_dir=run.tokens,
            max_bytes=settings.eval_bytes,
        )
        row = {
            "lever": name,
            "options": options,
            "bpb": {s.domain: round(s.bits_per_byte, 4) for s in scores},
        }
        log(json.dumps(row))
        if path.is_file():  # read again: another job on the same run may have added rows
            found = read_json(path)
        found["rows"] = [r for r in found["rows"] if r["lever"] != name] + [row]
        write_json(path, found)
    run.write(results, read_json(anchor_dir / HISTORY_FILE))
    return found


def _rivals_stage(
    root: Path, run: _DemoRun, corpora_set: CorpusSet, count: int, recipe: dict[str, Any]
) -> tuple[list[Path], list[Path]]:
    """The coordinator's ``count`` public rival experts (each trained like an owner's, on one
    k-means cluster of the public training documents by their mean hidden state in the anchor)
    and every owner's expert trained against them at the merge's top-k, all with ``recipe``
    (options of ``flexmoe expert train``); kept under ``root`` and trained once per recipe."""
    anchor_dir = run.out / "anchor"
    rival_dirs = [root / "rivals" / rival_name(i) for i in range(count)]
    owner_dirs = [root / "experts" / d.name for d in corpora_set.owners]
    made = root / "recipe.json"
    done = all((p / "manifest.json").is_file() for p in [*rival_dirs, *owner_dirs])
    if done and (not made.is_file() or read_json(made) == recipe):  # older runs wrote none
        return rival_dirs, owner_dirs
    parts = public_clusters(anchor_dir, [run.specs[corpora_set.public.name]], count, run.device)
    jobs = []
    for part, spec, target in zip(
        parts, write_clusters(parts, root / "clusters"), rival_dirs, strict=True
    ):
        run.log(f"[lever rivals] {spec.domain}: {len(part)} public documents")
        rival = DemoDomain(spec.domain, "", lambda: iter(()), RIVAL_OWNER, RIVAL_LICENSE)
        jobs.append(
            _owner_job(
                rival,
                Path(spec.paths[0]),
                anchor_dir,
                target,
                run.settings.expert,
                run.tokens,
                run.device,
                f"[lever rivals] training {rival.name} -> {target}",
                options={**NO_RIVALS, **recipe},
            )
        )
    run_jobs(jobs, run.device, run.log)
    options = {"rival": [str(p) for p in rival_dirs], "rival_top_k": run.settings.top_k, **recipe}
    packages = _train_experts(
        root / "experts",
        "[lever rivals]",
        corpora_set.owners,
        anchor_dir,
        run.corpora,
        run.settings,
        run.device,
        run.tokens,
        run.log,
        options=options,
    )
    write_json(made, recipe)
    return rival_dirs, packages


def _distill_stage(
    out: Path, target: Path, run: _DemoRun, steps: int, corpora_set: CorpusSet
) -> None:
    """The run's merge with its router rows fitted to btm (the run's specialists' posterior
    mixture) on public training text; written to ``target``."""
    anchor = load_anchor(out / "anchor")
    packages = [load_package(out / "experts" / d.name, anchor) for d in corpora_set.owners]
    teacher = PosteriorEnsemble([build_specialist(anchor, p) for p in packages])
    public = load_splits([run.specs[corpora_set.public.name]]).train
    stream = pack_documents(public, anchor.tokenizer, cache_dir=run.tokens)
    tune = run.settings.tune
    rows = distilled_rows(
        out / "merged",
        teacher,
        stream,
        steps=steps,
        batch_size=tune.batch_size,
        seq_len=tune.seq_len,
        lr=tune.lr,
        device=run.device,
    )
    write_rows(
        out / "merged",
        target,
        rows,
        method="distilled from btm on public text",
        public_tokens=steps * tune.batch_size * tune.seq_len,
    )


def rescore_run(
    out: Path,
    *,
    cache_dir: Path,
    device: torch.device,
    corpora_set: CorpusSet = DEMO,
    log: Callable[[str], None] = print,
) -> DemoResults:
    """Score a finished run's models again, as :func:`run_demo` scores them (every baseline and
    variant, the text that needs two experts, the cost per token), and rewrite its results and
    report; nothing is trained. For runs made before a row or a measure was added."""
    results, run = _finished_run(out, cache_dir, device, corpora_set, log)
    found = {
        RANDOM_INIT: out / "ablation-random-init" / "merged",
        OWNER_TEXT_TUNED: out / "ablation-owner-text" / "merged-tuned",
        CALIBRATED: out / "ablation-calibrated",
        ROUTER_CEILING: out / "ablation-router-ceiling",
        FEDERATED: out / "federated" / "model",
        FEDAVG: out / "fedavg",
    }
    extra = {name: path for name, path in found.items() if path.is_dir()}
    package_dirs = [out / "experts" / d.name for d in corpora_set.owners]
    tuned = out / "merged-tuned"
    every = results.settings.ablations or tuned.is_dir()  # as the run was made
    evaluation = run.evaluate(
        out / "anchor",
        package_dirs,
        out / "merged",
        out / "unrestricted" if (out / "unrestricted").is_dir() else None,
        extra,
        tuned_dir=tuned if tuned.is_dir() else None,
        every_variant=every,
    )
    results.evaluation = evaluation
    run.write(results, read_json(out / "anchor" / HISTORY_FILE))
    return results


@dataclass
class _DemoRun:
    """One demo run's context: where it writes, its settings and corpora, and its stage times."""

    out: Path
    device: torch.device
    settings: DemoSettings
    corpora_set: CorpusSet
    corpora: dict[str, Path]
    specs: dict[str, DataSpec]
    tokens: Path
    log: Callable[[str], None]
    started: float
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @classmethod
    def start(
        cls,
        out: Path,
        cache_dir: Path,
        device: torch.device,
        settings: DemoSettings,
        corpora_set: CorpusSet,
        log: Callable[[str], None],
        *,
        new_anchor: bool = True,
    ) -> _DemoRun:
        """Fetch the corpora (with a ``new_anchor``, an earlier run's DP table is dropped: it
        measured another anchor)."""
        started = time.perf_counter()  # the corpora stage counts from here
        if new_anchor:
            (Path(out) / DP_RESULTS).unlink(missing_ok=True)
        corpora = fetch_corpora(corpora_set, corpora_dir(cache_dir, corpora_set), log=log)
        specs = {
            d.name: DataSpec(domain=d.name, paths=(str(corpora[d.name]),), id_field="id")
            for d in corpora_set.domains
        }
        tokens = cache_dir / "tokens"
        run = cls(out, device, settings, corpora_set, corpora, specs, tokens, log, started)
        run.stage("corpora")
        return run

    def anchor(self, anchor_dir: Path, kind: str) -> tuple[AnchorManifest, TrainResult]:
        """The anchor, trained on the public corpus."""
        self.log(f"[1/6] training the anchor ({kind} settings) -> {anchor_dir}")
        trained = train_anchor(
            data=[self.specs["public"]],
            out=anchor_dir,
            dims=PRESETS[Preset.TINY],
            cfg=self.settings.anchor,
            device=self.device,
            cache_dir=self.tokens,
            vocab_size=self.settings.vocab_size,
            overwrite=True,
        )
        self.stage("anchor")
        return trained

    def rivals(self, anchor_dir: Path) -> list[Path]:
        """The coordinator's public rival experts, trained on clusters of the public text and
        shipped in the anchor: every owner's ``expert train`` trains against them, the merge
        keeps them."""
        count = self.settings.rivals
        if count:
            self.log(
                f"[1/6] training the coordinator's {count} public rival experts on clusters of "
                f"the public text -> {anchor_dir / RIVALS_DIR}"
            )
            train_rivals(
                anchor_dir,
                [self.specs["public"]],
                count=count,
                license=RIVAL_LICENSE,
                cfg=self.settings.expert,
                device=self.device,
                cache_dir=self.tokens,
                overwrite=True,
            )
        self.stage("rivals")
        return shipped_rivals(anchor_dir)

    def evaluate(
        self,
        anchor_dir: Path,
        package_dirs: list[Path],
        merged_dir: Path,
        unrestricted_dir: Path | None,
        extra: dict[str, Path],
        *,
        tuned_dir: Path | None,
        every_variant: bool = True,
    ) -> Evaluation:
        """Every baseline and variant on the same held-out text (without ``every_variant``, the
        merge at its own top-k and bias only, beside document-level routing and opt-outs)."""
        self.log("[4/6] scoring every baseline and variant on the same held-out text")
        evaluation = run_suite(
            anchor_dir=anchor_dir,
            package_dirs=package_dirs,
            merged_dir=merged_dir,
            data=list(self.specs.values()),
            device=self.device,
            cache_dir=self.tokens,
            unrestricted_dir=unrestricted_dir,
            tuned_dir=tuned_dir,
            extra_models=extra,
            every_variant=every_variant,
            mixtures=self.mixtures(),
            max_bytes=self.settings.eval_bytes,
            log=self.log,
        )
        self.stage("evaluation")
        return evaluation

    def mixtures(self) -> list[HeldOutText]:
        """Held-out text that needs two experts: the corpus set's pairs of domains, their test
        documents' passages in turn."""
        held = {
            d: eval_documents(self.specs[d]) for pair in self.corpora_set.mixtures for d in pair
        }
        return [alternating(a, held[a], b, held[b]) for a, b in self.corpora_set.mixtures]

    def score(self, model_dir: Path, max_bytes: int | None = None) -> dict[str, float]:
        """A merged model's bits per byte per domain on the evaluation's held-out text (its
        first ``max_bytes`` per domain, when fewer than the evaluation's)."""
        scores = evaluate_loaded(
            load_merged(model_dir, device=self.device),
            load_tokenizer(model_dir),
            list(self.specs.values()),
            device=self.device,
            cache_dir=self.tokens,
            max_bytes=max_bytes or self.settings.eval_bytes,
        )
        return {s.domain: round(s.bits_per_byte, 4) for s in scores}

    def stage(self, name: str) -> None:
        """Record the time since the previous stage under ``name``."""
        spent = time.perf_counter() - self.started - sum(self.stage_seconds.values())
        self.stage_seconds[name] = round(spent, 1)

    def seconds(self) -> float:
        return round(time.perf_counter() - self.started, 1)

    def tuned(self, anchor_dir: Path, merged_dir: Path) -> RouterTuning:
        """The paper's router tuning on the public documents the owners picked; its record."""
        tuned_dir, settings = self.out / "merged-tuned", self.settings
        self.log(
            f"[ablation] router tuning: each owner picks the {settings.proxy_documents} public "
            f"documents most like its data and sends their hashes; the router alone is tuned on "
            f"them ({settings.tune.steps} steps) -> {tuned_dir}"
        )
        public = self.corpora_set.public.name
        tuning = _tune_stage(
            self.out,
            anchor_dir,
            merged_dir,
            tuned_dir,
            self.specs,
            public,
            settings,
            self.device,
            self.tokens,
        )
        self.stage("router-tuning")
        return tuning

    def opt_out_and_audit(
        self, anchor_dir: Path, package_dirs: list[Path], merged_dir: Path
    ) -> tuple[OptOutRecord, AuditRecord]:
        """One owner opts out and back in; the extraction audit of the first owner's text."""
        corpora_set, settings = self.corpora_set, self.settings
        self.log(f"[5/6] the {corpora_set.opt_out} owner opts out, and back in")
        opt_out = _opt_out_stage(
            self.out,
            merged_dir,
            self.specs,
            settings,
            self.device,
            self.tokens,
            self.log,
            opt_out=corpora_set.opt_out,
            prompt=corpora_set.opt_out_prompt,
        )
        self.stage("opt-out")
        audited = corpora_set.owners[0].name
        self.log(f"[6/6] extraction audit on the {audited} owner's training documents")
        audit = _audit_stage(
            anchor_dir, package_dirs, merged_dir, self.specs, settings, self.device, audited
        )
        self.stage("audit")
        return opt_out, audit

    def write(self, results: DemoResults, history: list[dict[str, float]]) -> None:
        """``results.json``, the plots and ``report.md``, each atomically."""
        results.write(self.out / "results.json")
        evaluation = results.evaluation
        for name, data in plot_files(evaluation).items():
            atomic_write_bytes(self.out / name, data)
        curve = results.federated.curve() if results.federated else []
        if curve:
            shown = [m for m in (FLEXMOE, BTM, FEDAVG) if m in evaluation.models]
            plot = rounds_plot(curve, {m: evaluation.average(m) for m in shown})
            atomic_write_bytes(self.out / ROUNDS_PLOT, plot)
        report = demo_report(results, history)
        if (self.out / LEVER_RESULTS).is_file():  # measured on this run's anchor
            report += "\n" + levers_section(read_json(self.out / LEVER_RESULTS), evaluation)
        if (self.out / DP_RESULTS).is_file():
            report += "\n" + privacy_section(self.out / DP_RESULTS)
        atomic_write_bytes(self.out / "report.md", report.encode())
        self.log(summary(evaluation))
        self.log(f"report: {self.out / 'report.md'} ({results.seconds:.0f} s)")


def _expert_records(
    owners: tuple[DemoDomain, ...], package_dirs: list[Path], anchor: Anchor
) -> dict[str, ExpertRecord]:
    """Each owner's expert as the results record it: owner, licence, training summary."""
    experts: dict[str, ExpertRecord] = {}
    for domain, package_dir in zip(owners, package_dirs, strict=True):
        owner_manifest = load_package(package_dir, anchor).manifest
        experts[domain.name] = ExpertRecord(
            owner=owner_manifest.owner,
            license=owner_manifest.license,
            training=owner_manifest.training,
        )
    return experts


def _ablation_stages(
    out: Path,
    anchor_dir: Path,
    merged_dir: Path,
    corpora: dict[str, Path],
    specs: dict[str, DataSpec],
    corpora_set: CorpusSet,
    settings: DemoSettings,
    device: torch.device,
    tokens: Path,
    log: Callable[[str], None],
) -> dict[str, Path]:
    """The router ablations, each a merged model directory under its registry name."""
    owners = corpora_set.owners
    extra: dict[str, Path] = {}
    extra[RANDOM_INIT] = _random_init_stage(
        out / "ablation-random-init",
        owners,
        anchor_dir,
        corpora,
        settings,
        device,
        tokens,
        log,
    )
    owner_text = out / "ablation-owner-text"
    log(
        f"[ablation] router tuning on {settings.proxy_bytes:,} bytes of each owner's own "
        f"text (hands owner text over) -> {owner_text / 'merged-tuned'}"
    )
    _owner_text_tune_stage(
        owner_text, merged_dir, owner_text / "merged-tuned", specs, settings, device, tokens
    )
    extra[OWNER_TEXT_TUNED] = owner_text / "merged-tuned"
    calibrated = out / "ablation-calibrated"
    log(f"[ablation] the owners' rows rescaled on public text (coordinator side) -> {calibrated}")
    _calibrated_stage(
        anchor_dir, merged_dir, calibrated, specs[corpora_set.public.name], device, tokens
    )
    extra[CALIBRATED] = calibrated
    ceiling = out / "ablation-router-ceiling"
    log(f"[ablation] the router ceiling: rows fitted on the scored text itself -> {ceiling}")
    _ceiling_stage(merged_dir, ceiling, specs, settings, device, tokens)
    extra[ROUTER_CEILING] = ceiling
    return extra


def _unrestricted_job(out: Path, anchor_dir: Path, run: _DemoRun) -> tuple[TrainConfig, CommandJob]:
    """The unrestricted upper bound (``flexmoe baseline unrestricted``), trained on the experts'
    tokens together; its settings and its job."""
    settings, owners = run.settings, run.corpora_set.owners
    joint = replace(
        settings.expert, steps=settings.expert.steps * len(owners), eval_every=0, checkpoint_every=0
    )
    public = run.corpora_set.public.name
    options = {
        "anchor": anchor_dir,
        "data": [f"{d.name}={run.corpora[d.name]}" for d in owners],
        "public_data": [f"{public}={run.corpora[public]}"],
        "id_field": "id",
        "out": out,
        "force": True,
        **{k: v for k, v in joint.to_dict().items() if k not in UNRESTRICTED_LEAVE_OUT},
        "top_k": settings.top_k,
        "device": str(run.device),
        "cache_dir": run.tokens,
    }
    announce = (
        f"[2/6] the unrestricted upper bound: the merged shape trained on all domains at once "
        f"({joint.steps} steps, the experts' tokens together), in its own process -> {out}"
    )
    job = CommandJob(
        "the unrestricted upper bound", options, out, announce, ("baseline", "unrestricted")
    )
    return joint, job


def _settings_record(
    corpora_set: CorpusSet,
    settings: DemoSettings,
    joint: TrainConfig,
    *,
    quick: bool,
    ablations: bool,
) -> RunSettings:
    """The settings a run used, as the results record them."""
    return RunSettings(
        corpora=corpora_set.name,
        quick=quick,
        ablations=ablations,
        vocab_size=settings.vocab_size,
        top_k=settings.top_k,
        eval_bytes_per_domain=settings.eval_bytes,
        audit=settings.audit.__dict__,
        anchor=settings.anchor.to_dict(),
        expert=settings.expert.to_dict(),
        unrestricted=joint.to_dict(),
        router_tuning=settings.tune.to_dict(),
        proxy_bytes_per_domain=settings.proxy_bytes,
        proxy_documents_per_owner=settings.proxy_documents,
        ceiling_steps=settings.ceiling_steps,
    )


def _expert_jobs(
    root: Path,
    label: str,
    owners: tuple[DemoDomain, ...],
    anchor_dir: Path,
    corpora: dict[str, Path],
    settings: DemoSettings,
    device: torch.device,
    tokens: Path,
    router_init: RouterInitMethod = ANCHOR_HIDDEN,
    options: dict[str, Any] | None = None,
) -> list[CommandJob]:
    """Every owner's expert as a job, into ``root/<domain>``, with ``options`` of ``flexmoe
    expert train``. Random router rows are seeded by the owner's position so that no two owners
    start from the same row."""
    jobs, options = [], {"rival_top_k": settings.top_k, **(options or {})}
    for i, domain in enumerate(owners, 1):
        package = root / domain.name
        announce = (
            f"{label} expert {i}/{len(owners)}: {domain.name} ({router_init.value} router row), "
            f"in its own process -> {package}"
        )
        seed = i if router_init is RouterInitMethod.RANDOM else 0
        jobs.append(
            _owner_job(
                domain,
                corpora[domain.name],
                anchor_dir,
                package,
                settings.expert,
                tokens,
                device,
                announce,
                router_init=router_init,
                seed=seed,
                options=options,
            )
        )
    return jobs


def _train_experts(
    root: Path,
    label: str,
    owners: tuple[DemoDomain, ...],
    anchor_dir: Path,
    corpora: dict[str, Path],
    settings: DemoSettings,
    device: torch.device,
    tokens: Path,
    log: Callable[[str], None],
    router_init: RouterInitMethod = ANCHOR_HIDDEN,
    options: dict[str, Any] | None = None,
) -> list[Path]:
    """Every owner's expert (:func:`_expert_jobs`), trained by :func:`run_jobs`."""
    jobs = _expert_jobs(
        root, label, owners, anchor_dir, corpora, settings, device, tokens, router_init, options
    )
    run_jobs(jobs, device, log)
    return [job.out for job in jobs]


def _random_init_stage(
    root: Path,
    owners: tuple[DemoDomain, ...],
    anchor_dir: Path,
    corpora: dict[str, Path],
    settings: DemoSettings,
    device: torch.device,
    tokens: Path,
    log: Callable[[str], None],
) -> Path:
    """The router-init ablation: every owner's expert trained again from a random router row
    (seeded by the owner's position, which also seeds its data order), merged like the main
    model; the public row stays the anchor's."""
    packages = _train_experts(
        root / "experts",
        "[ablation]",
        owners,
        anchor_dir,
        corpora,
        settings,
        device,
        tokens,
        log,
        router_init=RouterInitMethod.RANDOM,
    )
    merged = root / "merged"
    plan = plan_merge(anchor_dir, [*shipped_rivals(anchor_dir), *packages], top_k=settings.top_k)
    build_merged(plan, merged, overwrite=True)
    return merged


def _tune_stage(
    out: Path,
    anchor_dir: Path,
    merged_dir: Path,
    tuned_dir: Path,
    specs: dict[str, DataSpec],
    public: str,
    settings: DemoSettings,
    device: torch.device,
    tokens: Path,
) -> RouterTuning:
    """Router tuning the paper's way: each owner, at home, ranks the public corpus's training
    documents with its own classifier and sends only the hashes of the ``proxy_documents`` most
    like its data (``out/proxy/NAME.json``); the coordinator resolves them against its own
    public corpus and tunes only the router on them, plus as many other public documents."""
    anchor = load_anchor(anchor_dir)
    public_docs = load_splits([specs[public]]).get(Split.TRAIN)
    proxy: list[DataSpec] = []
    chosen: set[str] = set()
    for owner, spec in specs.items():
        if owner == public:
            continue
        own = load_splits([spec]).get(Split.TRAIN)  # owner side: these never leave it
        choice = choose_proxies(
            anchor, owner, own, public_docs, count=settings.proxy_documents, device=device
        )
        sent = out / "proxy" / f"{owner}.json"
        write_proxies(sent, choice)
        docs = resolve_proxies(read_proxies(sent), public_docs, sent)  # coordinator side
        chosen.update(d.text_sha256 for d in docs)
        proxy.append(_jsonl_spec(out / "proxy" / f"{owner}.jsonl", owner, docs))
    rest = [d for d in public_docs if d.text_sha256 not in chosen][: settings.proxy_documents]
    proxy.append(_jsonl_spec(out / "proxy" / f"{public}.jsonl", public, rest))
    return _tune_on(merged_dir, proxy, tuned_dir, settings, device, tokens)


def _tune_on(
    merged_dir: Path,
    proxy: list[DataSpec],
    tuned_dir: Path,
    settings: DemoSettings,
    device: torch.device,
    tokens: Path,
) -> RouterTuning:
    """Tune only the router of ``merged_dir`` on ``proxy`` into ``tuned_dir``; its record."""
    result = tune_router(
        merged_dir,
        proxy,
        out=tuned_dir,
        cfg=settings.tune,
        device=device,
        cache_dir=tokens,
        overwrite=True,
    )
    return result.record


def _jsonl_spec(path: Path, domain: str, docs: list[Document]) -> DataSpec:
    write_jsonl(path, ((d.doc_id, d.text) for d in docs))
    return DataSpec(domain=domain, paths=(str(path),), id_field="id")


def _owner_text_tune_stage(
    out: Path,
    merged_dir: Path,
    tuned_dir: Path,
    specs: dict[str, DataSpec],
    settings: DemoSettings,
    device: torch.device,
    tokens: Path,
) -> RouterTuning:
    """An ablation that hands over owner text: a window of each of a few training documents per
    domain (never held-out text), written to ``out/proxy``; only the router rows train."""
    proxy = []
    for domain, spec in specs.items():
        docs = load_splits([spec]).get(Split.TRAIN)
        sample = proxy_sample(docs, max_bytes=settings.proxy_bytes)
        proxy.append(_jsonl_spec(out / "proxy" / f"{domain}.jsonl", domain, sample))
    return _tune_on(merged_dir, proxy, tuned_dir, settings, device, tokens)


def _calibrated_stage(
    anchor_dir: Path,
    merged_dir: Path,
    out: Path,
    public: DataSpec,
    device: torch.device,
    tokens: Path,
) -> Path:
    """The coordinator's calibration lever (:mod:`flexmoe_lab.levers`): only the public
    corpus's training split and the merged model's own rows are used."""
    anchor = load_anchor(anchor_dir)
    docs = load_splits([public]).get(Split.TRAIN)
    stream = pack_documents(docs, anchor.tokenizer, cache_dir=tokens)
    with on_device(anchor.model, device):
        inputs = ffn_inputs(anchor.model, stream)
    rows = torch.stack([m.router.weight.detach() for m in moe_layers(load_merged(merged_dir))])
    return write_rows(
        merged_dir,
        out,
        calibrated_rows(rows, inputs),
        method="margin spread on public text",
        public_tokens=len(inputs),
    )


def _ceiling_stage(
    merged_dir: Path,
    out: Path,
    specs: dict[str, DataSpec],
    settings: DemoSettings,
    device: torch.device,
    tokens: Path,
) -> Path:
    """The router ceiling (:mod:`flexmoe_lab.levers`): only the rows trained, on exactly
    the held-out text every model is scored on."""
    scored = [d for s in specs.values() for d in eval_documents(s, max_bytes=settings.eval_bytes)]
    cfg = replace(settings.tune, steps=settings.ceiling_steps)
    result = tune_router_on(
        merged_dir,
        scored,
        [],
        out=out,
        cfg=cfg,
        device=device,
        cache_dir=tokens,
        overwrite=True,
        where="held-out text",
    )
    return result.out


def _opt_out_stage(
    out: Path,
    merged_dir: Path,
    specs: dict[str, DataSpec],
    settings: DemoSettings,
    device: torch.device,
    tokens: Path,
    log: Callable[[str], None],
    opt_out: str = DEMO.opt_out,
    prompt: str = DEMO.opt_out_prompt,
) -> OptOutRecord:
    """The owner opts out through the model's store: the loaded model's next generation and
    score no longer use the expert, exactly as a model merged without it; then back in."""
    model, tokenizer = load_merged(merged_dir), load_tokenizer(merged_dir)
    slots = read_slots(merged_dir)

    def bpb(net: Any) -> float:
        [score] = evaluate_loaded(
            net,
            tokenizer,
            [specs[opt_out]],
            device=device,
            cache_dir=tokens,
            max_bytes=settings.eval_bytes,
        )
        return score.bits_per_byte

    def attribution(label: str) -> Generation:
        result = generate(
            model,
            tokenizer,
            prompt,
            slots=slots,
            max_new_tokens=24,
            seed=0,
            selection=Selection(opted_out=standing_exclusions(merged_dir, slots)),
        )
        log(f"{label}: {prompt}{result.text}")
        log(format_attribution(result, slots))
        return Generation(
            text=result.text, prompt=result.prompt_shares, generated=result.generated_shares
        )

    before = attribution(f"generation with every expert ({opt_out} in)")
    store = StandingStore(merged_dir)
    store.set(opt_out, opted_out=True, reason="demo: the owner withdraws", actor="demo")
    log(f"{opt_out} opted out; the same loaded model, no reload")
    after = attribution(f"generation after {opt_out} opted out")
    set_expert_mask(model, current_mask(merged_dir, slots, Selection()))
    opted_out = bpb(model)
    set_expert_mask(model, None)
    without_dir = out / f"merged-without-{opt_out}"
    remove_expert(merged_dir, opt_out, out=without_dir, overwrite=True)  # carries the opt-out store
    without = bpb(load_merged(without_dir))
    gap = abs(without - opted_out)
    log(
        f"{opt_out}: opted out {opted_out:.6f} bpb, merged without it {without:.6f} "
        f"(difference {gap:.1e})"
    )
    store.set(opt_out, opted_out=False, reason="demo: the owner returns", actor="demo")
    audit = [list(row) for row in store.audit()]
    store.close()
    return OptOutRecord(
        expert=opt_out,
        prompt=prompt,
        opted_out_bpb=opted_out,
        merged_without_bpb=without,
        bpb_difference_vs_merged_without=gap,
        generation_before=before,
        generation_after=after,
        audit=audit,
    )


def _audit_stage(
    anchor_dir: Path,
    package_dirs: list[Path],
    merged_dir: Path,
    specs: dict[str, DataSpec],
    settings: DemoSettings,
    device: torch.device,
    owner: str,
) -> AuditRecord:
    """Extraction rates of the anchor, the owner's specialist and the merged model on the
    owner's training documents (the same passages for all three)."""
    anchor = load_anchor(anchor_dir)
    packages = [load_package(p, anchor) for p in package_dirs]
    docs = load_splits([specs[owner]]).get(Split.TRAIN)
    passages = sample_passages(docs, anchor.tokenizer, settings.audit)
    rows = []
    for name in (ANCHOR, specialist(owner), FLEXMOE):
        model = build_baseline(
            name, anchor=anchor, packages=packages, device=device, merged_dir=merged_dir
        )
        assert isinstance(model, torch.nn.Module)
        result = audit_extraction(
            model, anchor.tokenizer, passages, settings.audit, name=name, device=device
        )
        rows.append(result)
    return AuditRecord(domain=owner, results=rows)
