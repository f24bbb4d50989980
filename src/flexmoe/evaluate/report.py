"""The experiment's report: markdown tables, PNG plots and the paper's claims checked.

Input is the dict :func:`flexmoe.evaluate.suite.run_suite` returns; every number printed comes
from it. Owners' experts are matched to their domains by name unless ``owners`` says otherwise.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flexmoe.errors import FlexMoEError
from flexmoe.io import atomic_write_bytes, write_json

MAIN_MODELS = ("anchor", "soup", "btm", "seq-route", "unrestricted", "flexmoe")
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
    if not isinstance(results, dict):
        raise FlexMoEError(where, "expected a JSON object written by flexmoe eval baselines")
    for key in ("domains", "experts", "models"):
        if key not in results:
            raise FlexMoEError(where, f"field {key!r} is missing")
    if not results["models"]:
        raise FlexMoEError(where, "no scored models to report")
    for model, row in results["models"].items():
        for domain in results["domains"]:
            value = row.get(domain, {}).get("bits_per_byte") if isinstance(row, dict) else None
            if not isinstance(value, int | float):
                raise FlexMoEError(where, f"field models.{model}.{domain}.bits_per_byte is missing")
    return results


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


def checks(results: dict[str, Any], owners: dict[str, str] | None = None) -> list[Check]:
    """The issue's bars for the merged model (``flexmoe``), each measured."""
    owners = owner_domains(results, owners)
    models = results["models"]
    found: list[Check] = []
    for expert, domain in owners.items():
        key = f"specialist:{expert}"
        if key in models and "flexmoe" in models:
            m, s = bpb(results, "flexmoe", domain), bpb(results, key, domain)
            claim = f"on {domain}, merged within 3% of the {expert} specialist"
            found.append(Check(claim, f"{m:.4f} vs {s:.4f} ({m / s - 1:+.1%})", m <= 1.03 * s))
    public = public_domain(results, owners)
    if public is not None and {"flexmoe", "anchor"} <= models.keys():
        m, a = bpb(results, "flexmoe", public), bpb(results, "anchor", public)
        found.append(Check(f"on {public}, merged within 1% of the anchor",
                           f"{m:.4f} vs {a:.4f} ({m / a - 1:+.1%})", m <= 1.01 * a))  # fmt: skip
    if "flexmoe" in models:
        mine = average(results, "flexmoe")
        for other in ("anchor", "soup", "seq-route", "btm"):
            if other in models:
                theirs = average(results, other)
                found.append(Check(f"merged better on average than {other}",
                                   f"{mine:.4f} vs {theirs:.4f}", mine < theirs))  # fmt: skip
        if "unrestricted" in models:
            top = average(results, "unrestricted")
            found.append(Check("merged within 5% of unrestricted on average",
                               f"{mine:.4f} vs {top:.4f} ({mine / top - 1:+.1%})",
                               mine <= 1.05 * top))  # fmt: skip
    for expert, domain in owners.items():
        key = f"flexmoe:without-{expert}"
        if key not in models or "flexmoe" not in models:
            continue
        m, w = bpb(results, "flexmoe", domain), bpb(results, key, domain)
        toward = "anchor" in models and abs(w - bpb(results, "anchor", domain)) < abs(
            m - bpb(results, "anchor", domain)
        )
        found.append(Check(f"opting out of {expert} moves {domain} back toward the anchor",
                           f"{m:.4f} -> {w:.4f}", toward))  # fmt: skip
        others = [d for d in results["domains"] if d != domain]
        moves = {d: bpb(results, key, d) / bpb(results, "flexmoe", d) - 1 for d in others}
        worst = max(moves, key=lambda d: abs(moves[d]))
        found.append(Check(f"opting out of {expert} moves every other domain by at most 1%",
                           f"largest: {worst} {moves[worst]:+.2%}",
                           abs(moves[worst]) <= 0.01))  # fmt: skip
    routing = results.get("routing", {})
    public_name = results.get("public_expert")
    for expert, domain in owners.items():
        shares = {e: s for e, s in routing.get(domain, {}).items() if e != public_name}
        if shares:
            top = max(shares, key=lambda e: shares[e])
            found.append(Check(f"on {domain}, {expert} has the largest non-public routing share",
                               f"{expert} {shares[expert]:.1%}, largest {top} {shares[top]:.1%}",
                               top == expert))  # fmt: skip
    return found


def _heatmap(ax: Any, values: list[list[float]], rows: list[str], cols: list[str], fmt: str,
             cmap: str) -> None:  # fmt: skip
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
    _heatmap(ax, [[bpb(results, m, d) for d in domains] for m in models], models, domains,
             ".3f", "viridis_r")  # fmt: skip
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

    left_out = [e for e in owners if f"flexmoe:without-{e}" in results["models"]]
    if left_out and "flexmoe" in results["models"]:
        fig, ax = plt.subplots(figsize=(1.4 * len(domains) + 3, 0.5 * len(left_out) + 1.5))
        change = [
            [100 * (bpb(results, f"flexmoe:without-{e}", d) / bpb(results, "flexmoe", d) - 1)
             for d in domains]
            for e in left_out
        ]  # fmt: skip
        _heatmap(ax, change, [f"without {e}" for e in left_out], domains, "+.2f", "Reds")
        ax.set_title("opt-out: % change in bits per byte against the merged model")
        files[PLOTS["opt_out"]] = _png(fig)
        plt.close(fig)

    routing = results.get("routing", {})
    if routing:
        experts = list(next(iter(routing.values())))
        fig, ax = plt.subplots(figsize=(1.3 * len(experts) + 3, 0.5 * len(routing) + 1.5))
        _heatmap(ax, [[100 * routing[d][e] for e in experts] for d in routing], list(routing),
                 experts, ".1f", "Blues")  # fmt: skip
        ax.set_title("% of routing mass: domain of the text (rows) x expert")
        files[PLOTS["routing"]] = _png(fig)
        plt.close(fig)
    return files


def settings_measured(results: dict[str, Any]) -> str:
    """What the top-k and bias variants say about the merged model's defaults."""
    models, lines = results["models"], []
    top_k = results.get("top_k")
    tops = {int(m.removeprefix("flexmoe:top-")): m for m in models if m.startswith("flexmoe:top-")}
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
    other = "flexmoe:no-bias" if results.get("default_bias") else "flexmoe:bias"
    if other in models and "flexmoe" in models:
        state = "on" if results.get("default_bias") else "off"
        change = average(results, other) / average(results, "flexmoe") - 1
        lines.append(
            f"- the owners' learned biases: {state} by default; turning them "
            f"{'off' if state == 'on' else 'on'} changes the average by {change:+.2%}."
        )
    return "\n".join(lines) or "- (no variants scored)"


def markdown(results: dict[str, Any], owners: dict[str, str] | None = None) -> str:
    """The report's experiment section (the plots are referenced by file name)."""
    domains, models = results["domains"], model_order(results)
    head = "| model | " + " | ".join(domains) + " | average |"
    rule = "| --- |" + " ---: |" * (len(domains) + 1)
    rows = [
        f"| {m} | " + " | ".join(f"{bpb(results, m, d):.4f}" for d in domains)
        + f" | {average(results, m):.4f} |"
        for m in models
    ]  # fmt: skip
    found = checks(results, owners)
    claims = "\n".join(
        f"| {c.claim} | {c.measured} | {'yes' if c.passed else '**no**'} |" for c in found
    )
    routing = results.get("routing", {})
    experts = list(next(iter(routing.values()))) if routing else []
    routing_rows = "\n".join(
        f"| {d} | " + " | ".join(f"{routing[d][e]:.1%}" for e in experts) + " |" for d in routing
    )
    sample = (
        f"at most {results['max_bytes']:,} bytes per domain" if results.get("max_bytes") else
        "the whole test split"
    )  # fmt: skip
    return f"""## Every model on the same held-out text (bits per byte, {sample})

{head}
{rule}
{chr(10).join(rows)}

![bits per byte](bpb_heatmap.png)

![improvement over the anchor](improvement_over_anchor.png)

## Settings, measured

{settings_measured(results)}

## The paper's claims, measured

| claim | measured | met |
| --- | --- | :---: |
{claims}

## Opting out, expert by expert

![opt-out effect](opt_out_effect.png)

## Routing shares of the merged model (domain of the text x expert)

| domain | {" | ".join(experts)} |
| --- |{" ---: |" * len(experts)}
{routing_rows}

![routing shares](routing_shares.png)
"""


def write_report(
    results: dict[str, Any], out: Path, *, owners: dict[str, str] | None = None,
    title: str = "flexmoe evaluation report",
) -> Path:  # fmt: skip
    """Write ``report.md``, the plots and ``evaluation.json`` into ``out``; each file atomically."""
    check_results(results, out)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in plot_files(results, owners).items():
        atomic_write_bytes(out / name, data)
    write_json(out / "evaluation.json", results)
    report = out / "report.md"
    atomic_write_bytes(report, f"# {title}\n\n{markdown(results, owners)}".encode())
    return report
