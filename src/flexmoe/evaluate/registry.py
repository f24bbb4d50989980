"""Every model the evaluation can score, by name, in one place, and the typed result of scoring
them.

Names: the baselines (``anchor``, ``specialist:X``, ``soup``, ``btm``, ``seq-route``,
``unrestricted``), the merged model ``flexmoe`` and its variants (``flexmoe:top-K``,
``flexmoe:bias`` / ``flexmoe:no-bias``, ``flexmoe:without-X``), and the experiment's other
models (router tuning and its ablations). :class:`Evaluation` is what
:func:`flexmoe.evaluate.suite.run_suite` returns and ``evaluation.json`` holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flexmoe.errors import FlexMoEError


class Base(StrEnum):
    """The models a variant starts from."""

    ANCHOR = "anchor"
    SPECIALIST = "specialist"
    SOUP = "soup"
    BTM = "btm"
    SEQ_ROUTE = "seq-route"
    UNRESTRICTED = "unrestricted"
    FEDAVG = "fedavg"
    FLEXMOE = "flexmoe"


class RouterVersion(StrEnum):
    """Router rows other than the owners' own, each a merged model directory of its own."""

    TUNED = "tuned"  # tuned on the public documents the owners picked
    RANDOM_INIT = "random-init"  # every owner's row started from a random vector
    OWNER_TEXT_TUNED = "tuned-owner-text"  # tuned on owners' own text (an ablation)
    CALIBRATED = "calibrated"  # owners' rows rescaled on public text by the coordinator
    ROUTER_CEILING = "router-ceiling"  # fitted on the scored text: a bound, not a recipe
    FEDERATED = "federated"  # slots and rows refined in federated rounds, each owner at home


@dataclass(frozen=True)
class Variant:
    """One model the evaluation scores, by its parts: a base model, the expert of a specialist,
    and the merged model's options (top-k, the owners' biases, experts left out, router
    version). :meth:`name` and :meth:`parse` are the only spelling of its name:
    ``anchor``, ``specialist:X``, ``flexmoe``, ``flexmoe:top-2:without-X``, ``flexmoe:tuned``..."""

    base: Base
    expert: str | None = None  # a specialist's owner
    top_k: int | None = None  # None: the merged model's own
    bias: bool | None = None  # None: the default (``merge.layout.APPLY_BIAS``)
    without: tuple[str, ...] = ()
    router: RouterVersion | None = None
    prefix: int | None = None  # % of each router logit taken from its mean over the prefix

    def __post_init__(self) -> None:
        merged_only = (self.top_k, self.bias, self.router, self.prefix)
        if self.base != Base.FLEXMOE and (any(v is not None for v in merged_only) or self.without):
            raise FlexMoEError(self.base.value, "only the merged model takes options")
        if (self.base == Base.SPECIALIST) != bool(self.expert):
            raise FlexMoEError(self.base.value, "a specialist names one expert: specialist:X")
        if self.top_k is not None and self.top_k < 1:
            raise FlexMoEError(f"top-{self.top_k}", "top-k must be at least 1")
        if self.prefix is not None and not 0 < self.prefix <= 100:
            raise FlexMoEError(f"prefix-{self.prefix}", "prefix must be a share in 1..100 (%)")

    def name(self) -> str:
        if self.base == Base.SPECIALIST:
            return f"{self.base}:{self.expert}"
        options = [
            *([f"top-{self.top_k}"] if self.top_k is not None else []),
            *([] if self.bias is None else ["bias" if self.bias else "no-bias"]),
            *(f"without-{e}" for e in self.without),
            *([self.router.value] if self.router else []),
            *([f"prefix-{self.prefix}"] if self.prefix is not None else []),
        ]
        return ":".join([self.base.value, *options])

    @classmethod
    def parse(cls, name: str) -> Variant:
        """The variant ``name`` spells; a one-line error naming what is wrong."""
        head, *options = name.split(":")
        try:
            base = Base(head)
        except ValueError:
            known = ", ".join(b.value for b in Base)
            raise FlexMoEError(name, f"unknown baseline; choose from {known}") from None
        if base == Base.SPECIALIST:
            return cls(base, expert=":".join(options) or None)
        top_k, bias, without, router, prefix = None, None, [], None, None
        for option in options:
            if option.startswith("top-") and option[4:].isdigit():
                top_k = int(option[4:])
            elif option.startswith("prefix-") and option[7:].isdigit():
                prefix = int(option[7:])
            elif option in ("bias", "no-bias"):
                bias = option == "bias"
            elif option.startswith("without-") and option[8:]:
                without.append(option[8:])
            elif option in RouterVersion._value2member_map_:
                router = RouterVersion(option)
            else:
                raise FlexMoEError(
                    name,
                    f"unknown option {option!r}; use top-K, bias, no-bias, without-NAME,"
                    f" prefix-P or a router version ({', '.join(RouterVersion)})",
                )
        return cls(
            base, top_k=top_k, bias=bias, without=tuple(without), router=router, prefix=prefix
        )


ANCHOR = Variant(Base.ANCHOR).name()
SOUP = Variant(Base.SOUP).name()
BTM = Variant(Base.BTM).name()
SEQ_ROUTE = Variant(Base.SEQ_ROUTE).name()
UNRESTRICTED = Variant(Base.UNRESTRICTED).name()
FEDAVG = Variant(Base.FEDAVG).name()
FLEXMOE = Variant(Base.FLEXMOE).name()
BIAS = Variant(Base.FLEXMOE, bias=True).name()
NO_BIAS = Variant(Base.FLEXMOE, bias=False).name()
TUNED = Variant(Base.FLEXMOE, router=RouterVersion.TUNED).name()
RANDOM_INIT = Variant(Base.FLEXMOE, router=RouterVersion.RANDOM_INIT).name()
OWNER_TEXT_TUNED = Variant(Base.FLEXMOE, router=RouterVersion.OWNER_TEXT_TUNED).name()
CALIBRATED = Variant(Base.FLEXMOE, router=RouterVersion.CALIBRATED).name()
ROUTER_CEILING = Variant(Base.FLEXMOE, router=RouterVersion.ROUTER_CEILING).name()
FEDERATED = Variant(Base.FLEXMOE, router=RouterVersion.FEDERATED).name()
PREFIX = Variant(Base.FLEXMOE, prefix=50).name()
MAIN_MODELS = (ANCHOR, SOUP, BTM, SEQ_ROUTE, UNRESTRICTED, FEDAVG, FLEXMOE, FEDERATED, TUNED)

# What each name means, in the words the report uses (X: an owner's expert, K: a number).
MEANINGS = {
    ANCHOR: "the public model",
    "specialist:X": "owner X's own model (the anchor, its expert, the rivals it trained against)",
    SOUP: "the anchor with the average of all FFNs",
    BTM: "Branch-Train-Merge (the specialists' next-token distributions mixed by their "
    "posterior given the context, top 2)",
    SEQ_ROUTE: "each document sent whole to the specialist with the nearest router rows",
    UNRESTRICTED: "the same shape trained on all the data in one place",
    FEDAVG: "the anchor's dense model trained by FedAvg (Flower) on the owners' text, each owner "
    "at home",
    FEDERATED: "the merged model after federated rounds (Flower): each owner trained what every "
    "owner shares (the trunk: attention, norms, the public and rival experts, the output layer, "
    "the router rows) at home, and the coordinator applied the average",
    FLEXMOE: "the merged model",
    "flexmoe:top-K": "K experts active per token",
    BIAS: "the owners' learned negative biases on",
    "flexmoe:without-X": "owner X opted out",
    "flexmoe:prefix-P": "document-level routing: P% of each router logit is its mean over the "
    "text so far",
    TUNED: "the router tuned on the public documents the owners picked",
    OWNER_TEXT_TUNED: "the router tuned on the owners' own text (an ablation that hands it over)",
    RANDOM_INIT: "every owner's router row started from a random vector",
    CALIBRATED: "the owners' rows rescaled by the coordinator on public text",
    ROUTER_CEILING: "the rows fitted on the very text scored (a bound, not a recipe)",
}


def specialist(expert: str) -> str:
    return Variant(Base.SPECIALIST, expert=expert).name()


def top_k(k: int) -> str:
    return Variant(Base.FLEXMOE, top_k=k).name()


def without(expert: str) -> str:
    return Variant(Base.FLEXMOE, without=(expert,)).name()


def describe(names: list[str] | None = None) -> str:
    """One sentence naming each model (every known one, or those matching ``names``)."""
    wanted = MEANINGS if names is None else {k: v for k, v in MEANINGS.items() if _any(k, names)}
    return "; ".join(f"`{name}` {meaning}" for name, meaning in wanted.items()) + "."


def _any(pattern: str, names: list[str]) -> bool:
    head = pattern.removesuffix("X").removesuffix("K").removesuffix("P")
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
    default_bias: bool = False
    max_documents: int | None = None
    max_bytes: int | None = None
    order: list[str] = Field(default_factory=list)  # the order models were scored in
    routing: dict[str, dict[str, float]] | None = None  # of ``flexmoe``
    routing_tuned: dict[str, dict[str, float]] | None = None  # of ``flexmoe:tuned``
    mixtures: list[str] = Field(default_factory=list)  # text that needs two experts, scored too
    cost: dict[str, float] = Field(default_factory=dict)  # inference FLOPs per token / anchor's
    seconds: dict[str, float] = Field(default_factory=dict)  # scoring time per model

    def bpb(self, model: str, domain: str) -> float:
        return self.models[model][domain].bits_per_byte

    def average(self, model: str) -> float:
        return sum(self.bpb(model, d) for d in self.domains) / len(self.domains)

    def model_order(self) -> list[str]:
        """Scored models in the order they were run (JSON files keep keys sorted)."""
        order = [m for m in self.order if m in self.models]
        return order + [m for m in self.models if m not in order]

    def routing_of(self, model: str = FLEXMOE) -> dict[str, dict[str, float]]:
        """The routing-share matrix (domain -> expert -> share) measured for ``model``, if any."""
        found = {FLEXMOE: self.routing, TUNED: self.routing_tuned}.get(model)
        return dict(found or {})

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
            for domain in [*found.domains, *found.mixtures]:
                if domain not in row:
                    raise FlexMoEError(
                        where, f"field models.{model}.{domain}.bits_per_byte is missing"
                    )
        return found
