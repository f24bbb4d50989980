"""The experiment's report: markdown tables, PNG plots and the paper's claims checked.

Input is the dict :func:`flexmoe.evaluate.suite.run_suite` returns; every number printed comes
from it. Owners' experts are matched to their domains by name unless ``owners`` says otherwise.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flexmoe.evaluate.registry import (
    BIAS,
    CALIBRATED,
    MAIN_MODELS,
    NO_BIAS,
    RANDOM_INIT,
    ROUTER_CEILING,
    TOP_K_PREFIX,
    TUNED,
    Evaluation,
    specialist,
    without,
)
from flexmoe.io import atomic_write_bytes, read_json, write_json

# Where each merged model's routing-share matrix is kept in the results.
ROUTING_KEYS = {"flexmoe": "routing", TUNED: "routing_tuned"}
PLOTS = {
    "bpb": "bpb_heatmap.png",
    "improvement": "improvement_over_anchor.png",
    "opt_out": "opt_out_effect.png",
    "routing": "routing_shares.png",
}


@dataclass(frozen=True)
class Check:
    claim: str
    measured: str
    passed: bool


def model_order(results: dict[str, Any]) -> list[str]:
    """Scored models in the order they were run (JSON files keep keys sorted)."""
    order = [m for m in results.get("order", []) if m in results["models"]]
    return order + [m for m in results["models"] if m not in order]


def check_results(results: Any, where: Path | str) -> dict[str, Any]:
    """The scores a report needs, or a one-line error naming the first missing field."""
    Evaluation.read(results, where)
    return dict(results)


def bpb(results: dict[str, Any], model: str, domain: str) -> float:
    return float(results["models"][model][domain]["bits_per_byte"])


def average(results: dict[str, Any], model: str) -> float:
    domains = results["domains"]
    return sum(bpb(results, model, d) for d in domains) / len(domains)


def owner_domains(results: dict[str, Any], owners: dict[str, str] | None = None) -> dict[str, str]:
    """expert -> the domain of its owner's text (by name when not given)."""
    found = dict(owners or {})
    for expert in results["experts"]:
        if expert not in found and expert in results["domains"]:
            found[expert] = expert
    return found


def public_domain(results: dict[str, Any], owners: dict[str, str]) -> str | None:
    rest = [d for d in results["domains"] if d not in owners.values()]
    return "public" if "public" in rest else (rest[0] if len(rest) == 1 else None)


def routing_of(results: dict[str, Any], model: str = "flexmoe") -> dict[str, dict[str, float]]:
    """The routing-share matrix (domain -> expert -> share) measured for ``model``, if any."""
    key = ROUTING_KEYS.get(model)
    return dict(results.get(key) or {}) if key else {}


def checks(
    results: dict[str, Any], owners: dict[str, str] | None = None, model: str = "flexmoe"
) -> list[Check]:
    """The issue's bars for a merged model (``flexmoe`` or ``flexmoe:tuned``), each measured."""
    owners = owner_domains(results, owners)
    models = results["models"]
    found: list[Check] = []
    for expert, domain in owners.items():
        key = specialist(expert)
        if key in models and model in models:
            m, s = bpb(results, model, domain), bpb(results, key, domain)
            claim = f"on {domain}, merged within 3% of the {expert} specialist"
            found.append(Check(claim, f"{m:.4f} vs {s:.4f} ({m / s - 1:+.1%})", m <= 1.03 * s))
    public = public_domain(results, owners)
    if public is not None and {model, "anchor"} <= models.keys():
        m, a = bpb(results, model, public), bpb(results, "anchor", public)
        found.append(
            Check(
                f"on {public}, merged within 1% of the anchor",
                f"{m:.4f} vs {a:.4f} ({m / a - 1:+.1%})",
                m <= 1.01 * a,
            )
        )
    if model in models:
        mine = average(results, model)
        for other in ("anchor", "soup", "seq-route", "btm"):
            if other in models:
                theirs = average(results, other)
                found.append(
                    Check(
                        f"merged better on average than {other}",
                        f"{mine:.4f} vs {theirs:.4f}",
                        mine < theirs,
                    )
                )
        if "unrestricted" in models:
            top = average(results, "unrestricted")
            found.append(
                Check(
                    "merged within 5% of unrestricted on average",
                    f"{mine:.4f} vs {top:.4f} ({mine / top - 1:+.1%})",
                    mine <= 1.05 * top,
                )
            )
    for expert, domain in owners.items():
        key = f"{model}:without-{expert}"
        if key not in models or model not in models:
            continue
        m, w = bpb(results, model, domain), bpb(results, key, domain)
        toward = "anchor" in models and abs(w - bpb(results, "anchor", domain)) < abs(
            m - bpb(results, "anchor", domain)
        )
        found.append(
            Check(
                f"opting out of {expert} moves {domain} back toward the anchor",
                f"{m:.4f} -> {w:.4f}",
                toward,
            )
        )
        others = [d for d in results["domains"] if d != domain]
        moves = {d: bpb(results, key, d) / bpb(results, model, d) - 1 for d in others}
        worst = max(moves, key=lambda d: abs(moves[d]))
        found.append(
            Check(
                f"opting out of {expert} moves every other domain by at most 1%",
                f"largest: {worst} {moves[worst]:+.2%}",
                abs(moves[worst]) <= 0.01,
            )
        )
    routing = routing_of(results, model)
    public_name = results.get("public_expert")
    for expert, domain in owners.items():
        shares = {e: s for e, s in routing.get(domain, {}).items() if e != public_name}
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


def plot_files(results: dict[str, Any], owners: dict[str, str] | None = None) -> dict[str, bytes]:
    """PNG bytes of each plot, keyed by file name."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    owners = owner_domains(results, owners)
    domains, models = results["domains"], model_order(results)
    files: dict[str, bytes] = {}
    fig, ax = plt.subplots(figsize=(1.4 * len(domains) + 3, 0.35 * len(models) + 1.5))
    _heatmap(
        ax,
        [[bpb(results, m, d) for d in domains] for m in models],
        models,
        domains,
        ".3f",
        "viridis_r",
    )
    ax.set_title("bits per byte (lower is better)")
    files[PLOTS["bpb"]] = _png(fig)
    plt.close(fig)

    shown = [m for m in MAIN_MODELS if m in results["models"] and m != "anchor"]
    if "anchor" in results["models"] and shown:
        fig, ax = plt.subplots(figsize=(1.6 * len(domains) + 2, 3.5))
        width = 0.8 / len(shown)
        for i, model in enumerate(shown):
            gains = [
                100 * (1 - bpb(results, model, d) / bpb(results, "anchor", d)) for d in domains
            ]
            ax.bar([j + i * width for j in range(len(domains))], gains, width, label=model)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(domains))], domains)
        ax.set_ylabel("% fewer bits per byte than the anchor")
        ax.axhline(0, color="black", linewidth=0.5)
        ax.legend(fontsize=7)
        files[PLOTS["improvement"]] = _png(fig)
        plt.close(fig)

    left_out = [e for e in owners if without(e) in results["models"]]
    if left_out and "flexmoe" in results["models"]:
        fig, ax = plt.subplots(figsize=(1.4 * len(domains) + 3, 0.5 * len(left_out) + 1.5))
        change = [
            [100 * (bpb(results, without(e), d) / bpb(results, "flexmoe", d) - 1) for d in domains]
            for e in left_out
        ]
        _heatmap(ax, change, [f"without {e}" for e in left_out], domains, "+.2f", "Reds")
        ax.set_title("opt-out: % change in bits per byte against the merged model")
        files[PLOTS["opt_out"]] = _png(fig)
        plt.close(fig)

    matrices = {m: routing_of(results, m) for m in ROUTING_KEYS if routing_of(results, m)}
    if matrices:
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
        files[PLOTS["routing"]] = _png(fig)
        plt.close(fig)
    return files


def settings_measured(results: dict[str, Any]) -> str:
    """What the top-k and bias variants say about the merged model's defaults."""
    models, lines = results["models"], []
    top_k = results.get("top_k")
    tops = {int(m.removeprefix(TOP_K_PREFIX)): m for m in models if m.startswith(TOP_K_PREFIX)}
    if tops and "flexmoe" in models and top_k is not None:
        tops[int(top_k)] = "flexmoe"
        ranked = sorted(tops, key=lambda k: average(results, tops[k]))
        best = ranked[0]
        lines.append(
            f"- top-k: the default is {top_k} ({average(results, 'flexmoe'):.4f} average bits per "
            f"byte); the best measured is {best} ({average(results, tops[best]):.4f}); "
            + ", ".join(f"top-{k} {average(results, tops[k]):.4f}" for k in sorted(tops))
            + "."
        )
    other = NO_BIAS if results.get("default_bias") else BIAS
    if other in models and "flexmoe" in models:
        state = "on" if results.get("default_bias") else "off"
        change = average(results, other) / average(results, "flexmoe") - 1
        lines.append(
            f"- the owners' learned biases: {state} by default; turning them "
            f"{'off' if state == 'on' else 'on'} changes the average by {change:+.2%}."
        )
    if "flexmoe" in models:
        if RANDOM_INIT in models:
            change = average(results, RANDOM_INIT) / average(results, "flexmoe") - 1
            verdict = "keep" if change > 0 else "reconsider"
            lines.append(
                f"- router init: with the owners' rows started from random vectors instead of "
                f"their domain embeddings the average changes by {change:+.2%} ({RANDOM_INIT} "
                f"{average(results, RANDOM_INIT):.4f}); {verdict} domain-embedding init."
            )
        else:
            lines.append(
                "- router init: only the owners' method was scored (no random-init ablation; "
                "`flexmoe demo --ablations` trains one)."
            )
    if CALIBRATED in models and "flexmoe" in models:
        change = average(results, CALIBRATED) / average(results, "flexmoe") - 1
        lines.append(
            f"- the owners' rows rescaled by the coordinator on public text ({CALIBRATED}): "
            f"{change:+.2%} on average ({average(results, CALIBRATED):.4f}); off by default"
            + (", though it wins here." if change < 0 else ".")
        )
    if TUNED in models and "flexmoe" in models:
        change = average(results, TUNED) / average(results, "flexmoe") - 1
        lines.append(
            f"- router tuning on proxy data: {change:+.2%} on average ({TUNED} "
            f"{average(results, TUNED):.4f} vs {average(results, 'flexmoe'):.4f}). It stays off "
            "by default: it needs each owner to hand the coordinator a sample of its text, and a "
            "tuned router weakens strict opt-out (the rows were fitted together)."
        )
    return "\n".join(lines) or "- (no variants scored)"


def _pct(new: float, old: float) -> str:
    return f"{new / old - 1:+.1%}"


def _public_note(results: dict[str, Any], owners: dict[str, str]) -> str | None:
    """Why public text misses its bar when every specialist is already worse there."""
    models, public = results["models"], public_domain(results, owners)
    specialists = [k for k in (specialist(e) for e in owners) if k in models]
    if not (public and specialists and {"anchor", "flexmoe"} <= models.keys()):
        return None
    anchor = bpb(results, "anchor", public)
    worst = [bpb(results, k, public) for k in specialists]
    if min(worst) <= anchor or bpb(results, "flexmoe", public) <= 1.01 * anchor:
        return None
    share = routing_of(results).get(public, {}).get(results.get("public_expert") or "")
    return (
        f"- Public text: every specialist is already {_pct(min(worst), anchor)} to "
        f"{_pct(max(worst), anchor)} worse than the anchor on {public}, so staying within 1% "
        "needs the public expert to take nearly all the routing mass there"
        + (f"; it takes {share:.0%}." if share is not None else ".")
    )


def _ceiling_note(results: dict[str, Any]) -> str | None:
    """What the router ceiling says about the gap to the document-level baselines."""
    models = results["models"]
    if not {ROUTER_CEILING, "flexmoe"} <= models.keys():
        return None
    ceiling = average(results, ROUTER_CEILING)
    rivals = {o: average(results, o) for o in ("btm", "seq-route") if o in models}
    missed = [o for o, v in rivals.items() if ceiling > v]
    against = ", ".join(f"{o} {v:.4f}" for o, v in rivals.items())
    head = (
        f"- The router ceiling ({ROUTER_CEILING}: only the rows trained, on the very text scored "
        f"here) averages {ceiling:.4f}, against flexmoe {average(results, 'flexmoe'):.4f}"
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


def investigation(results: dict[str, Any], owners: dict[str, str] | None = None) -> str:
    """What the measured variants say about the bars the merged model misses, in sentences
    built from the scores (empty when there is nothing to say)."""
    owners = owner_domains(results, owners)
    models, lines = results["models"], []
    routing, public_name = routing_of(results), results.get("public_expert")
    stolen = []
    for expert, domain in owners.items():
        shares = {e: v for e, v in routing.get(domain, {}).items() if e != public_name}
        top = max(shares, key=lambda e: shares[e]) if shares else expert
        if top != expert:
            stolen.append(f"{domain} ({top} {shares[top]:.0%}, {expert} {shares[expert]:.0%})")
    if stolen:
        lines.append(
            "- Routing, not the experts: on " + ", ".join(stolen) + " text another owner's "
            "expert takes more routing mass than the text's own. Each owner trained its router "
            "row only against the public row, so every row learned 'not public' rather than "
            "'mine'; merged, the row most aligned with that shared direction wins on other "
            "owners' text."
        )
    if "flexmoe" in models:
        helped = []
        for expert, domain in owners.items():
            key = without(expert)
            if key not in models:
                continue
            others = [d for d in results["domains"] if d != domain]
            gain = sum(bpb(results, key, d) / bpb(results, "flexmoe", d) - 1 for d in others)
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
    if TUNED in models and "flexmoe" in models:
        moves = ", ".join(
            f"{d} {_pct(bpb(results, TUNED, d), bpb(results, 'flexmoe', d))}"
            for d in results["domains"]
        )
        passed = {
            m: sum(c.passed for c in checks(results, owners, m) if "routing" in c.claim)
            for m in ("flexmoe", TUNED)
        }
        lines.append(
            f"- Router tuning on proxy data (only the rows trained, every expert frozen): {moves}; "
            f"domains whose own expert leads the routing: {passed['flexmoe']} untuned, "
            f"{passed[TUNED]} tuned."
        )
    note = _ceiling_note(results)
    if note:
        lines.append(note)
    if {"unrestricted", "flexmoe"} <= models.keys():
        gap = _pct(average(results, "flexmoe"), average(results, "unrestricted"))
        lines.append(
            f"- flexmoe is {gap} from unrestricted on average"
            ": unrestricted trains every parameter (attention and embeddings too) on all "
            "domains together, where each owner trains one feed-forward expert against a frozen "
            "anchor."
        )
    return "\n".join(lines)


def markdown(results: dict[str, Any], owners: dict[str, str] | None = None) -> str:
    """The report's experiment section (the plots are referenced by file name)."""
    domains, models = results["domains"], model_order(results)
    head = "| model | " + " | ".join(domains) + " | average |"
    rule = "| --- |" + " ---: |" * (len(domains) + 1)
    rows = [
        f"| {m} | "
        + " | ".join(f"{bpb(results, m, d):.4f}" for d in domains)
        + f" | {average(results, m):.4f} |"
        for m in models
    ]
    tables = []
    for model in ("flexmoe", TUNED):
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
    for model in ROUTING_KEYS:
        routing = routing_of(results, model)
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
    tried = investigation(results, owners)
    tried_section = f"## What the variants say about the misses\n\n{tried}\n\n" if tried else ""
    sample = (
        f"at most {results['max_bytes']:,} bytes per domain"
        if results.get("max_bytes")
        else "the whole test split"
    )
    return f"""## Every model on the same held-out text (bits per byte, {sample})

{head}
{rule}
{chr(10).join(rows)}

![bits per byte](bpb_heatmap.png)

![improvement over the anchor](improvement_over_anchor.png)

## Settings, measured

{settings_measured(results)}

## The paper's claims, measured

{chr(10).join(tables)}
{tried_section}## Opting out, expert by expert

![opt-out effect](opt_out_effect.png)

## Routing shares of the merged model (domain of the text x expert)

{chr(10).join(routing_tables)}

![routing shares](routing_shares.png)
"""


DP_RESULTS = "dp_tradeoff.json"  # written into a run by experiments/dp_tradeoff.py


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
this run's expert settings: without DP, then with DP-SGD (`--dp-epsilon`, delta
{found["delta"]:g}, clip {found["max_grad_norm"]:g}). Bits per byte are the owner's 2-expert
specialist on held-out text; extraction is the audit on {found["audit_documents"]} of its
training documents; tokens/s is the training loop alone, one run each (noisy: for the speed
ratio see `benchmarks/dp_speed.py`, which alternates runs). Epsilon is per training block.
Made by `python experiments/dp_tradeoff.py RUN --corpora {found["corpora"]}`.

{chr(10).join(lines)}
"""


def with_privacy_section(report: Path, results: Path) -> None:
    """Put the DP table measured in ``results`` at the end of the run's ``report`` in place of
    any earlier one (the file is rewritten atomically)."""
    text = report.read_text().split("## Differential privacy, measured")[0].rstrip()
    atomic_write_bytes(report, (text + "\n\n" + privacy_section(results)).encode())


def write_report(
    results: dict[str, Any],
    out: Path,
    *,
    owners: dict[str, str] | None = None,
    title: str = "flexmoe evaluation report",
) -> Path:
    """Write ``report.md``, the plots and ``evaluation.json`` into ``out``; each file atomically."""
    check_results(results, out)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in plot_files(results, owners).items():
        atomic_write_bytes(out / name, data)
    write_json(out / "evaluation.json", results)
    report = out / "report.md"
    text = f"# {title}\n\n{markdown(results, owners)}"
    if (out / DP_RESULTS).is_file():
        text += "\n" + privacy_section(out / DP_RESULTS)
    atomic_write_bytes(report, text.encode())
    return report
