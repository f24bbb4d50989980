"""Every model the evaluation can score, by name, in one place, and the typed result of scoring
them.

Names: the baselines (``anchor``, ``specialist:X``, ``soup``, ``btm``, ``seq-route``,
``unrestricted``), the merged model ``flexmoe`` and its variants (``flexmoe:top-K``,
``flexmoe:bias`` / ``flexmoe:no-bias``, ``flexmoe:without-X``), and the experiment's other
models (router tuning and its ablations). :class:`Evaluation` is what
:func:`flexmoe.evaluate.suite.run_suite` returns and ``evaluation.json`` holds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flexmoe.errors import FlexMoEError

ANCHOR = "anchor"
SOUP = "soup"
BTM = "btm"
SEQ_ROUTE = "seq-route"
UNRESTRICTED = "unrestricted"
FLEXMOE = "flexmoe"
BIAS = "flexmoe:bias"
NO_BIAS = "flexmoe:no-bias"
TUNED = "flexmoe:tuned"  # router tuned on the public documents the owners picked
RANDOM_INIT = "flexmoe:random-init"  # every owner's router row started from a random vector
OWNER_TEXT_TUNED = "flexmoe:tuned-owner-text"  # router tuned on owners' own text (an ablation)
CALIBRATED = "flexmoe:calibrated"  # owners' rows rescaled on public text by the coordinator
ROUTER_CEILING = "flexmoe:router-ceiling"  # rows fitted on the scored text: a bound, not a recipe
MAIN_MODELS = (ANCHOR, SOUP, BTM, SEQ_ROUTE, UNRESTRICTED, FLEXMOE, TUNED)

# What each name means, in the words the report uses (X: an owner's expert, K: a number).
MEANINGS = {
    ANCHOR: "the public model",
    "specialist:X": "owner X's 2-expert model",
    SOUP: "the anchor with the average of all FFNs",
    BTM: "Branch-Train-Merge (the specialists' next-token distributions mixed by their "
    "posterior given the context, top 2)",
    SEQ_ROUTE: "each document sent whole to the specialist with the nearest router rows",
    UNRESTRICTED: "the same shape trained on all the data in one place",
    FLEXMOE: "the merged model",
    "flexmoe:top-K": "K experts active per token",
    BIAS: "the owners' learned negative biases on",
    "flexmoe:without-X": "owner X opted out",
    TUNED: "the router tuned on the public documents the owners picked",
    OWNER_TEXT_TUNED: "the router tuned on the owners' own text (an ablation that hands it over)",
    RANDOM_INIT: "every owner's router row started from a random vector",
    CALIBRATED: "the owners' rows rescaled by the coordinator on public text",
    ROUTER_CEILING: "the rows fitted on the very text scored (a bound, not a recipe)",
}


def specialist(expert: str) -> str:
    return f"specialist:{expert}"


TOP_K_PREFIX = "flexmoe:top-"


def top_k(k: int) -> str:
    return f"{TOP_K_PREFIX}{k}"


def without(expert: str) -> str:
    return f"flexmoe:without-{expert}"


def describe(names: list[str] | None = None) -> str:
    """One sentence naming each model (every known one, or those matching ``names``)."""
    wanted = MEANINGS if names is None else {k: v for k, v in MEANINGS.items() if _any(k, names)}
    return "; ".join(f"`{name}` {meaning}" for name, meaning in wanted.items()) + "."


def _any(pattern: str, names: list[str]) -> bool:
    head = pattern.removesuffix("X").removesuffix("K")
    return any(n == pattern or (head != pattern and n.startswith(head)) for n in names)


class DomainScore(BaseModel):
    """One model on one domain's held-out text."""

    model_config = ConfigDict(extra="allow")
    bits_per_byte: float = Field(gt=0)


class Evaluation(BaseModel):
    """Every model scored on the same text (registry name -> domain -> score), and the merged
    models' routing shares (domain -> expert -> share)."""

    model_config = ConfigDict(extra="allow")
    domains: list[str] = Field(min_length=1)
    experts: list[str]
    models: dict[str, dict[str, DomainScore]] = Field(min_length=1)
    public_expert: str | None = None
    top_k: int | None = None
    routing: dict[str, dict[str, float]] | None = None

    @classmethod
    def read(cls, results: Any, where: Path | str) -> Evaluation:
        """Validated results, or a one-line error naming the first field that is wrong."""
        if not isinstance(results, dict):
            raise FlexMoEError(where, "expected a JSON object written by flexmoe eval baselines")
        try:
            found = cls.model_validate(results)
        except ValidationError as e:
            first = e.errors()[0]
            field = ".".join(str(p) for p in first["loc"])
            raise FlexMoEError(where, f"field {field}: {first['msg']}") from None
        for model, row in found.models.items():
            for domain in found.domains:
                if domain not in row:
                    raise FlexMoEError(
                        where, f"field models.{model}.{domain}.bits_per_byte is missing"
                    )
        return found
