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
``output`` or ``response``            one assistant turn
``prompt`` + ``response``             one user turn, one assistant turn
``prompt`` alone (``prompt_only``)    one user turn (``system`` prepended if given): what
                                      ``generate`` replies to
====================================  =====================================================

The result is checked by :func:`ctrltok.core.chat.validate_messages`; a record that fits no
layout raises :class:`~ctrltok.core.chat.ChatError` naming the place and the fields found.
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
            raise ChatError(f"{where}: conversations[{i}].from = {t.get('from')!r}; expected one of "
                            f"{sorted(SHAREGPT_ROLES)}")
        out.append({"role": role, "content": t.get("value")})
    return out


def to_conversation(record: dict[str, Any], where: str, prompt_only: bool = False) -> list[dict]:
    """The conversation in ``record`` (any layout in the module docstring), validated.

    ``prompt_only``: a record with a ``prompt`` and no reply is one user turn (for generation);
    otherwise a training record needs a reply.
    """
    if not isinstance(record, dict):
        raise ChatError(f"{where}: expected a JSON object, found {type(record).__name__}")
    if "messages" in record:
        msgs = record["messages"]
    elif isinstance(record.get("conversations"), list):
        turns = record["conversations"]
        if all(isinstance(c, str) for c in turns):
            msgs = [{"role": ("user", "assistant")[i % 2], "content": c} for i, c in enumerate(turns)]
        elif all(isinstance(c, dict) and "from" in c for c in turns):
            msgs = _sharegpt(turns, where)
        else:
            raise ChatError(f"{where}: `conversations` must be strings (LIMA) or {{from, value}} objects (ShareGPT)")
    elif "instruction" in record and ("output" in record or "response" in record):
        prompt = str(record["instruction"]) + (f"\n\n{record['input']}" if record.get("input") else "")
        msgs = [{"role": "user", "content": prompt},
                {"role": "assistant", "content": record.get("output", record.get("response"))}]
    elif "prompt" in record and "response" in record:
        msgs = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
    elif prompt_only and isinstance(record.get("prompt"), str):
        msgs = [{"role": "user", "content": record["prompt"]}]
        if isinstance(record.get("system"), str):
            msgs.insert(0, {"role": "system", "content": record["system"]})
    else:
        wanted = "messages, conversations, instruction/output, prompt/response" + (", prompt" if prompt_only else "")
        raise ChatError(f"{where}: no conversation found (expected one of: {wanted}); found fields {sorted(record)}")
    return validate_messages(msgs, where)
