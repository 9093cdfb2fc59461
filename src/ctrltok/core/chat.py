"""Conversations -> token ids and labels, injection-safe: the one place labels are built for chats.

How it works. A template is rendered once per *shape* of conversation (the sequence of roles) with
placeholder contents; the text between placeholders is the template's markup. Markup is split on
the tokenizer's special tokens, which become control ids; message contents are spliced in as
plain text and encoded with special-token parsing switched off, so a user who types
``<assistant>`` or ``<|im_end|>`` gets ordinary text tokens, never a control id (transformers issue
29279). Text that touches across a markup/content boundary is encoded as one run, exactly as the
tokenizer does for a rendered string, so for contents without special-token spellings the ids equal
``tokenizer.apply_chat_template(messages, tokenize=True)`` (tested for every shipped template).

Labels: the tokens of supervised messages (by default every assistant message) plus the
template's end-of-turn token that closes each of them; everything else is ``-100``::

    <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello!<|im_end|>\\n
    ............................................  ######  ##########   .
    (#: supervised, .: -100)

    ex = encode_chat(messages, tokenizer, "default")
    print(show(ex, tokenizer))   # supervised tokens highlighted in the terminal
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from tokenizers import Tokenizer

from ctrltok.core.example import IGNORE, Example
from ctrltok.core.templates import Template, get_template

ROLES = ("system", "user", "assistant")
LOSS_ON = ("assistant", "all", "last")
# Spaces and a letter around the number: a template that trims, re-cases or rewrites content
# breaks the placeholder and is refused, instead of silently mislabelling.
_SENTINEL = " \ue000c{}\ue001 "
_SENTINEL_RE = re.compile(" \ue000c(\\d+)\ue001 ")


class ChatError(ValueError):
    """A conversation that cannot be encoded. The message is ``"{where}: {reason}; {detail}"``;
    ``reason`` alone is what ``data.on_error: skip`` counts the record under (no place, no index)."""

    def __init__(self, where: str | None, reason: str, detail: str = ""):
        self.where, self.reason, self.detail = where, reason, detail
        text = f"{where}: {reason}" if where else reason
        super().__init__(f"{text}; {detail}" if detail else text)

    def __reduce__(self):  # crosses process pools whole (the default would pass only the message)
        return type(self), (self.where, self.reason, self.detail)


def validate_messages(messages, where: str = "conversation") -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ChatError(where, "`messages` must be a non-empty list", f"found {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatError(where, "a message is not an object", f"messages[{i}] must be an object with `role` and `content`")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ChatError(where, "unknown role", f"messages[{i}].role = {role!r}; expected one of {list(ROLES)}")
        if not isinstance(content, str):
            raise ChatError(where, "a message's content is not text",
                            f"messages[{i}].content must be a string, found {type(content).__name__}")
    return messages


@dataclass
class _Shape:
    """A template rendered for one sequence of roles: markup pieces around each message's content."""

    markup: list[list[int | str]]  # markup[i] precedes content i (markup[-1] follows the last): ids and text
    closers: list[int]  # per message: how many leading items of the following markup close the turn


class ChatEncoder:
    """Encodes conversations under one template; caches rendered shapes, batch-encodes the text."""

    def __init__(self, tokenizer, template: str | Template = "default", loss_on: str = "assistant"):
        if loss_on not in LOSS_ON:
            raise ValueError(f"loss_on = {loss_on!r}; expected one of {list(LOSS_ON)}")
        self.tokenizer = tokenizer
        self.template = template if isinstance(template, Template) else get_template(template, tokenizer)
        self.loss_on = loss_on
        self.eot_id = self.template.end_of_turn_id(tokenizer)
        backend: Tokenizer = tokenizer.backend_tokenizer
        self._plain = Tokenizer.from_str(backend.to_str())
        self._plain.encode_special_tokens = True  # contents: spell special tokens as text
        self._plain.no_truncation()
        self._plain.no_padding()
        specials = sorted((t.content for t in tokenizer.added_tokens_decoder.values() if t.special), key=len, reverse=True)
        self._special_ids = {s: tokenizer.convert_tokens_to_ids(s) for s in specials}
        self._special_re = re.compile("|".join(re.escape(s) for s in specials)) if specials else None
        self._shapes: dict[tuple, _Shape] = {}
        self._role_marked: bool | None = None

    # -- checks ----------------------------------------------------------------------------
    @property
    def role_marked(self) -> bool:
        """Whether the template writes who speaks (``eot`` does not: utterances alternate, each closed
        by ``<EOT>``, and a turn's role is only its place)."""
        if self._role_marked is None:
            try:
                self._role_marked = self._render(("user",), False, 0) != self._render(("assistant",), False, 0)
            except Exception:  # noqa: BLE001 - a template that refuses a lone turn enforces its own order
                self._role_marked = True
        return self._role_marked

    def check_turns(self, messages: list[dict], where: str = "conversation") -> None:
        """Under a template without role markers, turns must alternate user, assistant, ... (after an
        optional leading system message): an assistant-first conversation, two turns of one role in a
        row or a system message later on would be learned with the roles swapped. A
        :class:`ChatError` naming the place."""
        if self.role_marked:
            return
        start = 1 if messages and messages[0]["role"] == "system" else 0
        for j in range(start, len(messages)):
            role, expected = messages[j]["role"], ("user", "assistant")[(j - start) % 2]
            if role == "system":
                raise ChatError(where, f"a system message after the first turn (template {self.template.name!r} has no "
                                "role markers)", f"messages[{j}] would be read as a {expected} turn: move it to the start "
                                "or drop it")
            if role != expected:
                raise ChatError(where, f"turns do not alternate user, assistant (template {self.template.name!r} has no "
                                "role markers)", f"messages[{j}] is {role!r} where a {expected} turn belongs, so the roles "
                                "would be learned swapped: start with a user turn and alternate")

    # -- rendering -------------------------------------------------------------------------
    def _render(self, roles: tuple[str, ...], gen: bool, base: int) -> str:
        msgs = [{"role": r, "content": _SENTINEL.format(base + i)} for i, r in enumerate(roles)]
        return self.tokenizer.apply_chat_template(msgs, chat_template=self.template.source, tokenize=False,
                                                  add_generation_prompt=gen)

    def _split_markup(self, text: str) -> list[int | str]:
        items: list[int | str] = []
        pos = 0
        for m in self._special_re.finditer(text) if self._special_re else ():
            if m.start() > pos:
                items.append(text[pos:m.start()])
            items.append(self._special_ids[m.group()])
            pos = m.end()
        if pos < len(text):
            items.append(text[pos:])
        return items

    def _shape(self, roles: tuple[str, ...], gen: bool) -> _Shape:
        key = (roles, gen)
        if key in self._shapes:
            return self._shapes[key]
        rendered = self._render(roles, gen, 0)
        pieces = _SENTINEL_RE.split(rendered)
        order = [int(x) for x in pieces[1::2]]
        if order != list(range(len(roles))):
            raise ChatError(None, f"template {self.template.name!r} does not insert each message's content exactly "
                            "once, in order", "ctrltok needs templates that write contents verbatim")
        other = _SENTINEL_RE.split(self._render(roles, gen, 1000))
        if pieces[0::2] != other[0::2]:
            raise ChatError(None, f"template {self.template.name!r} writes markup that depends on message contents",
                            "ctrltok needs the markup to depend only on the roles")
        markup = [self._split_markup(p) for p in pieces[0::2]]
        closers = []
        for follow in markup[1:]:
            # The turn closer: the markup up to and including the first end-of-turn token.
            k = next((j + 1 for j, it in enumerate(follow) if it == self.eot_id), 0)
            closers.append(k)
        shape = _Shape(markup, closers)
        self._shapes[key] = shape
        return shape

    # -- encoding --------------------------------------------------------------------------
    def _supervised(self, roles: tuple[str, ...]) -> set[int]:
        if self.loss_on == "all":
            return set(range(len(roles)))
        assistant = [i for i, r in enumerate(roles) if r == "assistant"]
        if self.loss_on == "last":
            return set(assistant[-1:])
        return set(assistant)

    def _plan(self, messages: list[dict], gen: bool):
        """Items of one conversation: control ids and text runs, with the supervised char spans."""
        roles = tuple(m["role"] for m in messages)
        shape = self._shape(roles, gen)
        sup = set() if gen else self._supervised(roles)
        items: list = []  # int id, or [text, spans] where spans are (start, end) supervised chars
        run: list | None = None

        def add(item, supervised: bool) -> None:
            nonlocal run
            if isinstance(item, int):
                items.append((item, supervised))
                run = None
                return
            if run is None:
                run = ["", []]
                items.append(run)
            start = len(run[0])
            run[0] += item
            if supervised and item:
                run[1].append((start, len(run[0])))

        for i, msg in enumerate(messages):
            closing = shape.closers[i - 1] if i > 0 and (i - 1) in sup else 0
            for j, it in enumerate(shape.markup[i]):
                add(it, j < closing)
            add(msg["content"], i in sup)
        last = shape.markup[-1]
        closing = shape.closers[-1] if (len(messages) - 1) in sup else 0
        for j, it in enumerate(last):
            add(it, j < closing)
        return items

    def encode_many(self, conversations: list[list[dict]], sources: list[str] | None = None,
                    add_generation_prompt: bool = False) -> list[Example]:
        sources = sources or [f"conversation {i}" for i in range(len(conversations))]
        plans = []
        texts: list[str] = []
        for msgs, src in zip(conversations, sources):
            validate_messages(msgs, src)
            self.check_turns(msgs, src)
            plan = self._plan(msgs, add_generation_prompt)
            plans.append(plan)
            texts.extend(it[0] for it in plan if isinstance(it, list))
        encodings = iter(self._plain.encode_batch(texts, add_special_tokens=False)) if texts else iter(())
        out = []
        for plan, src in zip(plans, sources):
            ids: list[int] = []
            labels: list[int] = []
            for it in plan:
                if isinstance(it, tuple):
                    ids.append(it[0])
                    labels.append(it[0] if it[1] else IGNORE)
                    continue
                enc = next(encodings)
                spans = it[1]
                run_ids = enc.ids
                ids.extend(run_ids)
                if not spans:  # markup and unsupervised turns: the common case, no per-token work
                    labels.extend([IGNORE] * len(run_ids))
                elif len(spans) == 1:
                    a, b = spans[0]
                    labels.extend([t if s < b and e > a else IGNORE for t, (s, e) in zip(run_ids, enc.offsets)])
                else:
                    labels.extend([t if any(s < b and e > a for a, b in spans) else IGNORE
                                   for t, (s, e) in zip(run_ids, enc.offsets)])
            out.append(Example(ids, labels, source=src))
        return out

    def encode(self, messages: list[dict], source: str = "conversation") -> Example:
        return self.encode_many([messages], [source])[0]

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Ids of a conversation followed by the template's generation prompt (for inference)."""
        return self.encode_many([messages], add_generation_prompt=True)[0].input_ids


@lru_cache(maxsize=32)
def _encoder(tokenizer_id: int, tokenizer, template: str, loss_on: str) -> ChatEncoder:
    return ChatEncoder(tokenizer, template, loss_on)


def get_encoder(tokenizer, template: str = "default", loss_on: str = "assistant") -> ChatEncoder:
    return _encoder(id(tokenizer), tokenizer, template, loss_on)


def encode_chat(messages: list[dict], tokenizer, template: str = "default", loss_on: str = "assistant",
                source: str = "conversation") -> Example:
    """One conversation -> Example(input_ids, labels). See the module docstring for the rules."""
    return get_encoder(tokenizer, template, loss_on).encode(messages, source)


def render_prompt(messages: list[dict], tokenizer, template: str = "default") -> list[int]:
    """Injection-safe prompt ids for generation (the conversation plus the generation prompt)."""
    return get_encoder(tokenizer, template).prompt_ids(messages)


def show(example: Example, tokenizer, color: bool = True) -> str:
    """The example's tokens as text, supervised ones highlighted (rich markup) or bracketed."""
    from rich.markup import escape

    parts = []
    for tid, lab in zip(example.input_ids, example.labels):
        piece = tokenizer.decode([tid])
        if color:
            piece = escape(piece).replace("\n", "\\n\n")
            parts.append(f"[black on green]{piece}[/]" if lab != IGNORE else f"[dim]{piece}[/]")
        else:
            piece = piece.replace("\n", "\\n\n")
            parts.append(f"[{piece}]" if lab != IGNORE else piece)
    return "".join(parts)
