"""Prepared data on disk: encoded documents as memory-mapped Arrow shards, and their manifest.

``ctrltok prepare`` (:mod:`ctrltok.data.prepare`) writes, and training reads, a folder::

    DIR/ctrltok-data.json           the manifest (written last): format, tokenizer fingerprint, data
                                    hash, documents / tokens / supervised tokens per split, skips by
                                    reason with their first places, the recipe sections it encodes
    DIR/parts/run.json              the stage runner's settings (ctrltok.core.stages)
    DIR/parts/shard-000000.train.arrow   documents of inputs [0, shard_size) for training
    DIR/parts/shard-000000.eval.arrow    the held-out documents of the same inputs
    DIR/parts/shard-000000.done     the shard's commit marker (counts, drops, file sizes)

One Arrow row is one :class:`~ctrltok.core.example.Example`. Columns (Arrow IPC stream files,
the format of Hugging Face ``datasets``' own cache files, opened with ``datasets.Dataset.from_file``
as memory maps, so a reader holds pages, not the corpus)::

    input_ids      list<uint16>  (uint32 when the vocabulary does not fit 16 bits)
    supervised     list<bool>    labels[i] = input_ids[i] where set, -100 elsewhere (bit-packed)
    position_ids   list<int32>   null unless aliased (EPE)
    loss_weights   list<float32> null unless weighted (EPE)
    blocked        list<list<int32>>  attention holes (q0, q1, k0, k1); null when none
    head_positions list<int32>, head_targets list<list<float32>>  null when none
    source         string        "file.jsonl:12"
    length         int32         tokens (what row plans read without touching the lists)

Why Arrow through ``datasets`` and not a hand-rolled ``.bin/.idx``: it is already a dependency,
it memory-maps, it stores the ragged EPE columns as they are, and the files open in any Arrow
tool. bench/README.md has it measured against litdata on the same corpus.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa

from ctrltok.core.example import IGNORE, Example
from ctrltok.core.inputs import PREPARED_MANIFEST as MANIFEST
from ctrltok.core.stages import TMP, Outcome, atomic_write

FORMAT = 1
PARTS = "parts"
SPLITS = ("train", "eval")
BATCH_ROWS = 1024  # documents per Arrow record batch


class PreparedDataError(ValueError):
    """A prepared folder that is missing, unfinished, or made for another tokenizer or recipe."""


def schema(id_type: pa.DataType) -> pa.Schema:
    return pa.schema([
        ("input_ids", pa.list_(id_type)),
        ("supervised", pa.list_(pa.bool_())),
        ("position_ids", pa.list_(pa.int32())),
        ("loss_weights", pa.list_(pa.float32())),
        ("blocked", pa.list_(pa.list_(pa.int32()))),
        ("head_positions", pa.list_(pa.int32())),
        ("head_targets", pa.list_(pa.list_(pa.float32()))),
        ("source", pa.string()),
        ("length", pa.int32()),
    ])


def id_type(vocab_size: int) -> pa.DataType:
    """uint16 while every id fits (2 bytes a token), else uint32."""
    return pa.uint16() if vocab_size <= 1 << 16 else pa.uint32()


def to_row(ex: Example) -> dict[str, Any]:
    """An Example as one Arrow row. Labels must be the ids or -100 (the Example convention), so a
    bit mask holds them; anything else is a bug in an encoder and fails loudly here."""
    supervised = [lab != IGNORE for lab in ex.labels]
    if any(s and lab != t for s, lab, t in zip(supervised, ex.labels, ex.input_ids)):
        raise ValueError(f"{ex.source}: a label differs from its input id; the store keeps labels as a mask")
    default_positions = ex.position_ids is None or ex.position_ids == list(range(len(ex)))
    return {
        "input_ids": ex.input_ids,
        "supervised": supervised,
        "position_ids": None if default_positions else ex.position_ids,
        "loss_weights": ex.loss_weights,
        "blocked": [list(b) for b in ex.blocked] or None,
        "head_positions": ex.head_positions or None,
        "head_targets": ex.head_targets or None,
        "source": ex.source,
        "length": len(ex),
    }


def from_row(row: dict[str, Any]) -> Example:
    ids = list(row["input_ids"])
    return Example(
        input_ids=ids,
        labels=[t if s else IGNORE for t, s in zip(ids, row["supervised"])],
        position_ids=None if row["position_ids"] is None else list(row["position_ids"]),
        blocked=[tuple(b) for b in row["blocked"] or []],
        loss_weights=None if row["loss_weights"] is None else list(row["loss_weights"]),
        head_positions=list(row["head_positions"] or []),
        head_targets=[list(t) for t in row["head_targets"] or []],
        source=row["source"],
    )


class ArrowShardSink:
    """A stage-runner sink (:class:`ctrltok.core.stages.Sink`) writing one shard as two Arrow
    stream files, ``<base>.train.arrow`` and ``<base>.eval.arrow``. A kept outcome's record is
    ``(split, [Example, ...])``: one input (an OASST tree) may give several documents."""

    def __init__(self, base: Path, ids: pa.DataType) -> None:
        self.schema = schema(ids)
        self.paths = {s: Path(f"{base}.{s}.arrow{TMP}") for s in SPLITS}
        self.rows: dict[str, list[dict]] = {s: [] for s in SPLITS}
        self.writers = {s: pa.ipc.new_stream(str(p), self.schema) for s, p in self.paths.items()}

    def write(self, outcome: Outcome) -> None:
        if outcome.drop is not None or outcome.record is None:
            return
        split, examples = outcome.record
        self.rows[split].extend(to_row(ex) for ex in examples)
        if len(self.rows[split]) >= BATCH_ROWS:
            self._flush(split)

    def _flush(self, split: str) -> None:
        if self.rows[split]:
            self.writers[split].write_batch(pa.RecordBatch.from_pylist(self.rows[split], schema=self.schema))
            self.rows[split] = []

    def close(self) -> list[Path]:
        for split, writer in self.writers.items():
            self._flush(split)
            writer.close()
        return list(self.paths.values())

    def abort(self) -> None:
        for writer in self.writers.values():
            writer.close()


def fingerprint(value: Any) -> str:
    """A short stable hash of JSON-able values (the data section, a tokenizer's vocabulary)."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """The tokenizer as it encodes: its full backend (vocabulary, merges, added tokens) hashed."""
    return fingerprint(tokenizer.backend_tokenizer.to_str())


@dataclass
class Split:
    """One split of a prepared folder, memory-mapped: documents by index, lengths as a column."""

    dataset: datasets.Dataset | None
    offsets: list[int] = field(default_factory=list)  # first document index of each file

    def __len__(self) -> int:
        return 0 if self.dataset is None else len(self.dataset)

    def lengths(self) -> Iterable[int]:
        """Document lengths in order, streamed batch by batch (never the whole column at once)."""
        if self.dataset is None:
            return
        for batch in self.dataset.data.to_batches(max_chunksize=1 << 16):
            yield from batch.column("length").to_pylist()

    def documents(self, indices: Sequence[int]) -> list[Example]:
        if not indices:
            return []
        rows = self.dataset.data.fast_gather(list(indices)) if len(indices) > 1 else \
            self.dataset.data.fast_slice(indices[0], 1)
        return [from_row(r) for r in rows.to_pylist()]

    def __iter__(self):
        for batch in self.dataset.data.to_batches(max_chunksize=BATCH_ROWS) if self.dataset is not None else ():
            for r in batch.to_pylist():
                yield from_row(r)


def _open_split(files: list[Path]) -> Split:
    parts = [datasets.Dataset.from_file(str(f)) for f in files if f.stat().st_size > 0]
    parts = [p for p in parts if len(p)]
    if not parts:
        return Split(None)
    offsets = [0]
    for p in parts[:-1]:
        offsets.append(offsets[-1] + len(p))
    return Split(datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0], offsets)


@dataclass
class PreparedData:
    """A finished prepared folder: its manifest and its two splits, memory-mapped."""

    path: Path
    manifest: dict[str, Any]
    train: Split
    eval: Split

    @classmethod
    def open(cls, path: str | os.PathLike, tokenizer: Any | None = None) -> PreparedData:
        """Open ``path`` (written by ``ctrltok prepare``); with ``tokenizer``, refuse data encoded by
        another tokenizer (ids would mean other tokens)."""
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise PreparedDataError(f"{path}: not a prepared data folder (no {MANIFEST}); run `ctrltok prepare "
                                    f"RECIPE.yaml --out {path}` or let `ctrltok train` prepare it")
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT:
            raise PreparedDataError(f"{manifest_path}: format {manifest.get('format')!r}, this ctrltok reads {FORMAT}; "
                                    "prepare the data again")
        if tokenizer is not None and manifest.get("tokenizer") != tokenizer_fingerprint(tokenizer):
            raise PreparedDataError(
                f"{manifest_path}: prepared with another tokenizer (fingerprint {manifest.get('tokenizer')}, the "
                f"run's is {tokenizer_fingerprint(tokenizer)}); prepare it again with this recipe's model and tokens")
        parts = path / PARTS
        files = {s: [parts / name for name in manifest["files"][s]] for s in SPLITS}
        return cls(path, manifest, _open_split(files["train"]), _open_split(files["eval"]))


def shard_files(parts: Path, n_shards: int, split: str) -> list[str]:
    return [f"shard-{k:06d}.{split}.arrow" for k in range(n_shards) if (parts / f"shard-{k:06d}.{split}.arrow").exists()]


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    atomic_write(path / MANIFEST, json.dumps({"format": FORMAT, **manifest}, indent=1, ensure_ascii=False,
                                             default=str))
