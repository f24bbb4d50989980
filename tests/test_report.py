"""The report: the claims are computed from the numbers, plots are PNGs, files land whole."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from flexmoe.errors import FlexMoEError
from flexmoe.evaluate.registry import DomainScore, Evaluation
from flexmoe_lab.report import PLOTS, checks, plot_files, write_report
from flexmoe_lab.results import DemoResults

DOMAINS = ["public", "code", "legal"]


def _results(merged: dict[str, float], **extra: dict[str, float]) -> Evaluation:
    """The scores, typed as the report takes them."""
    return Evaluation.model_validate(_scores(merged, **extra))


def _scores(merged: dict[str, float], **extra: dict[str, float]) -> dict[str, Any]:
    """The scores as JSON has them."""
    table = {
        "anchor": {"public": 1.00, "code": 3.00, "legal": 2.50},
        "specialist:code": {"public": 1.00, "code": 2.00, "legal": 2.50},
        "specialist:legal": {"public": 1.00, "code": 3.00, "legal": 1.80},
        "soup": {"public": 1.20, "code": 2.90, "legal": 2.40},
        "btm": {"public": 1.00, "code": 2.20, "legal": 2.00},
        "seq-route": {"public": 1.00, "code": 2.10, "legal": 1.90},
        "unrestricted": {"public": 0.99, "code": 2.00, "legal": 1.80},
        "flexmoe": merged,
        "flexmoe:without-code": {"public": 1.001, "code": 2.90, "legal": 1.85},
        "flexmoe:without-legal": {"public": 1.001, "code": 2.05, "legal": 2.40},
        **extra,
    }
    cost = {"anchor": 1.0, "soup": 1.0, "btm": 2.6, "seq-route": 2.3, "unrestricted": 1.5}
    return {
        "domains": DOMAINS,
        "experts": ["code", "legal"],
        "cost": {m: cost.get(m, 1.3 if m.startswith("specialist") else 1.5) for m in table},
        "public_expert": "public",
        "max_bytes": 1000,
        "models": {
            m: {d: {"bits_per_byte": v} for d, v in row.items()} for m, row in table.items()
        },
        "routing": {
            "public": {"public": 0.8, "code": 0.1, "legal": 0.1},
            "code": {"public": 0.3, "code": 0.6, "legal": 0.1},
            "legal": {"public": 0.3, "code": 0.4, "legal": 0.3},  # the wrong expert leads
        },
    }


def test_claims_follow_the_numbers() -> None:
    from flexmoe_lab.narrative import investigation

    good = checks(_results({"public": 1.005, "code": 2.05, "legal": 1.84}))
    by_claim = {c.claim: c for c in good}
    assert by_claim["on code, merged within 3% of the code specialist"].passed
    assert by_claim["on public, merged within 1% of the anchor"].passed
    assert by_claim["merged better on average than btm"].passed
    assert by_claim["merged within 5% of unrestricted on average"].passed
    assert by_claim["opting out of code moves code back toward the anchor"].passed
    assert by_claim["opting out of legal moves every other domain by at most 1%"].passed
    assert by_claim["on code, code has the largest non-public routing share"].passed
    assert not by_claim["on legal, legal has the largest non-public routing share"].passed
    bad = {c.claim: c for c in checks(_results({"public": 1.05, "code": 2.5, "legal": 1.84}))}
    assert not bad["on public, merged within 1% of the anchor"].passed
    assert not bad["on code, merged within 3% of the code specialist"].passed
    assert bad["on code, merged within 3% of the code specialist"].measured.endswith("(+25.0%)")
    assert not bad["merged better on average than seq-route"].passed
    # the opt-out moved code by more than 1% relative to this merged model
    assert not bad["opting out of legal moves every other domain by at most 1%"].passed
    # a public rival expert in the merge is public, not an owner that takes the lead
    scores = _scores({"public": 1.05, "code": 2.05, "legal": 1.84})
    scores["routing"]["code"] = {"public": 0.1, "public-0": 0.5, "code": 0.3, "legal": 0.1}
    scores["routing"]["public"] = {"public": 0.3, "public-0": 0.5, "code": 0.1, "legal": 0.1}
    for name, worse in (("specialist:code", 1.02), ("specialist:legal", 1.03)):
        scores["models"][name]["public"]["bits_per_byte"] = worse
    evaluation = Evaluation.model_validate(scores)
    rival = {c.claim: c for c in checks(evaluation)}
    assert rival["on code, code has the largest non-public routing share"].passed
    assert (
        "code 30.0%, largest code 30.0%"
        in rival["on code, code has the largest non-public routing share"].measured
    )
    assert "they take 80%." in investigation(evaluation)


def test_report_files(tmp_path: Path) -> None:
    results = _results({"public": 1.005, "code": 2.05, "legal": 1.84})
    files = plot_files(results)
    assert set(files) == set(PLOTS.values())
    assert all(data.startswith(b"\x89PNG") for data in files.values())
    report = write_report(results, tmp_path / "r")
    text = report.read_text()
    assert "| flexmoe | 1.0050 | 2.0500 | 1.8400 | 1.6317 | 1.50x |" in text
    assert "| btm | 1.0000 | 2.2000 | 2.0000 | 1.7333 | 2.60x |" in text
    assert "Text that needs two experts" not in text  # none was scored
    assert "**no**" in text  # the legal routing claim is missed and says so
    assert json.loads((tmp_path / "r" / "evaluation.json").read_text()) == _scores(
        {"public": 1.005, "code": 2.05, "legal": 1.84}
    )
    assert not [p for p in (tmp_path / "r").iterdir() if p.name.startswith(".")]


def test_report_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`flexmoe-lab report` writes the report (in this process); bad scores are one line, exit
    code 2, nothing written (the first as a process of its own)."""
    import subprocess
    import sys

    from flexmoe_lab.cli import main

    good = tmp_path / "scores.json"
    good.write_text(json.dumps(_scores({"public": 1.005, "code": 2.05, "legal": 1.84})))
    with pytest.raises(SystemExit) as done:
        main(["report", str(good), "--out", str(tmp_path / "out")])
    assert done.value.code in (0, None)
    assert (tmp_path / "out" / "report.md").is_file()
    broken = json.loads(good.read_text())
    del broken["models"]["soup"]["legal"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(broken))
    command = [sys.executable, "-m", "flexmoe_lab", "report", str(bad), "--out"]
    result = subprocess.run(
        [*command, str(tmp_path / "never")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "models.soup.legal.bits_per_byte is missing" in result.stderr
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        main(["report", str(tmp_path / "none.json"), "--out", str(tmp_path / "never")])
    err = capsys.readouterr().err
    assert refused.value.code == 2 and err.strip().count("\n") == 0 and "file not found" in err
    assert not (tmp_path / "never").exists()


def test_settings_are_read_from_the_variants() -> None:
    from flexmoe_lab.narrative import settings_measured

    results = _results(
        {"public": 1.005, "code": 2.05, "legal": 1.84},
        **{
            "flexmoe:top-1": {"public": 1.0, "code": 2.0, "legal": 1.8},
            "flexmoe:bias": {"public": 1.1, "code": 2.1, "legal": 1.9},
        },
    )
    results.top_k, results.default_bias = 2, False
    text = settings_measured(results)
    assert "the default is 2 (1.6317" in text and "the best measured is 1 (1.6000)" in text
    assert "turning them on changes the average by +4.19%" in text
    assert "router init: only the owners' method was scored" in text
    from flexmoe.evaluate.registry import RANDOM_INIT

    results.models[RANDOM_INIT] = {
        d: DomainScore(bits_per_byte=v)
        for d, v in {"public": 1.0, "code": 2.3, "legal": 1.9}.items()
    }
    text = settings_measured(results)
    assert "the average changes by +6.23% (flexmoe:random-init 1.7333); keep domain" in text


def test_tuned_variant_gets_its_own_claims_and_routing() -> None:
    from flexmoe.evaluate.registry import TUNED
    from flexmoe_lab.narrative import markdown

    results = _results(
        {"public": 1.005, "code": 2.30, "legal": 1.84},
        **{TUNED: {"public": 1.004, "code": 2.05, "legal": 1.83}},
    )
    results.routing_tuned = {
        "public": {"public": 0.9, "code": 0.05, "legal": 0.05},
        "code": {"public": 0.2, "code": 0.7, "legal": 0.1},
        "legal": {"public": 0.2, "code": 0.2, "legal": 0.6},
    }
    tuned = {c.claim: c for c in checks(results, model=TUNED)}
    assert tuned["on code, merged within 3% of the code specialist"].passed
    assert tuned["on legal, legal has the largest non-public routing share"].passed
    # no opt-out variants of the tuned model were scored, so no opt-out claims for it
    assert not [c for c in tuned if c.startswith("opting out")]
    untuned = {c.claim: c for c in checks(results)}
    assert not untuned["on code, merged within 3% of the code specialist"].passed
    text = markdown(results)
    assert f"`{TUNED}`: " in text and "router tuning on proxy data: -5.07% on average" in text
    assert "domains whose own expert leads the routing: 1 untuned, 2 tuned" in text
    # code's expert leads on legal text in the untuned routing: the section names it
    assert "on legal (code 40%, legal 30%) text another owner's expert" in text


def test_leaving_an_expert_out_that_helps_the_others_is_reported() -> None:
    from flexmoe_lab.narrative import investigation

    results = _results(
        {"public": 1.005, "code": 2.05, "legal": 1.84},
        **{"flexmoe:without-code": {"public": 0.95, "code": 2.90, "legal": 1.70}},
    )
    text = investigation(results)
    assert "Leaving one expert out improves everyone else: code (-6.5% on the other" in text
    assert "legal (" not in text.split("improves everyone else:")[1].split("\n")[0]
    assert "Public text" not in text  # the specialists match the anchor there
    results.models["specialist:code"]["public"].bits_per_byte = 1.03
    results.models["specialist:legal"]["public"].bits_per_byte = 1.05
    results.models["flexmoe"]["public"].bits_per_byte = 1.02
    text = investigation(results)
    assert "every specialist is already +3.0% to +5.0% worse than the anchor on public" in text
    assert (
        "(the anchor's and any rivals) to take nearly all the routing mass there; they take 80%."
        in text
    )


def test_router_levers_are_reported_from_their_rows() -> None:
    from flexmoe.evaluate.registry import CALIBRATED, ROUTER_CEILING
    from flexmoe_lab.narrative import investigation, settings_measured

    merged = {"public": 1.005, "code": 2.30, "legal": 2.10}
    below = {"public": 1.00, "code": 2.00, "legal": 1.90}  # the ceiling beats btm and seq-route
    above = {"public": 1.00, "code": 2.25, "legal": 2.05}  # it does not
    text = investigation(_results(merged, **{ROUTER_CEILING: above}))
    assert "The router ceiling (flexmoe:router-ceiling" in text and "averages 1.7667" in text
    assert "No lever that changes only the router can reach btm or seq-route" in text
    text = investigation(_results(merged, **{ROUTER_CEILING: below}))
    assert "A router alone could close the gap" in text and "No lever" not in text
    assert "router ceiling" not in investigation(_results(merged))
    lines = settings_measured(_results(merged, **{CALIBRATED: below}))
    assert "rescaled by the coordinator on public text (flexmoe:calibrated): -9.34%" in lines
    assert "though it wins here" in lines
    lines = settings_measured(_results(merged, **{CALIBRATED: {**merged, "code": 2.4}}))
    assert "+1.85% on average" in lines and "off by default." in lines


def test_proxy_sample_is_small_seeded_and_keeps_ids(tmp_path: Path) -> None:
    from flexmoe.data.documents import DataSpec, Document, write_jsonl
    from flexmoe.data.split import load_splits
    from flexmoe.merge.tune import proxy_sample

    words = [f"w{i}" for i in range(1500)]
    docs = [Document("code", f"d{i}", f"doc {i} " + " ".join(words[i:])) for i in range(10)]
    picked = proxy_sample(docs, max_bytes=2500, window=1000)
    assert sum(len(d.text.encode()) for d in picked) == 2500
    assert [d.doc_id for d in picked] == ["d0", "d1", "d2"]
    assert all(d.text in src.text for d, src in zip(picked, docs, strict=False))
    assert picked[0].text != docs[0].text[:1000]  # a window at a random offset, not the start
    assert proxy_sample(docs, max_bytes=2500, window=1000) == picked
    path = tmp_path / "proxy" / "code.jsonl"
    write_jsonl(path, ((d.doc_id, d.text) for d in picked))
    back = load_splits([DataSpec("code", (str(path),), id_field="id")])
    all_back = [*back.train, *back.validation, *back.test]
    assert sorted(d.doc_id for d in all_back) == ["d0", "d1", "d2"]


def test_registry_names_and_typed_results(tmp_path: Path) -> None:
    import pytest

    from flexmoe.errors import FlexMoEError
    from flexmoe.evaluate.registry import describe

    results = _scores({"public": 1.005, "code": 2.05, "legal": 1.84})
    text = describe(list(results["models"]))
    assert "`btm` Branch-Train-Merge" in text and "`specialist:X` owner X's" in text
    assert "`flexmoe:without-X` owner X opted out" in text and "router-ceiling" not in text
    found = Evaluation.read(results, "scores.json")
    assert found.models["btm"]["code"].bits_per_byte == 2.20 and found.experts == ["code", "legal"]
    results["models"]["soup"]["code"]["bits_per_byte"] = -1.0
    with pytest.raises(
        FlexMoEError, match=r"field models\.soup\.code\.bits_per_byte: Input should"
    ):
        Evaluation.read(results, "scores.json")
    with pytest.raises(FlexMoEError, match="field domains: Field required"):
        Evaluation.read({"experts": [], "models": {}}, "scores.json")


def test_dp_tradeoff_is_reported_when_measured(tmp_path: Path) -> None:
    """``experiments/dp_tradeoff.py`` leaves its rows in the run; the report shows each setting
    with its bits per byte, extraction and speed relative to no DP."""
    from flexmoe.io import write_json
    from flexmoe_lab.report import DP_RESULTS

    out = tmp_path / "r"
    out.mkdir()
    row = {"bpb": {"legal": 2.0, "public": 3.0}, "anchor_bpb": {"legal": 2.5, "public": 3.1},
           "extraction_rate": 0.25, "mean_best_similarity": 0.5}  # fmt: skip
    write_json(out / DP_RESULTS, {
        "corpora": "demo", "domain": "legal", "delta": 1e-5, "max_grad_norm": 1.0,
        "audit_documents": 32, "rows": [
            {**row, "setting": "no DP", "epsilon": None, "noise_multiplier": None,
             "tokens_per_s": 1000.0},
            {**row, "setting": "epsilon 1", "epsilon": 0.99, "noise_multiplier": 2.5,
             "tokens_per_s": 400.0, "bpb": {"legal": 2.4, "public": 3.05}},
        ],
    })  # fmt: skip
    text = write_report(_results({"public": 1.005, "code": 2.05, "legal": 1.84}), out).read_text()
    assert "## Differential privacy, measured" in text
    assert "| epsilon 1 | 0.99 | 2.5 | 2.4000 | 3.0500 | 25.0% | 0.500 | 400 (0.40x) |" in text
    assert "| anchor alone | | | 2.5000 | 3.1000 |" in text
    (out / DP_RESULTS).unlink()
    assert (
        "Differential privacy"
        not in write_report(
            _results({"public": 1.005, "code": 2.05, "legal": 1.84}), out
        ).read_text()
    )


def test_the_demo_refreshes_its_block_of_the_results_page(tmp_path: Path) -> None:
    import pytest

    from flexmoe.errors import FlexMoEError
    from flexmoe_lab.narrative import (
        RESULTS_BEGIN,
        RESULTS_END,
        check_results_page,
        refresh_results_page,
    )

    page = tmp_path / "results.md"
    page.write_text(f"# Results\n\nbefore\n{RESULTS_BEGIN}\nold\n{RESULTS_END}\nafter\n")
    results = _results({"public": 1.005, "code": 2.05, "legal": 1.84})
    for _ in range(2):  # a second refresh replaces the first
        refresh_results_page(page, results, "flexmoe demo --quick")
    text = page.read_text()
    assert text.startswith("# Results\n\nbefore\n") and text.endswith(f"{RESULTS_END}\nafter\n")
    assert "old" not in text and text.count("| flexmoe | 1.0050 | 2.0500 | 1.8400 | 1.6317 |") == 1
    assert "`flexmoe demo --quick`" in text
    page.write_text("# Results without a block\n")
    with pytest.raises(FlexMoEError, match="no <!-- demo results: begin -->"):
        check_results_page(page)
    assert page.read_text() == "# Results without a block\n"


def _demo_results(evaluation: Evaluation) -> DemoResults:
    """A whole run's results around ``evaluation``, every record typed, no federated stage."""
    from flexmoe.evaluate.extraction import ExtractionResult

    training = {"steps": 10, "tokens": 1000, "final_train_loss": 5.0, "final_val_loss": 5.1}
    share = {"public": 0.5, "code": 0.3, "legal": 0.2}
    expert = {"steps": 6, "batch_size": 4, "seq_len": 32}
    audit = {
        "documents": 8,
        "prefix_tokens": 8,
        "samples": 2,
        "suffix_tokens": 8,
        "top_k": 50,
        "top_p": 0.95,
        "temperature": 1.0,
        "threshold": 0.9,
    }
    summary = {
        "steps": 6,
        "tokens": 768,
        "final_train_loss": 5.0,
        "final_val_loss": None,
        "seed": 0,
        "hyperparameters": {"public_fraction": 0.25},
    }
    return DemoResults.model_validate(
        {
            "settings": {
                "corpora": "demo",
                "quick": True,
                "ablations": False,
                "vocab_size": 512,
                "top_k": 2,
                "eval_bytes_per_domain": None,
                "audit": audit,
                "anchor": expert,
                "expert": expert,
                "unrestricted": {"steps": 12},
                "router_tuning": expert,
                "proxy_documents_per_owner": 3,
                "proxy_bytes_per_domain": 1000,
                "ceiling_steps": 5,
            },
            "corpora_description": "test corpora",
            "anchor": {"fingerprint": "0" * 64, "training": training},
            "experts": {
                e: {"owner": e, "license": "CC0-1.0", "training": summary}
                for e in ("code", "legal")
            },
            "evaluation": evaluation,
            "opt_out": {
                "expert": "legal",
                "opted_out_bpb": 1.9,
                "merged_without_bpb": 1.9,
                "bpb_difference_vs_merged_without": 0.0,
                "prompt": "the",
                "generation_before": {"text": "a", "prompt": share, "generated": share},
                "generation_after": {
                    "text": "b",
                    "prompt": share,
                    "generated": {**share, "legal": 0.0},
                },
                "audit": [["t0", "legal", "opt-out", "why", "demo"]],
            },
            "audit": {
                "domain": "code",
                "results": [
                    ExtractionResult(
                        model="anchor",
                        documents=8,
                        samples_per_document=2,
                        extracted_documents=0,
                        extracted_samples=0,
                        rate=0.0,
                        sample_rate=0.0,
                        mean_best_similarity=0.2,
                    )
                ],
            },
            "device": "cpu",
            "seconds": 1.0,
            "stage_seconds": {"anchor": 1.0},
        }
    )


def test_the_demo_report_has_every_section_in_order(tmp_path: Path) -> None:
    """The demo's report (lab narrative.py) from a run's typed results: every section once, in
    order, each separated from the next by one blank line; the results go to results.json and
    back unchanged, and a file that does not fit the schema is a one-line error."""
    from flexmoe_lab.narrative import demo_report

    evaluation = _results({"public": 1.005, "code": 2.05, "legal": 1.84})
    evaluation.top_k = 2
    results = _demo_results(evaluation)
    history = [{"step": 5, "loss": 5.2, "val_loss": 5.3}]
    text = demo_report(results, history)
    heads = [line for line in text.splitlines() if line.startswith("## ")]
    for first, then in zip(
        ["## Every model", "## One owner opts out", "## Extraction audit", "## Anchor training"],
        ["## One owner opts out", "## Extraction audit", "## Anchor training", None],
        strict=True,
    ):
        assert sum(h.startswith(first) for h in heads) == 1
        if then is not None:
            assert text.index(first) < text.index(then)
            before = text[: text.index(then)]
            assert before.endswith("\n\n") and not before.endswith("\n\n\n")  # one blank line
    assert "top-2 of 3" in text and "| 5 | 5.2000 | 5.3000 |" in text
    assert "| legal | 20.0% | 0.0% |" in text and "- t0 legal opt-out: why" in text
    assert "shipped no public rival experts" in text and "- unrestricted: 12 steps" in text
    results.rivals = {"public-0": "cluster 1 of 2 (5 documents)", "public-1": "2 of 2"}
    text = " ".join(demo_report(results, history).split())
    assert (
        "with 2 public rival experts" in text and "public-0: cluster 1 of 2 (5 documents)" in text
    )
    assert "top-2 of 5 experts per token" in text
    results.write(tmp_path / "results.json")
    assert DemoResults.read(tmp_path / "results.json") == results
    broken = json.loads((tmp_path / "results.json").read_text())
    broken["opt_out"]["opted_out_bpb"] = "low"
    (tmp_path / "bad.json").write_text(json.dumps(broken))
    with pytest.raises(FlexMoEError, match=r"bad.json: opt_out.opted_out_bpb: Input should be"):
        DemoResults.read(tmp_path / "bad.json")


def test_the_demo_report_puts_the_consortium_s_choices_side_by_side() -> None:
    """With a federated stage, the report has its section: every way of training together at
    what it costs one owner (tokens, bytes sent, inference cost, exact opt-out), the federated
    model against the untuned merge, btm and fedavg, the curve over the rounds and what
    --dp-owner-epsilon costs."""
    from flexmoe.evaluate.accounting import OwnerCost
    from flexmoe_lab.narrative import _federated_section
    from flexmoe_lab.results import FederatedRecord

    evaluation = _results(
        {"public": 1.0, "code": 2.0, "legal": 2.0},
        **{
            "flexmoe:federated": {"public": 0.9, "code": 1.8, "legal": 2.1},
            "fedavg": {"public": 1.1, "code": 2.4, "legal": 2.4},
        },
    )
    fed = FederatedRecord(
        expert_steps=3,
        specialist_steps=6,
        rounds=3,
        phases=["trunk"],
        phase_steps={"trunk": 1},
        server={"name": "fedadam", "lr": 0.003},
        owner_steps=6,
        per_round=[],
        fedavg_rounds=2,
        fedavg_steps=3,
        fedavg_per_round=[],
        curve_every=2,
        curve_bytes=1000,
        bpb_by_round=[
            {"round": 0, "bpb": {"public": 1.2, "code": 2.2, "legal": 2.2}},
            {"round": 3, "bpb": {"public": 0.9, "code": 1.8, "legal": 2.1}},
        ],
        privacy_cost=[
            {
                "epsilon": 8.0,
                "noise_multiplier": 1.25,
                "clip": {"router": 0.5, "trunk": 1.0},
                "spent": {"code": 8.0, "legal": 7.9},
                "bpb": {"public": 1.5, "code": 2.5, "legal": 2.5},
            },
        ],
    )
    costs = [
        OwnerCost(
            model="flexmoe",
            owner_tokens=6000,
            bytes_sent=2_000_000,
            inference=1.5,
            exact_opt_out=True,
            how="trains its expert alone",
        ),
        OwnerCost(
            model="fedavg",
            owner_tokens=6000,
            bytes_sent=40_000_000,
            inference=1.0,
            exact_opt_out=False,
            how="trains the dense model",
        ),
    ]
    results = _demo_results(evaluation)
    assert _federated_section(results, evaluation) == ""  # no federated stage
    results = results.model_copy(update={"federated": fed, "accounting": costs})
    text = _federated_section(results, evaluation)
    assert text.startswith("## Federated rounds (Flower)")
    assert "| flexmoe | 1.6667 | 6,000 | 2.00 MB | 1.50x | yes | trains its expert alone |" in text
    assert "| fedavg | 1.9667 | 6,000 | 40.00 MB | 1.00x | no | trains the dense model |" in text
    said = " ".join(text.split())
    assert "-4.0% against `flexmoe`, -7.7% against `btm`, -18.6% against `fedavg`" in said
    assert "public text 0.9000 against the merge's 1.0000" in said
    assert "| 0 (the merge, before any round) | 1.8667 | 1.2000 |" in text
    assert "| 3 | 1.6000 | 0.9000 |" in text
    assert "| 8 | 1.250 | 2.1667 | 1.5000 |" in text
    assert "steps in all: 6" in said and "with fedadam (lr 0.003)" in said


def test_two_expert_text_says_whether_per_token_routing_wins(tmp_path: Path) -> None:
    scores = _scores({"public": 1.005, "code": 2.05, "legal": 1.84})
    mixed = {"flexmoe": (2.0, 1.5), "btm": (2.1, 1.4), "seq-route": (2.2, 1.6)}
    for model, row in scores["models"].items():
        a, b = mixed.get(model, (2.5, 2.0))
        row.update({"code+legal": {"bits_per_byte": a}, "legal+public": {"bits_per_byte": b}})
    scores["mixtures"] = ["code+legal", "legal+public"]
    text = write_report(Evaluation.model_validate(scores), tmp_path / "r").read_text()
    assert "| model | code+legal | legal+public | average | cost |" in text
    assert "| flexmoe | 2.0000 | 1.5000 | 1.7500 | 1.50x |" in text
    assert "against `btm`: does not win (1 of 2; code+legal -4.8%, legal+public +7.1%)" in text
    assert "against `seq-route`: wins (2 of 2; code+legal -9.1%, legal+public -6.2%)" in text
    found = Evaluation.read(json.loads((tmp_path / "r" / "evaluation.json").read_text()), "e")
    assert found.mixtures == ["code+legal", "legal+public"]
    assert found.average("flexmoe") == Evaluation.model_validate(scores).average("flexmoe")
    del scores["models"]["btm"]["legal+public"]
    with pytest.raises(FlexMoEError, match=r"field models\.btm\.legal\+public\.bits_per_byte"):
        Evaluation.read(scores, "e")


def test_owner_levers_are_rows_beside_the_runs_merge_and_btm() -> None:
    from flexmoe_lab.levers import levers_section

    evaluation = _results({"public": 1.005, "code": 2.05, "legal": 1.84})
    found = {
        "corpora": "demo",
        "rows": [{"lever": "public-spread", "options": {"public_sample": "spread"},
                  "bpb": {"public": 1.0, "code": 2.0, "legal": 1.9}}],
    }  # fmt: skip
    text = levers_section(found, evaluation)
    assert (
        "| `flexmoe` | the run's merge (its recipe at the top) | 1.0050 | 2.0500 | 1.8400 |" in text
    )
    assert (
        "| public-spread | public_sample=spread | 1.0000 | 2.0000 | 1.9000 | 1.6333 | -5.8% |"
        in (text)
    )
    assert "`python lab/experiments/owner_levers.py RUN --corpora demo`" in text
