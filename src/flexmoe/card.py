"""Model cards: the README.md of an anchor or merged directory, with the metadata block the
Hugging Face hub reads (license, base model, tags) and how the model was made.

A merged model's card (``merge.card``) is written from its slot table, so ``merge add``,
``merge remove`` and ``router tune`` keep it true.
"""

from __future__ import annotations

import json
from pathlib import Path

from flexmoe.data.public import PublicCorpus
from flexmoe.io import atomic_write_bytes

Meta = dict[str, str | list[str]]  # a card's front matter: the metadata the hub reads

CARD_FILE = "README.md"
TAGS = ["flexmoe", "flexolmo", "mixture-of-experts", "text-generation"]
PUBLIC_LICENSE = "public"  # the public slot's license in the slot table


def front_matter(meta: Meta) -> str:
    """YAML front matter; every string JSON-quoted, which YAML reads as it is."""
    lines = ["---"]
    for key, value in meta.items():
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines += [f"- {json.dumps(v)}" for v in value]
        else:
            lines.append(f"{key}: {json.dumps(value)}")
    return "\n".join([*lines, "---", ""])


def cell(text: object) -> str:
    """A markdown table cell: one line, no pipe or HTML, whatever an owner typed."""
    plain = " ".join(str(text).split())
    return plain.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def license_meta(licenses: list[str]) -> dict[str, str]:
    distinct = sorted({lic for lic in licenses if lic and lic != PUBLIC_LICENSE})
    if len(distinct) == 1:
        return {"license": distinct[0].lower()}
    name = " AND ".join(distinct) if distinct else "unknown"
    return {"license": "other", "license_name": name, "license_link": "README.md#experts"}


def anchor_card(
    *,
    origin: str,
    dtype: str,
    fingerprint: str,
    steps: object,
    public: PublicCorpus | None,
    base_model: str | None,
) -> str:
    """The card of an anchor, from its manifest's fields (``steps``: its training's, if any)."""
    meta: Meta = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": TAGS[:2],
    }
    if base_model:
        meta["base_model"] = base_model
    files = public.files if public else ()
    made = (
        "imported from an existing OLMo-2 checkpoint"
        if origin == "imported"
        else f"trained from scratch ({steps} steps)"
    )
    return (
        front_matter(meta)
        + f"""
# A flexmoe anchor

The public model that every owner's expert is trained against: an OLMo-2 checkpoint, {made},
stored in {dtype}, fingerprint `{fingerprint[:16]}`. Its public router
vectors are in `public_router.safetensors`; `flexmoe_anchor.json` records what experts must
match.

Public corpus: {len(files)} file(s) ({sum(f.bytes for f in files):,} bytes), recorded with
their sha256 so that every expert mixes in the same public text by default
(`flexmoe expert train` finds them at the recorded paths or in `public/` beside this card).
"""
    )


def write_card(directory: Path, text: str) -> None:
    atomic_write_bytes(Path(directory) / CARD_FILE, text.encode("utf-8"))
