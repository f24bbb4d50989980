"""What every command shares: option types, the data syntax, config files and output."""

from __future__ import annotations

import functools
import inspect
import json
import os
import tomllib
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from flexmoe.cli.vocabulary import renamed_key
from flexmoe.data.documents import DataSpec, parse_data
from flexmoe.errors import FlexMoEError
from flexmoe.io import read_bounded
from flexmoe.training.config import TrainConfig

if TYPE_CHECKING:
    from pydantic import BaseModel

    from flexmoe.expert.registry import KeyRegistry
    from flexmoe.training.loop import TrainResult

QUIET = {"on": False}
DEBUG = {"on": False}
MAX_CONFIG_BYTES = 1 << 20


def cache_dir() -> Path:
    return Path(os.environ.get("FLEXMOE_CACHE", "~/.cache/flexmoe")).expanduser()


def token_cache(path: Path | None) -> Path:
    return path or cache_dir() / "tokens"


DATA_HELP = "DOMAIN=FILES or FILES: files, directories or globs, comma-separated; repeatable"
DataOpt = Annotated[list[str], typer.Option("--data", help=DATA_HELP)]
PublicDataOpt = Annotated[
    list[str] | None,
    typer.Option(
        help="the public corpus, FILES as for --data [default: the anchor's own public corpus, "
        "found from the path and sha256 it records]"
    ),
]
TextFieldOpt = Annotated[str, typer.Option(help="jsonl/parquet field holding the text")]
IdFieldOpt = Annotated[str | None, typer.Option(help="jsonl/parquet field holding a document id")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")]
StoredDtypeOpt = Annotated[
    str | None,
    typer.Option(
        "--dtype",
        help="dtype the anchor is stored in, and with it every package and merged model: "
        "float32, bfloat16 or float16 [default: import: the source's; train: float32]",
    ),
]
CacheOpt = Annotated[Path | None, typer.Option(help="token cache [default: $FLEXMOE_CACHE/tokens]")]
RouterInitOpt = Annotated[
    str, typer.Option(help="router rows from: anchor-hidden, embedder or random (ablation)")
]
EmbedderOpt = Annotated[
    Path | None, typer.Option(help="local sentence-embedding model (for --router-init embedder)")
]
ExcludeOpt = Annotated[
    list[str] | None, typer.Option(help="expert or owner to leave out (repeatable)")
]
IncludeOpt = Annotated[
    list[str] | None, typer.Option(help="only these experts or owners (repeatable)")
]
LicenseOpt = Annotated[
    list[str] | None, typer.Option("--license", help="only experts under these licenses")
]
BiasOpt = Annotated[
    bool | None,
    typer.Option(
        "--bias/--no-bias",
        help="apply the owners' learned router biases (default: off, as measured)",
        show_default=False,
    ),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="replace an existing output directory")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print the result as JSON")]
LogDirOpt = Annotated[
    Path | None,
    typer.Option(help="write TensorBoard event files (loss, lr, validation, tokens/s) here"),
]
SigningKeyOpt = Annotated[
    Path | None,
    typer.Option(help="sign the package with this private key (`flexmoe keys generate`)"),
]
RegistryOpt = Annotated[
    Path | None,
    typer.Option(
        help="the coordinator's key registry: signatures checked against it, and required "
        "unless its policy allows unsigned packages"
    ),
]
SeedOpt = Annotated[int, typer.Option(help="random seed")]


def use_bias(flag: bool | None) -> bool:
    from flexmoe.merge.layout import APPLY_BIAS

    return APPLY_BIAS if flag is None else flag


def data_specs(
    values: list[str] | None,
    text_field: str,
    id_field: str | None,
    *,
    default_domain: str | None = None,
    option: str = "--data",
) -> list[DataSpec]:
    """The values of a data option, in the one data syntax (:func:`parse_data`)."""
    return parse_data(
        values or [],
        default_domain=default_domain,
        option=option,
        text_field=text_field,
        id_field=id_field,
    )


@contextmanager
def open_registry(path: Path | None) -> Iterator[KeyRegistry | None]:
    """The key registry at ``path`` (which must exist), or None."""
    if path is None:
        yield None
        return
    from flexmoe.expert.registry import KeyRegistry

    with KeyRegistry(path) as registry:
        yield registry


M = TypeVar("M", bound="BaseModel")


def as_spec(kind: type[M], **parts: object) -> M:
    """The typed spec ``kind`` built from a command's options; a part that does not fit is
    one line naming it (``public.fraction: Input should be less than 1``)."""
    from pydantic import ValidationError

    try:
        return kind.model_validate(parts)
    except ValidationError as e:
        error = e.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise FlexMoEError(where or kind.__name__, error["msg"]) from None


def say(line: str) -> None:
    """A progress line on stderr, unless --quiet."""
    if not QUIET["on"]:
        typer.echo(line, err=True)


def emit(as_json: bool, payload: Any, text: str | Callable[[], str]) -> None:
    """A command's result on stdout: JSON (ASCII, so nothing in it drives the terminal) or text."""
    if as_json:
        typer.echo(json.dumps(payload, indent=2, ensure_ascii=True))
    else:
        typer.echo(text() if callable(text) else text)


def train_summary(out: Path, result: TrainResult, **extra: object) -> dict[str, object]:
    """A training command's result as JSON."""
    return {
        "out": str(out),
        "steps": result.steps,
        "tokens": result.tokens,
        "final_train_loss": result.final_train_loss,
        "final_val_loss": result.final_val_loss,
        "seconds": result.seconds,
        **extra,
    }


# --- Config files: ``--config run.toml`` supplies any option of the command; flags win. ---


def _load_config(ctx: Any, param: Any, value: str | None) -> str | None:
    """Read ``--config`` into the context's defaults (click's ``default_map``), before the
    other options are parsed; an option given on the command line wins over it."""
    if value is None:
        return None
    path = Path(value)
    try:
        table = tomllib.loads(read_bounded(path, max_bytes=MAX_CONFIG_BYTES).decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise FlexMoEError(path, f"not valid TOML ({e})") from e
    options = {  # by parameter name and by flag: ``as_json`` is also ``json``
        key: p
        for p in ctx.command.params
        if p.name and p.name != param.name
        for key in (p.name, *(o.lstrip("-").replace("-", "_") for o in p.opts))
    }
    defaults: dict[str, Any] = {}
    command = " ".join(ctx.command_path.split()[1:])  # "flexmoe fed simulate": "fed simulate"
    for old_key, old_item in table.items():
        key, item = renamed_key(command, old_key, old_item)
        name = key.replace("-", "_")
        if isinstance(item, dict):
            raise FlexMoEError(path, f"{key}: expected a value, got a table")
        option = options.get(name)
        if option is None:
            raise FlexMoEError(path, f"unknown option {key!r} for this command (see --help)")
        if option.multiple and not isinstance(item, list):
            item = [item]
        if isinstance(item, list) and not option.multiple:
            raise FlexMoEError(path, f"{key}: takes one value, got a list")
        defaults[option.name] = [str(v) for v in item] if isinstance(item, list) else item
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


ConfigOpt = Annotated[
    str | None,
    typer.Option(
        "--config",
        help="TOML file of this command's options (keys as the flags, without --); "
        "flags given on the command line win",
        is_eager=True,
        callback=_load_config,
    ),
]

F = TypeVar("F", bound=Callable[..., Any])


def _with_params(
    command: Callable[..., Any], signature: inspect.Signature, params: list[inspect.Parameter]
) -> Any:
    """``command`` as typer reads it: with these parameters (typer takes the options from
    the signature and the types from the annotations)."""
    command.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command


def with_config(func: F) -> F:
    """Give a command ``--config FILE``."""
    signature = inspect.signature(func, eval_str=True)
    config = inspect.Parameter(
        "config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ConfigOpt
    )

    @functools.wraps(func)
    def command(*args: Any, config: str | None = None, **kwargs: Any) -> Any:
        return func(*args, **kwargs)

    return _with_params(command, signature, [*signature.parameters.values(), config])


def training_options(
    defaults: TrainConfig, *, leave_out: frozenset[str] = frozenset()
) -> Callable[[F], F]:
    """One option per :class:`TrainConfig` field (help from the field, default from
    ``defaults``), and ``--config``; the command receives them as ``training: TrainConfig``."""
    hints = typing.get_type_hints(TrainConfig)
    chosen = [f for f in fields(TrainConfig) if f.name not in leave_out]

    def wrap(func: F) -> F:
        signature = inspect.signature(func, eval_str=True)
        kept = [p for p in signature.parameters.values() if p.name != "training"]
        added = [
            inspect.Parameter(
                f.name,
                inspect.Parameter.KEYWORD_ONLY,
                default=getattr(defaults, f.name),
                annotation=Annotated[
                    hints[f.name], typer.Option(help=f.metadata["help"], rich_help_panel="Training")
                ],
            )
            for f in chosen
        ]

        @functools.wraps(func)
        def command(**kwargs: Any) -> Any:
            values = {f.name: kwargs.pop(f.name) for f in chosen}
            return func(**kwargs, training=replace(defaults, **values))

        return with_config(_with_params(command, signature, [*kept, *added]))

    return wrap
