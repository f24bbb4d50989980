"""The experiment's report: markdown tables, PNG plots and the paper's claims checked.

Input is the :class:`~flexmoe.evaluate.registry.Evaluation` that
:func:`flexmoe.evaluate.suite.run_suite` returns (or ``evaluation.json`` read back); every number
printed comes from it. Owners' experts are matched to their domains by name unless ``owners``
says otherwise.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from flexmoe.evaluate.registry import (
    ANCHOR,
    BTM,
    FLEXMOE,
    MAIN_MODELS,
    SEQ_ROUTE,
    SOUP,
    TUNED,
    UNRESTRICTED,
    Evaluation,
    Variant,
    specialist,
    without,
)
from flexmoe.io import atomic_write_bytes, read_json, write_json

PLOTS = {
    "bpb": "bpb_heatmap.png",
    "improvement": "improvement_over_anchor.png",
    "opt_out": "opt_out_effect.png",
    "routing": "routing_shares.png",
    "cost": "cost_vs_quality.png",
}
ROUNDS_PLOT = "federated_rounds.png"  # the federated stage's curve (:func:`rounds_plot`)


@dataclass(frozen=True)
class Check:
    claim: str
    measured: str
    passed: bool


def check_results(results: Any, where: Path | str) -> Evaluation:
    """The scores a report needs (JSON read from a file, or already typed), or a one-line error
    naming the first missing field."""
    if isinstance(results, Evaluation):
        return results
    return Evaluation.read(results, where)


def owner_domains(results: Evaluation, owners: dict[str, str] | None = None) -> dict[str, str]:
    """expert -> the domain of its owner's text (by name when not given)."""
    found = dict(owners or {})
    for expert in results.experts:
        if expert not in found and expert in results.domains:
            found[expert] = expert
    return found


def public_domain(results: Evaluation, owners: dict[str, str]) -> str | None:
    rest = [d for d in results.domains if d not in owners.values()]
    return "public" if "public" in rest else (rest[0] if len(rest) == 1 else None)


def checks(
    results: Evaluation, owners: dict[str, str] | None = None, model: str = FLEXMOE
) -> list[Check]:
    """The issue's bars for a merged model (``flexmoe`` or ``flexmoe:tuned``), each measured."""
    owners = owner_domains(results, owners)
    models = results.models
    found: list[Check] = []
    for expert, domain in owners.items():
        key = specialist(expert)
        if key in models and model in models:
            m, s = results.bpb(model, domain), results.bpb(key, domain)
            claim = f"on {domain}, merged within 3% of the {expert} specialist"
            found.append(Check(claim, f"{m:.4f} vs {s:.4f} ({m / s - 1:+.1%})", m <= 1.03 * s))
    public = public_domain(results, owners)
    if public is not None and {model, ANCHOR} <= models.keys():
        m, a = results.bpb(model, public), results.bpb(ANCHOR, public)
        found.append(
            Check(
                f"on {public}, merged within 1% of the anchor",
                f"{m:.4f} vs {a:.4f} ({m / a - 1:+.1%})",
                m <= 1.01 * a,
            )
        )
    if model in models:
        mine = results.average(model)
        for other in (ANCHOR, SOUP, SEQ_ROUTE, BTM):
            if other in models:
                theirs = results.average(other)
                found.append(
                    Check(
                        f"merged better on average than {other}",
                        f"{mine:.4f} vs {theirs:.4f}",
                        mine < theirs,
                    )
                )
        if UNRESTRICTED in models:
            top = results.average(UNRESTRICTED)
            found.append(
                Check(
                    "merged within 5% of unrestricted on average",
                    f"{mine:.4f} vs {top:.4f} ({mine / top - 1:+.1%})",
                    mine <= 1.05 * top,
                )
            )
    found += _opt_out_checks(results, owners, model)
    routing = results.routing_of(model)
    for expert, domain in owners.items():  # among the owners' experts: not public, not rivals
        shares = {e: s for e, s in routing.get(domain, {}).items() if e in owners}
        if shares:
            lead = max(shares, key=lambda e: shares[e])
            found.append(
                Check(
                    f"on {domain}, {expert} has the largest non-public routing share",
                    f"{expert} {shares[expert]:.1%}, largest {lead} {shares[lead]:.1%}",
                    lead == expert,
                )
            )
    return found


def _opt_out_checks(results: Evaluation, owners: dict[str, str], model: str) -> list[Check]:
    """Each owner's opt-out: its own domain back toward the anchor, the others left alone."""
    models, found = results.models, []
    for expert, domain in owners.items():
        key = replace(Variant.parse(model), without=(expert,)).name()
        if key not in models or model not in models:
            continue
        m, w = results.bpb(model, domain), results.bpb(key, domain)
        toward = ANCHOR in models and abs(w - results.bpb(ANCHOR, domain)) < abs(
            m - results.bpb(ANCHOR, domain)
        )
        found.append(
            Check(
                f"opting out of {expert} moves {domain} back toward the anchor",
                f"{m:.4f} -> {w:.4f}",
                toward,
            )
        )
        others = [d for d in results.domains if d != domain]
        moves = {d: results.bpb(key, d) / results.bpb(model, d) - 1 for d in others}
        worst = max(moves, key=lambda d: abs(moves[d]))
        found.append(
            Check(
                f"opting out of {expert} moves every other domain by at most 1%",
                f"largest: {worst} {moves[worst]:+.2%}",
                abs(moves[worst]) <= 0.01,
            )
        )
    return found


def _heatmap(
    ax: Any, values: list[list[float]], rows: list[str], cols: list[str], fmt: str, cmap: str
) -> None:
    image = ax.imshow(values, cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            ax.text(j, i, format(value, fmt), ha="center", va="center", fontsize=7)
    ax.figure.colorbar(image, ax=ax)


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def plot_files(results: Evaluation, owners: dict[str, str] | None = None) -> dict[str, bytes]:
    """PNG bytes of each plot, keyed by file name."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    owners = owner_domains(results, owners)
    domains, models = results.domains, results.model_order()
    files: dict[str, bytes] = {}
    fig, ax = plt.subplots(figsize=(1.4 * len(domains) + 3, 0.35 * len(models) + 1.5))
    _heatmap(
        ax,
        [[results.bpb(m, d) for d in domains] for m in models],
        models,
        domains,
        ".3f",
        "viridis_r",
    )
    ax.set_title("bits per byte (lower is better)")
    files[PLOTS["bpb"]] = _png(fig)
    plt.close(fig)

    shown = [m for m in MAIN_MODELS if m in results.models and m != ANCHOR]
    if ANCHOR in results.models and shown:
        fig, ax = plt.subplots(figsize=(1.6 * len(domains) + 2, 3.5))
        width = 0.8 / len(shown)
        for i, model in enumerate(shown):
            gains = [100 * (1 - results.bpb(model, d) / results.bpb(ANCHOR, d)) for d in domains]
            ax.bar([j + i * width for j in range(len(domains))], gains, width, label=model)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(domains))], domains)
        ax.set_ylabel("% fewer bits per byte than the anchor")
        ax.axhline(0, color="black", linewidth=0.5)
        ax.legend(fontsize=7)
        files[PLOTS["improvement"]] = _png(fig)
        plt.close(fig)

    left_out = [e for e in owners if without(e) in results.models]
    if left_out and FLEXMOE in results.models:
        fig, ax = plt.subplots(figsize=(1.4 * len(domains) + 3, 0.5 * len(left_out) + 1.5))
        change = [
            [100 * (results.bpb(without(e), d) / results.bpb(FLEXMOE, d) - 1) for d in domains]
            for e in left_out
        ]
        _heatmap(ax, change, [f"without {e}" for e in left_out], domains, "+.2f", "Reds")
        ax.set_title("opt-out: % change in bits per byte against the merged model")
        files[PLOTS["opt_out"]] = _png(fig)
        plt.close(fig)

    for name, png in (
        (PLOTS["routing"], _routing_plot(plt, results)),
        (PLOTS["cost"], _cost_plot(plt, results)),
    ):
        if png is not None:
            files[name] = png
    return files


def _routing_plot(plt: Any, results: Evaluation) -> bytes | None:
    """PNG bytes of the merged models' routing mass per text domain and expert, or None."""
    matrices = {m: results.routing_of(m) for m in (FLEXMOE, TUNED) if results.routing_of(m)}
    if not matrices:
        return None
    first = next(iter(matrices.values()))
    experts = list(next(iter(first.values())))
    fig, axes = plt.subplots(
        1,
        len(matrices),
        figsize=(len(matrices) * (1.3 * len(experts) + 3), 0.5 * len(first) + 1.8),
        squeeze=False,
    )
    for ax, (model, routing) in zip(axes[0], matrices.items(), strict=True):
        _heatmap(
            ax,
            [[100 * routing[d][e] for e in experts] for d in routing],
            list(routing),
            experts,
            ".1f",
            "Blues",
        )
        ax.set_title(f"{model}: % of routing mass, text domain x expert", fontsize=9)
    png = _png(fig)
    plt.close(fig)
    return png


def _cost_plot(plt: Any, results: Evaluation) -> bytes | None:
    """PNG bytes of quality against inference cost, or None when no model is priced."""
    priced = [
        m for m in results.model_order() if m in results.cost and not m.startswith(without(""))
    ]
    if not priced:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for model in priced:
        main = model in MAIN_MODELS
        x, y = results.cost[model], results.average(model)
        ax.scatter([x], [y], s=28 if main else 12, color="C3" if main else "C0")
        ax.annotate(
            model, (x, y), fontsize=6 if main else 5, xytext=(3, 2), textcoords="offset points"
        )
    ax.set_xlabel("inference FLOPs per token (anchor = 1)")
    ax.set_ylabel("bits per byte, average over domains (lower is better)")
    ax.set_title("quality against inference cost", fontsize=9)
    png = _png(fig)
    plt.close(fig)
    return png


def rounds_plot(curve: list[tuple[int, float]], references: dict[str, float]) -> bytes:
    """PNG bytes: bits per byte after each scored round (``curve``: round, average), with each
    of ``references`` (name -> average) as a level line."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot([r for r, _ in curve], [b for _, b in curve], marker="o", label="flexmoe:federated")
    for i, (name, level) in enumerate(references.items()):
        ax.axhline(level, linestyle="--", linewidth=1, color=f"C{i + 1}", label=name)
    ax.set_xlabel("federated round (0: the merge of the first experts)")
    ax.set_ylabel("bits per byte, average over domains")
    ax.set_title("bits per byte after each round (lower is better)", fontsize=9)
    ax.legend(fontsize=7)
    data = _png(fig)
    plt.close(fig)
    return data


def mixture_section(results: Evaluation) -> str:
    """Every model on the text that needs two experts, and whether per-token routing (the
    merged model) beats the document-level baselines there."""
    if not results.mixtures:
        return ""
    mixes, models = results.mixtures, results.model_order()
    head = "| model | " + " | ".join(mixes) + " | average | cost |"
    rule = "| --- |" + " ---: |" * (len(mixes) + 2)
    rows = [
        f"| {m} | "
        + " | ".join(f"{results.bpb(m, x):.4f}" for x in mixes)
        + f" | {sum(results.bpb(m, x) for x in mixes) / len(mixes):.4f} | {_cost(results, m)} |"
        for m in models
        if all(x in results.models[m] for x in mixes)
    ]
    verdicts = []
    for rival in (BTM, SEQ_ROUTE):
        if {FLEXMOE, rival} <= results.models.keys():
            won = [x for x in mixes if results.bpb(FLEXMOE, x) < results.bpb(rival, x)]
            gaps = ", ".join(
                f"{x} {results.bpb(FLEXMOE, x) / results.bpb(rival, x) - 1:+.1%}" for x in mixes
            )
            verdicts.append(
                f"- per-token routing (`{FLEXMOE}`) against `{rival}`: "
                f"{'wins' if len(won) == len(mixes) else 'does not win'} "
                f"({len(won)} of {len(mixes)}; {gaps})."
            )
    return f"""## Text that needs two experts (bits per byte)

Held-out documents made of alternating passages (about 512 bytes each, six a document) of two
domains' test text; on one domain's text btm equals that owner's specialist, here it cannot.

{head}
{rule}
{chr(10).join(rows)}

{chr(10).join(verdicts)}
"""


def _cost(results: Evaluation, model: str) -> str:
    return f"{results.cost[model]:.2f}x" if model in results.cost else "-"


@dataclass(frozen=True)
class Narrative:
    """Sentences an experiment writes about its own variants (see
    :mod:`flexmoe_lab.narrative`): what the settings measured say, and what the
    variants say about the misses."""

    settings: str
    misses: str


def markdown(
    results: Evaluation, owners: dict[str, str] | None = None, narrative: Narrative | None = None
) -> str:
    """The report's experiment section (the plots are referenced by file name), with the
    experiment's ``narrative`` where given."""
    domains, models = results.domains, results.model_order()
    priced = bool(results.cost)
    head = "| model | " + " | ".join(domains) + " | average |" + (" cost |" if priced else "")
    rule = "| --- |" + " ---: |" * (len(domains) + 1 + priced)
    rows = [
        f"| {m} | "
        + " | ".join(f"{results.bpb(m, d):.4f}" for d in domains)
        + f" | {results.average(m):.4f} |"
        + (f" {_cost(results, m)} |" if priced else "")
        for m in models
    ]
    cost_note = (
        "\n\ncost: inference FLOPs per token relative to the anchor (every model a baseline "
        "runs counted; see `flexmoe.evaluate.cost`).\n\n![quality against inference cost]"
        "(cost_vs_quality.png)"
        if priced
        else ""
    )
    tables = []
    for model in (FLEXMOE, TUNED):
        found = checks(results, owners, model)
        if not found:
            continue
        claims = "\n".join(
            f"| {c.claim} | {c.measured} | {'yes' if c.passed else '**no**'} |" for c in found
        )
        tables.append(
            f"`{model}`: {sum(c.passed for c in found)} of {len(found)} met.\n\n"
            f"| claim | measured | met |\n| --- | --- | :---: |\n{claims}\n"
        )
    routing_tables = []
    for model in (FLEXMOE, TUNED):
        routing = results.routing_of(model)
        if not routing:
            continue
        experts = list(next(iter(routing.values())))
        rows_text = "\n".join(
            f"| {d} | " + " | ".join(f"{routing[d][e]:.1%}" for e in experts) + " |"
            for d in routing
        )
        routing_tables.append(
            f"`{model}`:\n\n| domain | {' | '.join(experts)} |\n| --- |"
            f"{' ---: |' * len(experts)}\n{rows_text}\n"
        )
    two_experts = mixture_section(results).strip()
    two_experts = f"{two_experts}\n\n" if two_experts else ""
    tried = narrative.misses if narrative else ""
    tried_section = f"## What the variants say about the misses\n\n{tried}\n\n" if tried else ""
    settings = f"## Settings, measured\n\n{narrative.settings}\n\n" if narrative is not None else ""
    sample = (
        f"at most {results.max_bytes:,} bytes per domain"
        if results.max_bytes
        else "the whole test split"
    )
    return f"""## Every model on the same held-out text (bits per byte, {sample})

{head}
{rule}
{chr(10).join(rows)}{cost_note}

![bits per byte](bpb_heatmap.png)

![improvement over the anchor](improvement_over_anchor.png)

{two_experts}{settings}## The paper's claims, measured

{chr(10).join(tables)}
{tried_section}## Opting out, expert by expert

![opt-out effect](opt_out_effect.png)

## Routing shares of the merged model (domain of the text x expert)

{chr(10).join(routing_tables)}

![routing shares](routing_shares.png)
"""


DP_RESULTS = "dp_tradeoff.json"  # written into a run by lab/experiments/dp_tradeoff.py


def privacy_section(path: Path) -> str:
    """The cost of differential privacy measured on this run's anchor (one owner's expert
    trained without DP and at each epsilon): held-out bits per byte, extraction, speed."""
    found = read_json(path)
    rows = found["rows"]
    domains = list(rows[0]["bpb"])
    base = rows[0]
    head = (
        "| setting | epsilon spent | noise | "
        + " | ".join(f"{d} bpb" for d in domains)
        + " | extracted | best similarity | tokens/s |"
    )
    rule = "| --- |" + " ---: |" * (len(domains) + 5)
    lines = [head, rule]
    for r in rows:
        spent = f"{r['epsilon']:.3g}" if r["epsilon"] is not None else "-"
        noise = f"{r['noise_multiplier']:.3g}" if r["noise_multiplier"] is not None else "-"
        cells = " | ".join(f"{r['bpb'][d]:.4f}" for d in domains)
        speed = f"{r['tokens_per_s']:,.0f} ({r['tokens_per_s'] / base['tokens_per_s']:.2f}x)"
        lines.append(
            f"| {r['setting']} | {spent} | {noise} | {cells} | {r['extraction_rate']:.1%} | "
            f"{r['mean_best_similarity']:.3f} | {speed} |"
        )
    anchor = " | ".join(f"{base['anchor_bpb'][d]:.4f}" for d in domains)
    lines.append(f"| anchor alone | | | {anchor} | | | |")
    return f"""## Differential privacy, measured

The `{found["domain"]}` owner's expert on the `{found["corpora"]}` corpora, trained again with
this run's expert settings: without DP, then with DP-SGD (`--dp-record-epsilon`, delta
{found["delta"]:g}, clip {found["max_grad_norm"]:g}). Bits per byte are the owner's 2-expert
specialist on held-out text; extraction is the audit on {found["audit_documents"]} of its
training documents; tokens/s is the training loop alone, one run each (noisy: for the speed
ratio see `benchmarks/dp_speed.py`, which alternates runs). Epsilon is per training block.
Made by `python lab/experiments/dp_tradeoff.py RUN --corpora {found["corpora"]}`.

{chr(10).join(lines)}
"""


def with_privacy_section(report: Path, results: Path) -> None:
    """Put the DP table measured in ``results`` at the end of the run's ``report`` in place of
    any earlier one (the file is rewritten atomically)."""
    text = report.read_text().split("## Differential privacy, measured")[0].rstrip()
    atomic_write_bytes(report, (text + "\n\n" + privacy_section(results)).encode())


def write_report(
    results: Evaluation,
    out: Path,
    *,
    owners: dict[str, str] | None = None,
    title: str = "flexmoe evaluation report",
    narrative: Narrative | None = None,
) -> Path:
    """Write ``report.md``, the plots and ``evaluation.json`` into ``out``; each file atomically."""
    results = check_results(results, out)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in plot_files(results, owners).items():
        atomic_write_bytes(out / name, data)
    write_json(out / "evaluation.json", results.model_dump(mode="json", exclude_unset=True))
    report = out / "report.md"
    text = f"# {title}\n\n{markdown(results, owners, narrative)}"
    if (out / DP_RESULTS).is_file():
        text += "\n" + privacy_section(out / DP_RESULTS)
    atomic_write_bytes(report, text.encode())
    return report
