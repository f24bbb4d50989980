"""The model card of a merged model, written from its slot table on every version."""

from __future__ import annotations

from flexmoe import __version__
from flexmoe.card import TAGS, Meta, cell, front_matter, license_meta
from flexmoe.merge.slots import SlotTable


def merged_card(table: SlotTable, top_k: int) -> str:
    """The card of a merged model, from its slot table and top-k."""
    slots = table.slots
    base_model = table.base_model or "anchor"
    meta: Meta = {
        **license_meta([s.license for s in slots]),
        "base_model": base_model,
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": TAGS,
    }
    rows = _expert_rows(table)
    tuning = table.router_tuning
    tuned = (
        f"The router was tuned after merging ({tuning.steps} steps on proxy data), which "
        "makes an opt-out less strict than in an untuned merge."
        if tuning
        else "The router was not tuned after merging: each expert's router row is its owner's."
    )
    return (
        front_matter(meta)
        + f"""
# A FlexOlmo mixture of {len(slots)} experts

Made with flexmoe {__version__}, the FlexOlmo method: each data owner
trained one expert against the shared public anchor `{cell(base_model)}` (fingerprint
`{table.anchor_fingerprint[:16]}`) on data that never left its owner; the experts were
merged without further training. Top-{top_k} routing. {tuned}

## Experts

{chr(10).join(rows)}

Slot 0 is the public expert, the anchor's own feed-forward layers. Each expert is under its
owner's license; use of the model is bound by all of them.

## Use

A transformers FlexOlmo checkpoint:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("PATH")
tokenizer = AutoTokenizer.from_pretrained("PATH")
```

`flexmoe serve PATH` serves it with each owner's standing opt-out honoured on every request and
each answer attributed to the experts that gave it; `flexmoe members list PATH` shows who is in.
Owners' opt-outs are not part of this card: they change while the model is served.
"""
    )


def _expert_rows(table: SlotTable) -> list[str]:
    """The card's table of experts: slot, name, owner, licence, signer, DP epsilon."""
    rows = [
        "| slot | expert | owner | license | signed by | DP epsilon |",
        "|---|---|---|---|---|---|",
    ]
    for s in table.slots:
        signer = s.signer.fingerprint[:16] if s.signer else "-"
        epsilon = format(s.epsilon, ".3g") if s.epsilon is not None else "-"
        rows.append(
            f"| {s.slot} | {cell(s.name)} | {cell(s.owner)} | {cell(s.license)} "
            f"| {signer} | {epsilon} |"
        )
    return rows
