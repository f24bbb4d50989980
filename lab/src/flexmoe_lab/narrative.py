"""The experiment's own sentences about its variants: what the top-k, bias, router-init and
router-lever rows say about the merged model's defaults, and what the variants say about the
bars it misses. Every number comes from the scores; :mod:`flexmoe_lab.report` places the
sentences in the report."""

from __future__ import annotations

from pathlib import Path

from flexmoe.errors import FlexMoEError
from flexmoe.evaluate.accounting import accounting_table
from flexmoe.evaluate.registry import (
    ANCHOR,
    BIAS,
    BTM,
    CALIBRATED,
    FEDAVG,
    FEDERATED,
    FLEXMOE,
    NO_BIAS,
    OWNER_TEXT_TUNED,
    RANDOM_INIT,
    ROUTER_CEILING,
    SEQ_ROUTE,
    TUNED,
    UNRESTRICTED,
    Base,
    Evaluation,
    Variant,
    describe,
    specialist,
    without,
)
from flexmoe.io import atomic_write_bytes
from flexmoe_lab import report
from flexmoe_lab.report import ROUNDS_PLOT, Narrative, checks, owner_domains, public_domain
from flexmoe_lab.results import AuditRecord, DemoResults, FederatedRecord, OptOutRecord, RunSettings


def narrative(results: Evaluation, owners: dict[str, str] | None = None) -> Narrative:
    return Narrative(settings=settings_measured(results), misses=investigation(results, owners))


def markdown(results: Evaluation, owners: dict[str, str] | None = None) -> str:
    """The report's experiment section with this experiment's narrative."""
    return report.markdown(results, owners, narrative(results, owners))


def write_report(results: Evaluation, out: Path, *, owners: dict[str, str] | None = None) -> Path:
    """:func:`flexmoe_lab.report.write_report` with this experiment's narrative."""
    typed = report.check_results(results, out)
    return report.write_report(typed, out, owners=owners, narrative=narrative(typed, owners))


def settings_measured(results: Evaluation) -> str:
    """What the top-k and bias variants say about the merged model's defaults."""
    models, lines = results.models, []
    top_k = results.top_k
    tops = {k: m for m in models if (k := _plain_top_k(m)) is not None}
    if tops and FLEXMOE in models and top_k is not None:
        tops[int(top_k)] = FLEXMOE
        ranked = sorted(tops, key=lambda k: results.average(tops[k]))
        best = ranked[0]
        lines.append(
            f"- top-k: the default is {top_k} ({results.average(FLEXMOE):.4f} average bits per "
            f"byte); the best measured is {best} ({results.average(tops[best]):.4f}); "
            + ", ".join(f"top-{k} {results.average(tops[k]):.4f}" for k in sorted(tops))
            + "."
        )
    other = NO_BIAS if results.default_bias else BIAS
    if other in models and FLEXMOE in models:
        state = "on" if results.default_bias else "off"
        change = results.average(other) / results.average(FLEXMOE) - 1
        lines.append(
            f"- the owners' learned biases: {state} by default; turning them "
            f"{'off' if state == 'on' else 'on'} changes the average by {change:+.2%}."
        )
    if FLEXMOE in models:
        if RANDOM_INIT in models:
            change = results.average(RANDOM_INIT) / results.average(FLEXMOE) - 1
            verdict = "keep" if change > 0 else "reconsider"
            lines.append(
                f"- router init: with the owners' rows started from random vectors instead of "
                f"their domain embeddings the average changes by {change:+.2%} ({RANDOM_INIT} "
                f"{results.average(RANDOM_INIT):.4f}); {verdict} domain-embedding init."
            )
        else:
            lines.append(
                "- router init: only the owners' method was scored (no random-init ablation; "
                "`flexmoe-lab demo --ablations` trains one)."
            )
    if CALIBRATED in models and FLEXMOE in models:
        change = results.average(CALIBRATED) / results.average(FLEXMOE) - 1
        lines.append(
            f"- the owners' rows rescaled by the coordinator on public text ({CALIBRATED}): "
            f"{change:+.2%} on average ({results.average(CALIBRATED):.4f}); off by default"
            + (", though it wins here." if change < 0 else ".")
        )
    if TUNED in models and FLEXMOE in models:
        change = results.average(TUNED) / results.average(FLEXMOE) - 1
        lines.append(
            f"- router tuning on proxy data: {change:+.2%} on average ({TUNED} "
            f"{results.average(TUNED):.4f} vs {results.average(FLEXMOE):.4f}). It stays off "
            "by default: it needs each owner to hand the coordinator a sample of its text, and a "
            "tuned router weakens strict opt-out (the rows were fitted together)."
        )
    return "\n".join(lines) or "- (no variants scored)"


def _plain_top_k(name: str) -> int | None:
    """K when ``name`` is the merged model at top-K with no other option, else None."""
    try:
        variant = Variant.parse(name)
    except FlexMoEError:  # a name from elsewhere: not a top-k variant
        return None
    plain = variant.top_k is not None and variant == Variant(Base.FLEXMOE, top_k=variant.top_k)
    return variant.top_k if plain else None


def _pct(new: float, old: float) -> str:
    return f"{new / old - 1:+.1%}"


def _public_note(results: Evaluation, owners: dict[str, str]) -> str | None:
    """Why public text misses its bar when every specialist is already worse there."""
    models, public = results.models, public_domain(results, owners)
    specialists = [k for k in (specialist(e) for e in owners) if k in models]
    if not (public and specialists and {ANCHOR, FLEXMOE} <= models.keys()):
        return None
    anchor = results.bpb(ANCHOR, public)
    worst = [results.bpb(k, public) for k in specialists]
    if min(worst) <= anchor or results.bpb(FLEXMOE, public) <= 1.01 * anchor:
        return None
    shares = results.routing_of().get(public, {})
    share = sum(v for e, v in shares.items() if e not in owners) if shares else None
    return (
        f"- Public text: every specialist is already {_pct(min(worst), anchor)} to "
        f"{_pct(max(worst), anchor)} worse than the anchor on {public}, so staying within 1% "
        "needs the public experts (the anchor's and any rivals) to take nearly all the routing "
        "mass there" + (f"; they take {share:.0%}." if share is not None else ".")
    )


def _ceiling_note(results: Evaluation) -> str | None:
    """What the router ceiling says about the gap to the document-level baselines."""
    models = results.models
    if not {ROUTER_CEILING, FLEXMOE} <= models.keys():
        return None
    ceiling = results.average(ROUTER_CEILING)
    rivals = {o: results.average(o) for o in (BTM, SEQ_ROUTE) if o in models}
    missed = [o for o, v in rivals.items() if ceiling > v]
    against = ", ".join(f"{o} {v:.4f}" for o, v in rivals.items())
    head = (
        f"- The router ceiling ({ROUTER_CEILING}: only the rows trained, on the very text scored "
        f"here) averages {ceiling:.4f}, against flexmoe {results.average(FLEXMOE):.4f}"
        + (f" and {against}" if against else "")
        + ". "
    )
    if missed:
        return head + (
            f"No lever that changes only the router can reach {' or '.join(missed)} with these "
            "experts: the rest of the gap is in what the experts and the anchor's hidden states "
            "let a per-token router tell apart at this size."
        )
    return head + "A router alone could close the gap; the default recipe does not find it."


def investigation(results: Evaluation, owners: dict[str, str] | None = None) -> str:
    """What the measured variants say about the bars the merged model misses, in sentences
    built from the scores (empty when there is nothing to say)."""
    owners = owner_domains(results, owners)
    models, lines = results.models, []
    routing, stolen = results.routing_of(), []
    for expert, domain in owners.items():
        shares = {e: v for e, v in routing.get(domain, {}).items() if e in owners}
        top = max(shares, key=lambda e: shares[e]) if shares else expert
        if top != expert:
            stolen.append(f"{domain} ({top} {shares[top]:.0%}, {expert} {shares[expert]:.0%})")
    if stolen:
        lines.append(
            "- Routing, not the experts: on " + ", ".join(stolen) + " text another owner's "
            "expert takes more routing mass than the text's own. Each owner trained its router "
            "row only against the public rows, so every row learned 'not public' rather than "
            "'mine'; merged, the row most aligned with that shared direction wins on other "
            "owners' text."
        )
    if FLEXMOE in models:
        helped = []
        for expert, domain in owners.items():
            key = without(expert)
            if key not in models:
                continue
            others = [d for d in results.domains if d != domain]
            gain = sum(results.bpb(key, d) / results.bpb(FLEXMOE, d) - 1 for d in others)
            if gain / len(others) < -0.01:
                helped.append(f"{expert} ({gain / len(others):+.1%} on the other domains)")
        if helped:
            lines.append(
                "- Leaving one expert out improves everyone else: " + ", ".join(helped) + ". "
                "That expert's row fires on text that is not its own."
            )
    note = _public_note(results, owners)
    if note:
        lines.append(note)
    if TUNED in models and FLEXMOE in models:
        moves = ", ".join(
            f"{d} {_pct(results.bpb(TUNED, d), results.bpb(FLEXMOE, d))}" for d in results.domains
        )
        passed = {
            m: sum(c.passed for c in checks(results, owners, m) if "routing" in c.claim)
            for m in (FLEXMOE, TUNED)
        }
        lines.append(
            f"- Router tuning on proxy data (only the rows trained, every expert frozen): {moves}; "
            f"domains whose own expert leads the routing: {passed[FLEXMOE]} untuned, "
            f"{passed[TUNED]} tuned."
        )
    note = _ceiling_note(results)
    if note:
        lines.append(note)
    if {UNRESTRICTED, FLEXMOE} <= models.keys():
        gap = _pct(results.average(FLEXMOE), results.average(UNRESTRICTED))
        lines.append(
            f"- flexmoe is {gap} from unrestricted on average"
            ": unrestricted trains every parameter (attention and embeddings too) on all "
            "domains together, where each owner trains one feed-forward expert against a frozen "
            "anchor."
        )
    return "\n".join(lines)


def summary(evaluation: Evaluation) -> str:
    """Bits per byte of each model (rows) on each domain, and the claims met."""
    domains = evaluation.domains
    lines = [f"{'model':<24}" + "".join(f"{d:>11}" for d in domains)]
    for name in evaluation.model_order():
        scores = "".join(f"{evaluation.bpb(name, d):>11.4f}" for d in domains)
        lines.append(f"{name:<24}{scores}")
    for model in (FLEXMOE, TUNED):
        found = checks(evaluation, model=model)
        if found:
            lines.append(f"{model}: claims met {sum(c.passed for c in found)} of {len(found)}")
    lines.append("(see the report)")
    return "\n".join(lines)


def demo_report(results: DemoResults, history: list[dict[str, float]]) -> str:
    """The demo's ``report.md``: how the run was made, the evaluation, the live opt-out, the
    extraction audit and the anchor's training curve."""
    evaluation = results.evaluation
    parts = [
        "# flexmoe-lab demo report",
        _how_made(results, evaluation),
        f"Model names: {describe(list(evaluation.models))}",
        markdown(evaluation),
        _federated_section(results, evaluation),
        _opt_out_section(results.opt_out),
        _audit_section(results.audit, results.settings),
        _curve_section(history),
    ]
    return "\n\n".join(part.strip() for part in parts if part.strip()) + "\n"


def _how_made(results: DemoResults, evaluation: Evaluation) -> str:
    training = results.anchor.training or {}
    expert_cfg = results.settings.expert
    fractions = {e.training.hyperparameters["public_fraction"] for e in results.experts.values()}
    public_share = ", ".join(f"{f:.0%}" for f in sorted(fractions))  # type: ignore[type-var]
    weights = {
        e.training.hyperparameters.get("router_objective", 0.0) for e in results.experts.values()
    }
    objective = ", ".join(f"{w:g}" for w in sorted(weights))  # type: ignore[type-var]
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in results.stage_seconds.items())
    rivals = results.rivals
    shipped = (
        f"The coordinator shipped it with {len(rivals)} public rival experts, each trained like "
        f"an owner's on one cluster of the public text ("
        + "; ".join(f"{name}: {about}" for name, about in rivals.items())
        + "), and every owner trained against them at the merge's top-k."
        if rivals
        else "The coordinator shipped no public rival experts with it."
    )
    slots = len(results.experts) + len(rivals) + 1
    return f"""Corpus set `{results.settings.corpora}`: {results.corpora_description}.

The anchor is a tiny OLMo-2 decoder trained only on the public domain. {shipped} Each owner
trained one expert alone, in its own process that was handed only its own domain's files and
the public corpus, against the frozen anchor ({expert_cfg["steps"]} steps of
{expert_cfg["batch_size"]} x {expert_cfg["seq_len"]} tokens, {public_share} of them public
text; router objective weight {objective}: the router also learns which tokens are the owner's),
and shipped only the expert. The coordinator merged the anchor, its rivals and the four
experts into one FlexOlmo model, top-{evaluation.top_k} of {slots} experts per token, router not
tuned after merging; the owners' learned biases are
{"on" if evaluation.default_bias else "off"} by default.

{_variants(results)}

- device: {results.device}; wall time: {results.seconds} s ({stages})
- anchor: {training["steps"]} steps, {training["tokens"]:,} tokens, final train loss
  {training["final_train_loss"]:.4f}, validation loss {training["final_val_loss"]:.4f}
- anchor fingerprint: `{results.anchor.fingerprint[:16]}...`
{_unrestricted_line(results, evaluation)}

"""


def _unrestricted_line(results: DemoResults, evaluation: Evaluation) -> str:
    if UNRESTRICTED not in evaluation.models:
        return ""
    steps = results.settings.unrestricted["steps"]
    return (
        f"- unrestricted: {steps} steps on all domains at once (every parameter trained), as "
        "many tokens as the four experts together"
    )


def _variants(results: DemoResults) -> str:
    """The router variants the run has (router tuning and the router levers: ``--ablations``)."""
    tuning, settings = results.router_tuning, results.settings
    if tuning is None:
        return (
            f"The unrestricted upper bound (`{UNRESTRICTED}`), router tuning (`{TUNED}`, the "
            "paper's proxy-data recipe), the router levers "
            f"(`{OWNER_TEXT_TUNED}`, `{CALIBRATED}`, `{ROUTER_CEILING}`), the other top-k and "
            "bias variants and what `--dp-owner-epsilon` costs in the federated rounds run with "
            "`--ablations`."
        )
    return f"""As a variant (`{TUNED}`, the paper's router tuning), each owner ranked the
public corpus's training documents at home with a small classifier (its own documents vs public
ones) and sent the coordinator only the sha256 of the
{settings.proxy_documents_per_owner} public documents most like its data
(`proxy/NAME.json`); the coordinator tuned only the router rows, every expert frozen, on those
public documents and as many other public ones ({tuning.steps} steps, {tuning.tokens:,}
tokens; recorded in the tuned model's slot table). No owner text is used, but jointly tuned
rows make opt-out less strict, so it is not the default. With `--ablations`,
`{OWNER_TEXT_TUNED}` is tuned instead on {settings.proxy_bytes_per_domain:,}
bytes of each owner's own training text (one window per document): that hands owner text
over, and is shown only for comparison. Two more router levers come with `--ablations`:
`{CALIBRATED}`, the owners' rows rescaled by the coordinator so that each one's margin over the
public row has the same spread on public text (public text and packages only; opt-out stays
exact), and `{ROUTER_CEILING}`, the rows fitted on the very held-out text scored below
({settings.ceiling_steps} steps): not a recipe, but a bound on every lever that
changes only the router."""


def _federated_section(results: DemoResults, evaluation: Evaluation) -> str:
    """``flexmoe:federated`` beside the other ways of training together, at what each costs one
    owner; the curve over the rounds; what ``--dp-owner-epsilon`` costs."""
    fed = results.federated
    if not fed or FEDERATED not in evaluation.models:
        return ""
    scores = {m: evaluation.average(m) for m in evaluation.models}
    table = accounting_table(results.accounting, scores)
    phases = " and ".join(f"{n} {p}" for p, n in fed.phase_steps.items())
    server = fed.server

    def public(model: str) -> str:
        return f"{evaluation.bpb(model, 'public'):.4f}" if "public" in evaluation.domains else "-"

    versus = [
        f"{_pct(scores[FEDERATED], scores[m])} against `{m}`"
        for m in (FLEXMOE, BTM, FEDAVG)
        if m in scores
    ]
    return f"""## Federated rounds (Flower)

`{FEDERATED}`: each owner trained its expert alone for {fed.expert_steps} steps (its
specialist, which btm uses, trained {fed.specialist_steps}) against the coordinator's rivals,
the experts were merged as the default merge is, and {fed.rounds} federated rounds followed on
Flower (`flexmoe fed simulate`, every owner a client on this machine, its text read by its own
client only). In each round every owner took {phases} step(s) at home: a trunk step trains the
parameters every owner shares ({_trunk_parts(fed)}) and the router
rows, its own and the other owners' experts frozen, and sends the change; the coordinator applies
the token-weighted average with {server["name"]} (lr {server["lr"]:g}), its state kept with each
trunk version. Each owner's steps in all: {fed.owner_steps}, the same as its specialist's.
`{FEDAVG}`: the anchor's dense model trained by FedAvg through the same Flower code,
{fed.fedavg_rounds} rounds of {fed.fedavg_steps} local steps per owner.

`{FEDERATED}` is {", ".join(versus)} (average bits per byte); public text
{public(FEDERATED)} against the merge's {public(FLEXMOE)}.

What one owner pays for each choice (the most any owner paid: every token it trained on, every
byte it sent; inference FLOPs per token against the anchor; whether its opt-out gives a model it
never shaped). The unrestricted bound, which hands every owner's text over, runs with
`--ablations`.

{table}
{_rounds_table(fed, evaluation)}{_privacy_table(fed)}"""


def _trunk_parts(fed: FederatedRecord) -> str:
    vocabulary = {
        "output": ", the output layer",
        "all": ", the input embeddings and the output layer",
    }.get(fed.trunk_embeddings, "")
    return f"attention, norms, the public and rival experts{vocabulary}"


def _rounds_table(fed: FederatedRecord, evaluation: Evaluation) -> str:
    curve = fed.bpb_by_round
    if not curve:
        return ""
    rows = "\n".join(
        f"| {c.round}{' (the merge, before any round)' if c.round == 0 else ''} | "
        f"{_mean(c.bpb):.4f} | {c.bpb.get('public', 0.0):.4f} |"
        for c in curve
    )
    return f"""
Bits per byte after every {fed.curve_every} rounds (the same held-out text;
`{ROUNDS_PLOT}`):

| after round | average bpb | public |
| --- | ---: | ---: |
{rows}
"""


def _privacy_table(fed: FederatedRecord) -> str:
    cost = fed.privacy_cost
    if not cost:
        return ""
    rows = "\n".join(
        f"| {_budget(c.epsilon)} | {c.noise_multiplier:.3f} | {_mean(c.bpb):.4f} | "
        f"{c.bpb.get('public', 0.0):.4f} |"
        for c in cost
    )
    return f"""
What `--dp-owner-epsilon` costs: the same rounds on the same merge with every router and trunk
update clipped and noised at home (each owner's epsilon over all its updates, delta 1e-5; clipping
norms {cost[-1].clip}):

| epsilon | noise multiplier | average bpb | public |
| --- | ---: | ---: | ---: |
{rows}
"""


def _opt_out_section(opt: OptOutRecord) -> str:
    before, after = opt.generation_before.generated, opt.generation_after.generated
    shares = "\n".join(
        f"| {name} | {before.get(name, 0.0):.1%} | {after.get(name, 0.0):.1%} |" for name in before
    )
    log_rows = "\n".join(f"- {row[0]} {row[1]} {row[2]}: {row[3]}" for row in opt.audit)
    return f"""## One owner opts out, live

The {opt.expert} owner opted out (`flexmoe members opt-out`) while the merged model stayed
loaded. On {opt.expert} text the opted-out model scores {opt.opted_out_bpb:.6f} bpb and a
model merged without that expert (`flexmoe merge remove`) {opt.merged_without_bpb:.6f}
(difference {opt.bpb_difference_vs_merged_without:.1e}).

Generation from "{opt.prompt}" (seed 0), share of routing mass per expert over the generated
tokens:

| expert | every expert in | {opt.expert} opted out |
| --- | ---: | ---: |
{shares}

The owner then opted back in; the audit log of the model's opt-out store holds both changes:
{log_rows}

"""


def _audit_section(audit: AuditRecord, settings: RunSettings) -> str:
    audit_rows = "\n".join(
        f"| {r.model} | {r.documents} | {r.extracted_documents} | {r.rate:.1%} "
        f"| {r.mean_best_similarity:.3f} |"
        for r in audit.results
    )
    a = settings.audit
    return f"""## Extraction audit ({audit.domain} training documents)

{a["documents"]} passages: a {a["prefix_tokens"]}-token prefix, {a["samples"]} sampled
continuations of {a["suffix_tokens"]} tokens each (top-k {a["top_k"]}, top-p {a["top_p"]},
temperature {a["temperature"]}); extracted when the normalised Levenshtein similarity to the true
continuation is at least {a["threshold"]}. The paper reports 0.1% (public model), 1.6% (expert)
and 0.7% (merged) at 7B scale; `tests/test_extraction.py` checks that a model over-trained on a
few documents is caught.

| model | passages | extracted | rate | mean best similarity |
| --- | ---: | ---: | ---: | ---: |
{audit_rows}

"""


def _curve_section(history: list[dict[str, float]]) -> str:
    curve = "\n".join(
        f"| {h['step']} | {h['loss']:.4f} | {h['val_loss']:.4f} |"
        for h in history
        if "val_loss" in h
    )
    return f"""## Anchor training curve

| step | train loss | validation loss |
| ---: | ---: | ---: |
{curve}

All numbers are in `results.json`.
"""


RESULTS_BEGIN = "<!-- demo results: begin -->"
RESULTS_END = "<!-- demo results: end -->"


def _results_page(page: Path) -> tuple[str, str]:
    """The text of ``page`` before and after its demo block."""
    page = Path(page)
    try:
        text = page.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise FlexMoEError(page, f"cannot read the results page ({e})") from e
    head, begin, rest = text.partition(RESULTS_BEGIN)
    _, end, tail = rest.partition(RESULTS_END)
    if not begin or not end:
        raise FlexMoEError(page, f"has no {RESULTS_BEGIN} ... {RESULTS_END} block to refresh")
    return head, tail


def check_results_page(page: Path) -> None:
    """Refuse, before a long run, a page that :func:`refresh_results_page` could not refresh."""
    _results_page(page)


def refresh_results_page(page: Path, evaluation: Evaluation, made_by: str) -> None:
    """Put this run's bits per byte into the block of ``page`` (docs/results.md) between
    :data:`RESULTS_BEGIN` and :data:`RESULTS_END`; the rest of the page stays as it is."""
    head, tail = _results_page(page)
    domains = evaluation.domains
    rows = [
        f"| {m} | "
        + " | ".join(f"{evaluation.bpb(m, d):.4f}" for d in domains)
        + f" | {evaluation.average(m):.4f} |"
        for m in evaluation.model_order()
    ]
    block = (
        f"The demo's own scores (bits per byte on held-out text, lower is better), written by "
        f"`{made_by}`:\n\n| model | {' | '.join(domains)} | average |\n"
        f"| --- |{' ---: |' * (len(domains) + 1)}\n" + "\n".join(rows)
    )
    text = f"{head}{RESULTS_BEGIN}\n{block}\n{RESULTS_END}{tail}"
    atomic_write_bytes(Path(page), text.encode("utf-8"))


def _mean(bpb: dict[str, float]) -> float:
    return sum(bpb.values()) / len(bpb)


def _budget(epsilon: float | None) -> str:
    return "no noise" if epsilon is None else f"{epsilon:g}"
