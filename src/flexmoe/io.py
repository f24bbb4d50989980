"""Safe file output: every artifact is written to a temporary path and renamed into place."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self, TypeVar

from pydantic import BaseModel, ValidationError

from flexmoe.errors import FlexMoEError

ModelT = TypeVar("ModelT", bound=BaseModel)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_directory(
    dest: Path, *, overwrite: bool = False, private: frozenset[str] = frozenset()
) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces ``dest`` only if the block succeeds.

    The temporary directory sits beside ``dest`` (same file system, so the rename is atomic).
    On any exception it is removed and ``dest`` is left as it was. Its files get the umask's
    modes, except the top-level files named in ``private``: readable by their owner alone.
    """
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise FlexMoEError(dest, "already exists; choose another output or pass --force")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for path in [tmp, *tmp.rglob("*")]:
        mode = 0o777 if path.is_dir() else 0o666
        os.chmod(path, (0o600 if path.parent == tmp and path.name in private else mode) & ~_umask())
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        os.replace(dest, old / dest.name)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


MAX_JSON_BYTES = 16 << 20  # larger JSON files are refused before they are read
MAX_JSON_DEPTH = 32
MAX_INT_DIGITS = 30


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the key {key!r} appears twice")
        out[key] = value
    return out


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text):,} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def read_bounded(path: Path, *, max_bytes: int = MAX_JSON_BYTES) -> bytes:
    """The bytes of the regular file at ``path``, its size checked before it is read."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        raise FlexMoEError(path, "file not found" if not path.exists() else "not a regular file")
    size = path.stat().st_size
    if size > max_bytes:
        raise FlexMoEError(path, f"is {size:,} bytes; at most {max_bytes:,} are read")
    return path.read_bytes()


def parse_json(raw: bytes, path: Path) -> Any:
    """JSON text read from ``path``, parsed within limits: the nesting depth (checked before the
    parser sees it), the digits of an integer; a key given twice in one object is refused."""
    if _nesting(raw) > MAX_JSON_DEPTH:
        raise FlexMoEError(path, f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_int=_int)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FlexMoEError(path, f"not valid JSON ({e})") from e


def read_json(path: Path, *, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Read a JSON file, turning a missing, oversized or malformed file into a one-line error
    (the limits of :func:`read_bounded` and :func:`parse_json`)."""
    return parse_json(read_bounded(path, max_bytes=max_bytes), Path(path))


_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def _nesting(raw: bytes) -> int:
    """How deep the brackets of JSON text nest outside its strings: found before the (recursive)
    parser sees a hostile depth."""
    depth = deepest = 0
    for byte in _STRING.sub(b'""', raw).translate(None, _NOT_BRACKETS):
        depth += 1 if byte in b"[{" else -1
        deepest = max(deepest, depth)
    return deepest


def read_manifest_model(path: Path, model: type[ModelT]) -> ModelT:
    """Read a JSON file into a pydantic model; the first field at fault names the error."""
    return validate_model(read_json(path), Path(path), model)


def validate_model(data: Any, path: Path, model: type[ModelT]) -> ModelT:
    """``data`` read from ``path`` as a pydantic model; the first field at fault names the
    error."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        message = str(err["msg"]).removeprefix("Value error, ")
        raise FlexMoEError(path, f"field {field!r}: {message}") from e


def toml_text(values: Mapping[str, object]) -> str:
    """Flat ``key = value`` TOML (strings, numbers, booleans and lists of them), as
    ``--config`` reads it. JSON's string escapes are TOML's."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float) and math.isfinite(v):
            return repr(v)
        if isinstance(v, str | Path):
            return json.dumps(str(v))
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(f"no TOML for {v!r}")

    return "".join(f"{k} = {value(v)}\n" for k, v in values.items() if v is not None)


def show_progress(wanted: bool = True) -> bool:
    """Whether to draw progress bars: ``wanted``, unless ``TQDM_DISABLE`` is set (tqdm's own
    switch, honoured though flexmoe passes ``disable`` itself)."""
    value = os.environ.get("TQDM_DISABLE", "").strip().lower()
    return wanted and value in {"", "0", "false", "no", "off"}


def sha256_file(path: Path, *, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class SqliteStore:
    """A store kept in one SQLite file, ``self.path``, through one connection, ``self.db``;
    ``with`` closes it.

    The file may be replaced under an open store: a merged model's directory is rewritten
    by every edit, which copies each store into the new directory while holding its write lock.
    :meth:`transaction` notices the replacement once it has the lock and moves to the new file,
    so a change made during an edit lands in the new directory.
    """

    path: Path
    db: sqlite3.Connection
    _inode: int
    SCHEMA: str = ""
    WHAT: str = "the store"

    def _open(self) -> None:
        self.db = open_sqlite(self.path, self.SCHEMA, self.WHAT)
        self._inode = self.path.stat().st_ino

    def _reopened(self) -> None:
        """Called after moving to a replaced file: refresh what was read from its directory."""

    def _replaced(self) -> bool:
        try:
            return self.path.stat().st_ino != self._inode
        except FileNotFoundError:
            return True

    def _current(self) -> sqlite3.Connection:
        """The connection, moved to the file now at ``self.path`` if that was replaced."""
        if self._replaced():
            self.db.close()
            self._open()
            self._reopened()
        return self.db

    @contextmanager
    def transaction(self, doing: str) -> Iterator[sqlite3.Connection]:
        """One write transaction on the file now at ``self.path`` (``BEGIN IMMEDIATE``), committed
        when the block ends; ``doing`` names it in the one-line error of a failure."""
        try:
            for _ in range(3):
                self.db.execute("BEGIN IMMEDIATE")
                if not self._replaced():
                    break
                self.db.execute("ROLLBACK")
                self._current()
            else:
                raise FlexMoEError(self.path, f"could not {doing}: the directory keeps changing")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")
        except sqlite3.Error as e:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise FlexMoEError(self.path, f"could not {doing} ({e})") from e

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_sqlite(path: Path, schema: str, what: str) -> sqlite3.Connection:
    """A connection to the SQLite file at ``path`` in WAL mode with durable commits
    (``synchronous=FULL``), autocommit unless a transaction is begun, ``schema`` applied;
    a one-line error naming ``what`` when it cannot be opened."""
    try:
        db = sqlite3.connect(path, timeout=30, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(schema)
    except sqlite3.Error as e:
        raise FlexMoEError(path, f"cannot open {what} ({e})") from e
    return db


def parse_address(value: str, option: str) -> tuple[str, int]:
    """``HOST:PORT`` (an IPv6 host in brackets) as its host and port, or a one-line error
    naming ``option``: the one form every command that listens or connects takes."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise FlexMoEError(option, f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)
