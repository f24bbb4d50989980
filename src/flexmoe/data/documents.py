"""Read documents from .txt, .jsonl and .parquet files, directories and globs."""

from __future__ import annotations

import glob
import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from flexmoe.errors import FlexMoEError
from flexmoe.io import atomic_write_bytes

SUFFIXES = (".txt", ".jsonl", ".parquet")


@dataclass(frozen=True)
class Document:
    """One document: its domain, a stable id and its text."""

    domain: str
    doc_id: str
    text: str

    @property
    def text_sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def write_jsonl(path: Path, docs: Iterable[tuple[str, str]]) -> int:
    """Write ``(id, text)`` pairs as JSON lines (fields ``id``, ``text``; read back with
    ``--id-field id``), atomically; returns how many."""
    lines = [json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) for doc_id, text in docs]
    atomic_write_bytes(Path(path), "".join(line + "\n" for line in lines).encode("utf-8"))
    return len(lines)


@dataclass(frozen=True)
class DataSpec:
    """Where one domain's documents live and how to read them."""

    domain: str
    paths: tuple[str, ...]
    text_field: str = "text"
    id_field: str | None = None


def _is_domain(name: str) -> bool:
    return bool(name) and name.replace("-", "").replace("_", "").isalnum()


def parse_data(
    values: Iterable[str],
    *,
    default_domain: str | None = None,
    option: str = "--data",
    text_field: str = "text",
    id_field: str | None = None,
) -> list[DataSpec]:
    """The one data syntax of every command: each value is ``DOMAIN=FILES`` or ``FILES``, FILES
    a comma list of files, directories or globs; repeats of one domain add up.

    Bare FILES belong to ``default_domain`` (``public`` for public data, the expert's name for
    an owner's), or where a command has none, to a domain named after the first file's stem.
    """
    found: dict[str, list[str]] = {}
    for value in values:
        head, sep, rest = value.partition("=")
        if sep and _is_domain(head.strip()):
            domain, files = head.strip(), rest
        elif sep and not head.strip():
            raise FlexMoEError(option, f"expected DOMAIN=FILES or FILES, got {value!r}")
        else:
            domain, files = default_domain or "", value
        paths = [p.strip() for p in files.split(",") if p.strip()]
        if not paths:
            raise FlexMoEError(option, f"no files in {value!r}")
        domain = domain or Path(paths[0].rstrip("/")).stem.split(".")[0]
        if not _is_domain(domain):
            raise FlexMoEError(option, f"domain name {domain!r} must be letters, digits, - or _")
        known = found.setdefault(domain, [])
        known.extend(p for p in paths if p not in known)
    return [DataSpec(d, tuple(p), text_field, id_field) for d, p in found.items()]


def expand_paths(pattern: str) -> list[Path]:
    """Files named by a path, a directory (searched recursively) or a glob, in sorted order."""
    if any(c in pattern for c in "*?["):
        matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
        if not matches:
            raise FlexMoEError(pattern, "the pattern matches no file")
        return [p for m in matches for p in expand_paths(str(m))]
    path = Path(pattern)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        if not files:
            raise FlexMoEError(path, f"directory holds no {', '.join(SUFFIXES)} file")
        return files
    if not path.exists():
        raise FlexMoEError(path, "file not found")
    if path.suffix not in SUFFIXES:
        raise FlexMoEError(path, f"unsupported file type; expected one of {', '.join(SUFFIXES)}")
    return [path]


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FlexMoEError(
            where, f"not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})"
        ) from e


def _make_doc(domain: str, text: str, doc_id: object | None) -> Document:
    if doc_id is None:
        doc_id = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    return Document(domain=domain, doc_id=str(doc_id), text=text)


def _read_txt(path: Path, spec: DataSpec) -> Iterator[Document]:
    text = _decode(path.read_bytes(), str(path))
    if not text.strip():
        raise FlexMoEError(path, "file is empty")
    yield _make_doc(spec.domain, text, None)


def _read_jsonl(path: Path, spec: DataSpec) -> Iterator[Document]:
    raw = path.read_bytes()
    if not raw.strip():
        raise FlexMoEError(path, "file is empty")
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(_decode(line, where))
        except json.JSONDecodeError as e:
            raise FlexMoEError(where, f"line is not JSON ({e.msg})") from e
        if not isinstance(record, dict) or spec.text_field not in record:
            raise FlexMoEError(where, f"no {spec.text_field!r} field")
        text = record[spec.text_field]
        if not isinstance(text, str):
            raise FlexMoEError(where, f"field {spec.text_field!r} is not a string")
        doc_id = record.get(spec.id_field) if spec.id_field else None
        if spec.id_field and doc_id is None:
            raise FlexMoEError(where, f"no {spec.id_field!r} field")
        if text.strip():
            yield _make_doc(spec.domain, text, doc_id)


def _read_parquet(path: Path, spec: DataSpec) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise FlexMoEError(path, f"not a readable parquet file ({e})") from e
    columns = [spec.text_field] + ([spec.id_field] if spec.id_field else [])
    for column in columns:
        if column not in schema.names:
            raise FlexMoEError(path, f"no column {column!r} (columns: {', '.join(schema.names)})")
    table = pq.read_table(path, columns=columns)
    texts = table.column(spec.text_field).to_pylist()
    ids = table.column(spec.id_field).to_pylist() if spec.id_field else [None] * len(texts)
    if not texts:
        raise FlexMoEError(path, "file is empty")
    for row, (text, doc_id) in enumerate(zip(texts, ids, strict=True)):
        if not isinstance(text, str):
            raise FlexMoEError(f"{path}:row {row}", f"column {spec.text_field!r} is not a string")
        if text.strip():
            yield _make_doc(spec.domain, text, doc_id)


_READERS = {".txt": _read_txt, ".jsonl": _read_jsonl, ".parquet": _read_parquet}


def read_documents(spec: DataSpec) -> list[Document]:
    """All documents of one domain, in a deterministic order."""
    docs: list[Document] = []
    for pattern in spec.paths:
        for path in expand_paths(pattern):
            docs.extend(_READERS[path.suffix](path, spec))
    if not docs:
        raise FlexMoEError(",".join(spec.paths), f"no documents for domain {spec.domain!r}")
    return docs
