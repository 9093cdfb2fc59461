"""The unit every encoder produces and the packer consumes.

An :class:`Example` is one document (a chat, a labelled text, a document with an inserted
reflection) already turned into token ids. Encoders (``core.chat.ChatEncoder``,
``conditional.encode.encode_labelled``, ``epe.reflection.insert_reflection``, plain text in
``data.documents``) build Examples; ``packing`` places them into rows and ``collate`` turns rows
into tensors. Nothing downstream re-tokenises.

Conventions, fixed here once:

* ``labels`` are aligned with ``input_ids`` (Hugging Face style): ``labels[i] == input_ids[i]``
  where token ``i`` is supervised, ``-100`` where it is not. The shift (predict token ``i+1`` from
  position ``i``) happens exactly once, in ``packing.collate``, which also knows where documents
  end, so no document is ever trained to predict the next document's first token.
* ``position_ids`` default to ``0..n-1``. EPE's position aliasing gives post-reflection tokens
  the positions they would have without the reflection, so positions may repeat.
* ``blocked`` lists attention holes *inside* the example as ``(q_start, q_end, k_start, k_end)``
  half-open ranges of token indices: queries in ``[q_start, q_end)`` must not see keys in
  ``[k_start, k_end)``. Everything else is causal within the example; examples never see each
  other.
* ``loss_weights`` (optional) scale each supervised token's cross-entropy (EPE weighs reflection
  and context tokens separately). ``None`` means 1.0 everywhere.
* ``head_positions`` / ``head_targets`` carry auxiliary head supervision: the hidden state at
  token index ``head_positions[k]`` is trained against the multi-hot vector ``head_targets[k]``
  (EPE's constitution head at the ``<assistant>`` token).
"""

from __future__ import annotations

from dataclasses import dataclass, field

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] | None = None
    blocked: list[tuple[int, int, int, int]] = field(default_factory=list)
    loss_weights: list[float] | None = None
    head_positions: list[int] = field(default_factory=list)
    head_targets: list[list[float]] = field(default_factory=list)
    source: str = ""  # where it came from ("file.jsonl:12"), for error messages and reports

    def __post_init__(self) -> None:
        n = len(self.input_ids)
        if len(self.labels) != n:
            raise ValueError(f"{self.source or 'example'}: {len(self.labels)} labels for {n} input ids")
        if self.position_ids is not None and len(self.position_ids) != n:
            raise ValueError(f"{self.source or 'example'}: {len(self.position_ids)} position ids for {n} input ids")
        if self.loss_weights is not None and len(self.loss_weights) != n:
            raise ValueError(f"{self.source or 'example'}: {len(self.loss_weights)} loss weights for {n} input ids")
        if len(self.head_positions) != len(self.head_targets):
            raise ValueError(f"{self.source or 'example'}: head positions and targets differ in number")

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def positions(self) -> list[int]:
        return list(range(len(self.input_ids))) if self.position_ids is None else self.position_ids

    @property
    def n_supervised(self) -> int:
        """Tokens that are predicted (after the shift: the first token is never a target)."""
        return sum(1 for lab in self.labels[1:] if lab != IGNORE)
