"""Reading records from the files, folders, shipped resources and hub datasets users have.

Every record comes with where it came from (``file.jsonl:12``), so any later error can name the
file and line. Malformed input is an error naming file, line and the problem, or, with
``on_error="skip"``, a skip counted under its reason in a :class:`Skips` counter. Never silent::

    skips = Skips()
    for where, record in read_records("chats.jsonl.gz", on_error="skip", skips=skips):
        ...
    skips.summary()   # {"malformed JSON": 2, ...}

What a source may be (one string, one mapping, or a list of them mixed by weight and seed):

==============================================  ==================================================
source                                          records
==============================================  ==================================================
``x.jsonl``, ``x.jsonl.gz``, ``x.jsonl.zst``    one JSON object per line (``.ndjson`` too)
``x.json`` (``.gz``, ``.zst``)                  an array of objects, streamed item by item (a file
                                                that starts with ``{`` is read as JSON lines)
``x.parquet``                                   one record per row, in batches
``x.txt``                                       one record ``{"id": stem, text_field: contents}``
a folder                                        its ``.txt`` files and every file above, by name
``ctrltok:<resource>``                          a shipped resource (``ctrltok/resources``)
``hf:NAME[:CONFIG][?split=S&revision=R``        a Hugging Face dataset, streamed
``&data_files=F1,F2]``
``{hf: NAME, config:, split:, revision:,``      the same as a mapping (``hf: json`` with local
``data_files:}``                                ``data_files`` reads local files through ``datasets``)
``NAME[:SPLIT]``, not a path                    a ``datasets`` name (the older spelling)
==============================================  ==================================================

Several sources (``[{path: a.jsonl, weight: 2}, b.jsonl.gz]``) are interleaved by :func:`mix`: a
record's place depends only on the seed, its source and its index there, so a rerun reads the same
mixture, and nothing is held in memory but one pending record per source.
"""

from __future__ import annotations

import gzip
import heapq
import io
import json
import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import IO, Any, TypeVar

import zstandard

from ctrltok.core.config import DataConfig, SourceConfig, source_config

T = TypeVar("T")

CHUNK = 1 << 20  # characters read at a time from a .json array
MAX_ITEM = 256 << 20  # a .json array item larger than this is an error (or the file is malformed)
FORMATS = ("jsonl", "ndjson", "json", "parquet", "txt")
COMPRESSIONS = ("gz", "zst")
_WS = re.compile(r"[ \t\r\n]*")
_END = object()
# A JSON escape of a UTF-16 surrogate: decoded alone (without its pair) it is a string no tokenizer
# or UTF-8 writer accepts, so such a record is refused at reading, where its line is known.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class RecordError(ValueError):
    """Bad input; the message names the file, the line and what was wrong."""


class Skips(Counter):
    """Counts of skipped records by reason, with the first few places for each reason."""

    def __init__(self) -> None:
        super().__init__()
        self.examples: dict[str, list[str]] = {}

    def add(self, reason: str, where: str) -> None:
        self[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 3:
            self.examples[reason].append(where)

    def summary(self) -> dict[str, int]:
        return dict(self)


def resource_path(name: str) -> Path:
    """`ctrltok:instructions` -> the shipped `resources/instructions.jsonl`."""
    base = resources.files("ctrltok") / "resources"
    for candidate in (name, f"{name}.jsonl"):
        path = Path(str(base / candidate))
        if path.is_file():  # `ctrltok:` alone names the resources folder: no resource, not IsADirectoryError
            return path
    raise RecordError(f"ctrltok:{name}: no such shipped resource (see ctrltok/resources/README.md)")


def reject(msg: str, where: str, on_error: str, skips: Skips | None, reason: str) -> None:
    """A bad record: raise :class:`RecordError` naming ``where`` (``on_error="raise"``), or count it
    in ``skips`` under ``reason`` and go on (``on_error="skip"``)."""
    if on_error == "skip":
        if skips is not None:
            skips.add(reason, where)
        return
    raise RecordError(f"{where}: {msg}")


def _lone_surrogate(value: Any) -> str | None:
    """The first unpaired UTF-16 surrogate in a decoded JSON value (``"\\ud800"``), or ``None``."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError as exc:
                    return f"\\u{ord(item[exc.start]):04x}"
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def _surrogate_problem(surrogate: str) -> str:
    return (f"a lone surrogate {surrogate} in a string (half of a UTF-16 pair, not text); fix the escaping where "
            "the file was written, or drop the record")


def file_format(path: Path) -> tuple[str | None, str | None]:
    """``x.jsonl.gz`` -> ``("jsonl", "gz")``; ``(None, ...)`` for a file ctrltok does not read."""
    name = path.name.lower()
    compression = next((c for c in COMPRESSIONS if name.endswith(f".{c}")), None)
    if compression:
        name = name[: -len(compression) - 1]
    fmt = next((f for f in FORMATS if name.endswith(f".{f}")), None)
    if fmt == "ndjson":
        fmt = "jsonl"
    if fmt in ("parquet", "txt") and compression:
        return None, compression
    return fmt, compression


@contextmanager
def _open_bytes(path: Path, compression: str | None) -> Iterator[IO[bytes]]:
    with open(path, "rb") as raw:
        if compression == "gz":
            with gzip.GzipFile(fileobj=raw, mode="rb") as fh:
                yield fh
        elif compression == "zst":
            reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
            yield io.BufferedReader(reader)
        else:
            yield raw


_STREAM_ERRORS = (OSError, EOFError, zstandard.ZstdError)


def _lines(fh: IO[bytes], path: Path) -> Iterator[tuple[int, bytes]]:
    """``(line number, raw line)``; a corrupt or truncated compressed stream is a RecordError."""
    lineno = 0
    while True:
        try:
            raw = fh.readline()
        except _STREAM_ERRORS as exc:
            raise RecordError(f"{path}:{lineno + 1}: cannot decompress ({type(exc).__name__}: {exc})") from exc
        if not raw:
            return
        lineno += 1
        yield lineno, raw


def _read_jsonl(path: Path, on_error: str, skips: Skips | None,
                compression: str | None = None) -> Iterator[tuple[str, dict]]:
    with _open_bytes(path, compression) as fh:
        for lineno, raw in _lines(fh, path):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                reject(f"invalid UTF-8 at byte {exc.start}", where, on_error, skips, "invalid UTF-8")
                continue
            if lineno == 1:
                line = line.lstrip("\ufeff")
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                reject(f"malformed JSON ({exc.msg} at column {exc.colno})", where, on_error, skips, "malformed JSON")
                continue
            except (ValueError, RecursionError) as exc:  # an integer over 4,300 digits, nesting deeper than the stack
                reject(f"malformed JSON ({_unreadable(exc)})", where, on_error, skips, "malformed JSON")
                continue
            if not isinstance(rec, dict):
                reject(f"expected a JSON object, found {type(rec).__name__}", where, on_error, skips, "not an object")
                continue
            surrogate = _lone_surrogate(rec) if _SURROGATE_ESCAPE.search(raw) else None
            if surrogate:
                reject(_surrogate_problem(surrogate), where, on_error, skips, "lone surrogate")
                continue
            yield where, rec


def _unreadable(exc: BaseException) -> str:
    """What Python's JSON reader refused beyond syntax, in a few words."""
    if isinstance(exc, RecursionError):
        return "nested too deeply to read"
    return " ".join(str(exc).split())[:160]


class _TextBuffer:
    """A window over a text stream for :func:`_read_json_array`: ``pos`` into ``buf``, ``line`` of ``pos``."""

    def __init__(self, fh: IO[str], path: Path):
        self.fh, self.path = fh, path
        self.buf, self.pos, self.line, self.eof = "", 0, 1, False

    def fill(self, n: int) -> bool:
        """Drop what was consumed and read ``n`` more characters; False at the end of the file."""
        self.buf, self.pos = self.buf[self.pos:], 0
        try:
            chunk = self.fh.read(n)
        except UnicodeDecodeError as exc:
            raise RecordError(f"{self.path}:{self.line}: invalid UTF-8 (a .json array cannot skip it)") from exc
        except _STREAM_ERRORS as exc:
            raise RecordError(f"{self.path}:{self.line}: cannot decompress ({type(exc).__name__}: {exc})") from exc
        self.eof = not chunk
        self.buf += chunk
        return bool(chunk)

    def advance(self, end: int) -> None:
        self.line += self.buf.count("\n", self.pos, end)
        self.pos = end

    def peek(self) -> str:
        """The next character that is not white space (consumed up to it); ``""`` at the end."""
        while True:
            self.advance(_WS.match(self.buf, self.pos).end())
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.fill(CHUNK):
                return ""

    def value(self, decoder: json.JSONDecoder) -> Any:
        """Decode the JSON value at ``pos``, reading more (doubling) while it may be cut off."""
        while True:
            try:
                obj, end = decoder.raw_decode(self.buf, self.pos)
                if end < len(self.buf) or self.eof:  # a number at the buffer's end may go on
                    self.advance(end)
                    return obj
            except (RecursionError, ValueError) as exc:
                if not isinstance(exc, json.JSONDecodeError):  # too deep, or an integer over 4,300 digits
                    raise RecordError(f"{self.path}:{self.line}: malformed JSON ({_unreadable(exc)}); a .json array "
                                      "cannot skip it") from exc
                cut = exc.msg.startswith("Unterminated string") or exc.pos >= len(self.buf) - 12  # may go on
                if self.eof or not cut or len(self.buf) - self.pos > MAX_ITEM:
                    line = self.line + self.buf.count("\n", self.pos, exc.pos)
                    raise RecordError(f"{self.path}:{line}: malformed JSON ({exc.msg}); "
                                      "a .json array cannot skip it") from exc
            self.fill(max(CHUNK, len(self.buf) - self.pos))


def _read_json(path: Path, on_error: str, skips: Skips | None, compression: str | None) -> Iterator[tuple[str, dict]]:
    """A ``.json`` file: an array of records streamed with ``JSONDecoder.raw_decode`` over chunks
    (memory: one record and one chunk), or JSON lines when the file starts with ``{``. A record that
    is not an object is a bad record (skippable); broken JSON syntax is always an error, since the
    rest of an array cannot be found without it."""
    decoder = json.JSONDecoder()
    with _open_bytes(path, compression) as raw:
        buf = _TextBuffer(io.TextIOWrapper(raw, encoding="utf-8-sig"), path)
        first = buf.peek()
        if first == "{":
            lines = True
        elif first in ("[", ""):
            lines = False
        else:
            raise RecordError(f"{path}:{buf.line}: expected a JSON array of records (or JSON lines), found {first!r}")
        if not lines and first == "[":
            buf.advance(buf.pos + 1)
            n = 0
            end = buf.peek() == "]"
            if end:
                buf.advance(buf.pos + 1)
            while not end:
                n += 1
                where = f"{path}:{buf.line} (item {n})"
                rec = buf.value(decoder)
                surrogate = _lone_surrogate(rec) if isinstance(rec, dict) else None
                if surrogate:
                    reject(_surrogate_problem(surrogate), where, on_error, skips, "lone surrogate")
                elif isinstance(rec, dict):
                    yield where, rec
                else:
                    reject(f"expected a JSON object, found {type(rec).__name__}", where, on_error, skips,
                           "not an object")
                sep = buf.peek()
                if sep not in (",", "]"):
                    found = repr(sep) if sep else "the end of the file"
                    raise RecordError(f"{path}:{buf.line}: malformed JSON (expected ',' or ']' after item {n}, "
                                      f"found {found}); a .json array cannot skip it")
                buf.advance(buf.pos + 1)
                end = sep == "]"
                if not end and buf.peek() in ("]", ""):
                    raise RecordError(f"{path}:{buf.line}: malformed JSON (a value expected after ',')")
            if buf.peek():
                raise RecordError(f"{path}:{buf.line}: malformed JSON (extra data after the array)")
    if lines:
        yield from _read_jsonl(path, on_error, skips, compression)


def _read_parquet(path: Path) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for rec in batch.to_pylist():
            row += 1
            yield f"{path}:row {row}", rec


def _read_file(path: Path, on_error: str, skips: Skips | None, text_field: str) -> Iterator[tuple[str, dict]]:
    fmt, compression = file_format(path)
    if fmt == "jsonl":
        yield from _read_jsonl(path, on_error, skips, compression)
    elif fmt == "json":
        yield from _read_json(path, on_error, skips, compression)
    elif fmt == "parquet":
        yield from _read_parquet(path)
    elif fmt == "txt":
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            reject("invalid UTF-8", str(path), on_error, skips, "invalid UTF-8")
            return
        yield str(path), {"id": path.stem, text_field: text}
    else:
        raise RecordError(f"{path}: unsupported file type; expected .jsonl, .json, .parquet, .txt "
                          "(.jsonl and .json also .gz or .zst compressed) or a folder")


def _open_hub(src: SourceConfig) -> Iterable[dict]:
    """``load_dataset(..., streaming=True)``: nothing is downloaded whole or held in memory."""
    import datasets  # imported when used: it takes a second or two

    try:
        return datasets.load_dataset(src.hf, src.config, split=src.split or "train", revision=src.revision,
                                     data_files=src.data_files, streaming=True)
    except Exception as exc:  # noqa: BLE001 - the datasets library raises many kinds
        raise RecordError(f"{src.label}: `datasets` could not load it ({type(exc).__name__}: {exc})") from exc


def _read_hub(src: SourceConfig, ds: Iterable[dict]) -> Iterator[tuple[str, dict]]:
    """The rows of a streamed dataset, named ``hf:NAME:CONFIG[SPLIT]:row N``."""
    rows = iter(ds)
    row = 0
    while True:
        try:
            rec = next(rows)
        except StopIteration:
            return
        except Exception as exc:  # noqa: BLE001
            raise RecordError(f"{src.label}:row {row + 1}: `datasets` failed reading it "
                              f"({type(exc).__name__}: {exc})") from exc
        row += 1
        yield f"{src.label}:row {row}", dict(rec)


def _read_source(src: SourceConfig, on_error: str, skips: Skips | None, text_field: str) -> Iterator[tuple[str, dict]]:
    if src.hf is not None:
        yield from _read_hub(src, _open_hub(src))
        return
    source = str(src.path)
    if source.startswith("ctrltok:"):
        yield from _read_jsonl(resource_path(source.split(":", 1)[1]), on_error, skips)
        return
    path = Path(source)
    if path.is_dir():
        for child in sorted(path.iterdir()):
            if child.is_file() and file_format(child)[0] is not None:
                yield from _read_file(child, on_error, skips, text_field)
        return
    if path.exists():
        yield from _read_file(path, on_error, skips, text_field)
        return
    if file_format(path)[0] is not None:
        raise RecordError(f"{path}: no such file")
    # A datasets name (needs the network or a local datasets cache).
    name, _, split = source.partition(":")
    hub = SourceConfig(hf=name, split=split or "train")
    try:
        ds = _open_hub(hub)
    except RecordError as exc:
        raise RecordError(f"{source}: not a file, folder or ctrltok resource, and "
                          f"{str(exc).split(': ', 1)[1]}") from exc
    yield from _read_hub(hub, ds)


def mix(streams: Sequence[Iterable[T]], weights: Sequence[float], seed: int) -> Iterator[T]:
    """Interleave ``streams`` at rates proportional to ``weights``, deterministically by ``seed``.

    The ``k``-th item of stream ``i`` is placed at time ``(k + u) / weights[i]``, ``u`` uniform in
    [0, 1) drawn by a generator seeded with ``(seed, i)``; items come out in time order. So an
    item's place is a pure function of the seed, its stream and its index there; over any stretch
    where no stream has run out, stream ``i`` gives ``weights[i] / sum(weights)`` of the items
    (within one item). A stream that runs out leaves the others to go on: every item is read once.
    Streams are read lazily, one pending item each.
    """
    iters = [iter(s) for s in streams]
    rngs = [random.Random(f"ctrltok-mix:{seed}:{i}") for i in range(len(iters))]
    heap: list[tuple[float, int, int, T]] = []

    def push(i: int, k: int) -> None:
        item = next(iters[i], _END)
        if item is not _END:
            heapq.heappush(heap, ((k + rngs[i].random()) / weights[i], i, k, item))

    for i in range(len(iters)):
        push(i, 0)
    while heap:
        _, i, k, item = heapq.heappop(heap)
        yield item
        push(i, k + 1)


def read_records(source: str | Path | SourceConfig | dict | list, on_error: str = "raise",
                 skips: Skips | None = None, text_field: str = "text", seed: int = 0) -> Iterator[tuple[str, dict]]:
    """Yield ``(where, record)`` from any source in the module docstring, lazily.

    ``source``: a path string (or :class:`~pathlib.Path`), a mapping / :class:`SourceConfig` (``path``
    or ``hf`` with its options), or a list of them mixed by :func:`mix` with their ``weight`` and
    ``seed``. Records that are not JSON objects, malformed JSON lines, invalid UTF-8 and strings with
    a lone UTF-16 surrogate escape are rejected by ``on_error`` (an error naming file and line, or a
    counted skip).
    """
    specs = source if isinstance(source, list) else [source]
    srcs = [source_config(str(s) if isinstance(s, Path) else s, f"source[{i}]" if isinstance(source, list) else
                          "source") for i, s in enumerate(specs)]
    streams = [_read_source(s, on_error, skips, text_field) for s in srcs]
    if len(streams) == 1:
        yield from streams[0]
    else:
        yield from mix(streams, [s.weight for s in srcs], seed)


def read_sources(data: DataConfig, seed: int, skips: Skips | None = None,
                 which: str = "train") -> Iterator[tuple[str, dict]]:
    """The records of a recipe's ``data.train`` (or ``data.eval``), mixed by ``seed`` when it lists
    several sources, with ``data.on_error`` and ``data.text_field``: what the data layer reads."""
    return read_records(data.sources(which), data.on_error, skips, data.text_field, seed)
