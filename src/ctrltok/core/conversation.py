"""One record -> one conversation: the only place that knows the chat layouts users bring.

Every command that reads chats (``render``, ``train``, ``generate``, ``eval``, ``constitution``,
backtranslation's gold set) calls :func:`to_conversation`, so a file one command accepts, every
command accepts. Layouts, tried in this order:

====================================  =====================================================
record                                conversation
====================================  =====================================================
``messages``: [{role, content}, ...]  as is (OpenAI / HF chat layout)
``conversations``: [str, str, ...]    LIMA: utterances alternating user, assistant
``conversations``: [{from, value}]    ShareGPT: ``human``/``user`` -> user, ``gpt``/``assistant``
                                      -> assistant, ``system`` -> system
``instruction`` [+ ``input``] +       Alpaca: one user turn (instruction, blank line, input),
``output`` or ``response``            one assistant turn; earlier turns from ``history``
                                      ([[user, assistant], ...], LLaMA-Factory's LIMA)
``prompt`` + ``response``             one user turn, one assistant turn
``prompt`` alone (``prompt_only``)    one user turn (``system`` prepended if given): what
                                      ``generate`` replies to
``prompt``: {text, role, replies}     an OASST message tree (``*.trees.jsonl`` export):
                                      its best-ranked thread (``prompt_only``: the root prompt)
====================================  =====================================================

The result is checked by :func:`ctrltok.core.chat.validate_messages`; a record that fits no
layout raises :class:`~ctrltok.core.chat.ChatError` naming the place and the fields found.

OASST trees: every message has ``role`` (``prompter`` -> user, ``assistant``), ``text`` and
``replies``; assistant replies carry the ranking ``rank`` (0 = best). Messages ``deleted`` or with
``review_result: false`` are left out with their replies. The *best* thread starts at the root and
follows, at each step, the reply with the lowest ``rank`` (unranked replies, such as the prompter's,
after ranked ones, answered before unanswered, then in file order); *all* threads are every root-to-leaf thread. A thread is cut after its last
assistant message (a trailing prompter turn has no reply to learn) and identical threads are kept
once. :func:`to_conversations` gives one conversation per thread.
"""

from __future__ import annotations

from typing import Any

from ctrltok.core.chat import ChatError, validate_messages

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "system": "system"}


def _sharegpt(turns: list[dict], where: str) -> list[dict]:
    out = []
    for i, t in enumerate(turns):
        role = SHAREGPT_ROLES.get(str(t.get("from", "")).lower())
        if role is None:
            raise ChatError(where, "unknown role", f"conversations[{i}].from = {t.get('from')!r}; expected one of "
                            f"{sorted(SHAREGPT_ROLES)}")
        out.append({"role": role, "content": t.get("value")})
    return out


OASST_ROLES = {"prompter": "user", "assistant": "assistant"}
PATHS = ("best", "all")


def is_message_tree(record: Any) -> bool:
    """An OASST message tree: ``prompt`` is the root message (an object with its ``replies``)."""
    return isinstance(record, dict) and isinstance(record.get("prompt"), dict) and (
        "replies" in record["prompt"] or "role" in record["prompt"])


def _message(msg: Any, field: str, where: str) -> dict:
    """One tree message -> ``{role, content}``, checked; ``field`` names it (``prompt.replies[1]``)."""
    if not isinstance(msg, dict):
        raise ChatError(where, "a tree message is not an object", f"{field} is {type(msg).__name__}")
    role = OASST_ROLES.get(msg["role"]) if isinstance(msg.get("role"), str) else None
    if role is None:
        raise ChatError(where, "unknown role", f"{field}.role = {msg.get('role')!r}; expected one of {list(OASST_ROLES)}")
    if not isinstance(msg.get("text"), str):
        raise ChatError(where, "a tree message's text is not text",
                        f"{field}.text must be a string, found {type(msg.get('text')).__name__}")
    if not isinstance(msg.get("replies", []), list):
        raise ChatError(where, "a tree message's replies are not a list", f"{field}.replies")
    return {"role": role, "content": msg["text"]}


def _usable(msg: Any) -> bool:
    return not (isinstance(msg, dict) and (msg.get("deleted") is True or msg.get("review_result") is False))


def _replies(msg: dict, field: str) -> list[tuple[str, Any]]:
    return [(f"{field}.replies[{i}]", r) for i, r in enumerate(msg.get("replies") or []) if _usable(r)]


def _rank_key(item: tuple[int, tuple[str, Any]]) -> tuple[int, float, int, int]:
    i, (_, msg) = item
    rank = msg.get("rank") if isinstance(msg, dict) else None
    ranked = isinstance(rank, (int, float)) and not isinstance(rank, bool)
    answered = isinstance(msg, dict) and any(_usable(r) for r in msg.get("replies") or [])
    return (0, float(rank), 0, i) if ranked else (1, 0.0, 0 if answered else 1, i)


def _cut(thread: list[dict]) -> list[dict]:
    """The thread up to its last assistant message (empty when it has none)."""
    last = max((i for i, m in enumerate(thread) if m["role"] == "assistant"), default=-1)
    return thread[: last + 1]


def tree_threads(record: dict, where: str, paths: str = "best") -> list[list[dict]]:
    """The threads of an OASST message tree as conversations: ``best`` (one) or ``all``; see the
    module docstring. A tree with no assistant reply (after review) raises :class:`ChatError`."""
    if paths not in PATHS:
        raise ValueError(f"paths = {paths!r}; expected one of {list(PATHS)}")
    root = record["prompt"]
    if not _usable(root):
        raise ChatError(where, "the tree's prompt is deleted or failed review")
    threads: list[list[dict]] = []
    if paths == "best":
        field, msg, thread = "prompt", root, []
        while True:
            thread.append(_message(msg, field, where))
            replies = _replies(msg, field)
            if not replies:
                break
            field, msg = min(enumerate(replies), key=_rank_key)[1]
        threads.append(_cut(thread))
    else:
        stack: list[tuple[str, Any, list[dict]]] = [("prompt", root, [])]
        while stack:  # depth first, replies in file order
            field, msg, above = stack.pop()
            thread = above + [_message(msg, field, where)]
            replies = _replies(msg, field)
            if not replies:
                threads.append(_cut(thread))
            stack.extend((f, r, thread) for f, r in reversed(replies))
    seen: set[tuple] = set()
    out = []
    for t in threads:
        key = tuple((m["role"], m["content"]) for m in t)
        if t and key not in seen:
            seen.add(key)
            out.append(check_replies(validate_messages(t, where), where))
    if not out:
        raise ChatError(where, "message tree has no assistant reply (after leaving out deleted or "
                        "failed-review messages)")
    return out


def to_conversations(record: dict[str, Any], where: str, paths: str = "best",
                     prompt_only: bool = False) -> list[list[dict]]:
    """The conversations in ``record``: every thread of an OASST message tree (``paths="all"``) or its
    best-ranked one (``"best"``, the default); one conversation for every other layout, as
    :func:`to_conversation` reads it."""
    if is_message_tree(record) and not prompt_only:
        return tree_threads(record, where, paths)
    return [to_conversation(record, where, prompt_only)]


def check_replies(messages: list[dict], where: str) -> list[dict]:
    """Refuse an empty assistant turn in a training conversation: it teaches the model to end its
    turn at once (a :class:`ChatError`)."""
    for i, m in enumerate(messages):
        if m.get("role") == "assistant" and isinstance(m.get("content"), str) and not m["content"].strip():
            raise ChatError(where, "an empty assistant turn", f"messages[{i}] has no text, which would teach the "
                            "model to end its turn at once: fill it or drop the record (data.on_error: skip counts "
                            "such records)")
    return messages


def _history(pairs: Any, where: str) -> list[dict]:
    """Alpaca ``history``: ``[[user, assistant], ...]`` earlier turns -> messages."""
    if not isinstance(pairs, list):
        raise ChatError(where, "`history` must be a list of [user, assistant] pairs")
    out = []
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise ChatError(where, "`history` must be a list of [user, assistant] pairs",
                            f"history[{i}] is {pair!r:.60}")
        out += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return out


def to_conversation(record: dict[str, Any], where: str, prompt_only: bool = False) -> list[dict]:
    """The conversation in ``record`` (any layout in the module docstring), validated.

    ``prompt_only``: a record with a ``prompt`` and no reply is one user turn (for generation);
    otherwise a training record needs a reply. An OASST message tree gives its best-ranked thread
    (with ``prompt_only``: its root prompt as one user turn).
    """
    if not isinstance(record, dict):
        raise ChatError(where, "expected a JSON object", f"found {type(record).__name__}")
    if is_message_tree(record):
        if prompt_only:
            return validate_messages([_message(record["prompt"], "prompt", where)], where)
        return tree_threads(record, where, "best")[0]
    if "messages" in record:
        msgs = record["messages"]
    elif isinstance(record.get("conversations"), list):
        turns = record["conversations"]
        if all(isinstance(c, str) for c in turns):
            msgs = [{"role": ("user", "assistant")[i % 2], "content": c} for i, c in enumerate(turns)]
        elif all(isinstance(c, dict) and "from" in c for c in turns):
            msgs = _sharegpt(turns, where)
        else:
            raise ChatError(where, "`conversations` must be strings (LIMA) or {from, value} objects (ShareGPT)")
    elif "instruction" in record and ("output" in record or "response" in record):
        # Checked, not str()-ed: a null or a list would become the user's text "None" / "['...']".
        for key in ("instruction", "input"):
            value = record.get(key)
            if not isinstance(value, str) and not (key == "input" and value is None):
                raise ChatError(where, f"`{key}` must be a string", f"found {type(value).__name__}")
        prompt = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        msgs = _history(record.get("history") or [], where) + [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": record.get("output", record.get("response"))}]
    elif "prompt" in record and "response" in record:
        msgs = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
    elif prompt_only and isinstance(record.get("prompt"), str):
        msgs = [{"role": "user", "content": record["prompt"]}]
        if isinstance(record.get("system"), str):
            msgs.insert(0, {"role": "system", "content": record["system"]})
    else:
        wanted = "messages, conversations, instruction/output, prompt/response, an OASST tree" + (
            ", prompt" if prompt_only else "")
        hint = ("; this is one OASST message, not a tree: use the *.trees.jsonl export"
                if {"message_id", "parent_id", "role", "text"} <= set(record) else "")
        raise ChatError(where, f"no conversation found (expected one of: {wanted})",
                        f"found fields {sorted(record)}{hint}")
    validate_messages(msgs, where)
    return msgs if prompt_only else check_replies(msgs, where)
