"""Model cards: the README.md of an anchor or merged directory, with the metadata block the
Hugging Face hub reads (license, base model, tags) and how the model was made.

A merged model's card is written from its slot table, so ``merge add``, ``merge remove`` and
``router tune`` keep it true.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flexmoe import __version__
from flexmoe.io import atomic_write_bytes

if TYPE_CHECKING:
    from flexmoe.merge.slots import SlotTable

CARD_FILE = "README.md"
TAGS = ["flexmoe", "flexolmo", "mixture-of-experts", "text-generation"]
PUBLIC_LICENSE = "public"  # the public slot's license in the slot table


def _front_matter(meta: dict[str, Any]) -> str:
    """YAML front matter; every string JSON-quoted, which YAML reads as it is."""
    lines = ["---"]
    for key, value in meta.items():
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines += [f"- {json.dumps(v)}" for v in value]
        else:
            lines.append(f"{key}: {json.dumps(value)}")
    return "\n".join([*lines, "---", ""])


def _cell(text: object) -> str:
    """A markdown table cell: one line, no pipe or HTML, whatever an owner typed."""
    plain = " ".join(str(text).split())
    return plain.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _license_meta(licenses: list[str]) -> dict[str, Any]:
    distinct = sorted({lic for lic in licenses if lic and lic != PUBLIC_LICENSE})
    if len(distinct) == 1:
        return {"license": distinct[0].lower()}
    name = " AND ".join(distinct) if distinct else "unknown"
    return {"license": "other", "license_name": name, "license_link": "README.md#experts"}


def merged_card(table: SlotTable, top_k: int) -> str:
    """The card of a merged model, from its slot table and top-k."""
    slots = table.slots
    base_model = table.base_model or "anchor"
    meta = {
        **_license_meta([s.license for s in slots]),
        "base_model": base_model,
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": TAGS,
    }
    rows = [
        "| slot | expert | owner | license | signed by | DP epsilon |",
        "|---|---|---|---|---|---|",
    ]
    for s in slots:
        signer = s.signer.fingerprint[:16] if s.signer else "-"
        epsilon = format(s.epsilon, ".3g") if s.epsilon is not None else "-"
        rows.append(
            f"| {s.slot} | {_cell(s.name)} | {_cell(s.owner)} | {_cell(s.license)} "
            f"| {signer} | {epsilon} |"
        )
    tuning = table.router_tuning
    tuned = (
        f"The router was tuned after merging ({tuning.steps} steps on proxy data), which "
        "makes an opt-out less strict than in an untuned merge."
        if tuning
        else "The router was not tuned after merging: each expert's router row is its owner's."
    )
    return (
        _front_matter(meta)
        + f"""
# A FlexOlmo mixture of {len(slots)} experts

Made with flexmoe {__version__}, the FlexOlmo method: each data owner
trained one expert against the shared public anchor `{_cell(base_model)}` (fingerprint
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
each answer attributed to the experts that gave it; `flexmoe experts list PATH` shows who is in.
Owners' opt-outs are not part of this card: they change while the model is served.
"""
    )


def anchor_card(manifest: dict[str, Any], base_model: str | None) -> str:
    """The card of an anchor, from its manifest."""
    meta: dict[str, Any] = {
        "library_name": "transformers", "pipeline_tag": "text-generation", "tags": TAGS[:2],
    }  # fmt: skip
    if base_model:
        meta["base_model"] = base_model
    public = manifest.get("public_data") or {}
    files = public.get("files") or []
    made = (
        "imported from an existing OLMo-2 checkpoint"
        if manifest["origin"] == "imported"
        else f"trained from scratch ({(manifest.get('training') or {}).get('steps')} steps)"
    )
    return (
        _front_matter(meta)
        + f"""
# A flexmoe anchor

The public model that every owner's expert is trained against: an OLMo-2 checkpoint, {made},
stored in {manifest["dtype"]}, fingerprint `{manifest["fingerprint"][:16]}`. Its public router
vectors are in `public_router.safetensors`; `flexmoe_anchor.json` records what experts must
match.

Public corpus: {len(files)} file(s) ({sum(f["bytes"] for f in files):,} bytes), recorded with
their sha256 so that every expert mixes in the same public text by default
(`flexmoe expert train` finds them at the recorded paths or in `public/` beside this card).
"""
    )


def write_card(directory: Path, text: str) -> None:
    atomic_write_bytes(Path(directory) / CARD_FILE, text.encode("utf-8"))
