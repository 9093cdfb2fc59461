"""The package's own data files: they parse, have the documented shape, and agree with each other.

The files are described in src/ctrltok/resources/README.md; these tests hold them to it so that
an edited or replaced file fails here, with the file and line named, rather than deep inside a
training run.
"""

from __future__ import annotations

import json
import re
import statistics
from importlib.resources import files
from pathlib import Path

import pytest

RESOURCES = Path(str(files("ctrltok") / "resources"))
ROLES = {"system", "user", "assistant"}
CONTROL_LIKE = re.compile(r"<\|[A-Za-z_]+\|>|<assistant>|<charter_\d+\.\d+>")
CHARTER_ID = re.compile(r"^(\d+)\.(\d+)$")


def read_jsonl(name: str) -> list[dict]:
    path = RESOURCES / name
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            assert line.strip(), f"{path}:{lineno}: blank line"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:  # pragma: no cover - message only
                pytest.fail(f"{path}:{lineno}: invalid JSON: {e}")
            assert isinstance(obj, dict), f"{path}:{lineno}: expected an object"
            rows.append(obj)
    return rows


@pytest.fixture(scope="module")
def instructions() -> list[dict]:
    return read_jsonl("instructions.jsonl")


@pytest.fixture(scope="module")
def charter() -> list[dict]:
    return read_jsonl("charter.jsonl")


@pytest.fixture(scope="module")
def corpus() -> list[dict]:
    return read_jsonl("epe_corpus.jsonl")


@pytest.fixture(scope="module")
def sidecar() -> list[dict]:
    return read_jsonl("epe_sidecar.jsonl")


def test_instructions_shape(instructions):
    assert len(instructions) == 160
    assert [r["id"] for r in instructions] == [f"ctrl-{i:04d}" for i in range(1, 161)]
    for r in instructions:
        assert set(r) == {"id", "messages"}, r["id"]
        msgs = r["messages"]
        for m in msgs:
            assert set(m) == {"role", "content"}, r["id"]
            assert m["role"] in ROLES, r["id"]
            assert isinstance(m["content"], str) and m["content"].strip(), r["id"]
            assert m["content"] == m["content"].strip(), f"{r['id']}: untrimmed content"
        body = msgs[1:] if msgs[0]["role"] == "system" else msgs
        assert all(m["role"] != "system" for m in body), f"{r['id']}: system message not first"
        expected = ["user", "assistant"] * (len(body) // 2)
        assert [m["role"] for m in body] == expected and len(body) % 2 == 0, r["id"]


def test_instructions_variety(instructions):
    users = [sum(m["role"] == "user" for m in r["messages"]) for r in instructions]
    assert 12 <= sum(n > 1 for n in users) <= 20
    assert max(users) == 3
    assert 8 <= sum(r["messages"][0]["role"] == "system" for r in instructions) <= 12
    injected = [r["id"] for r in instructions
                if any(m["role"] == "user" and CONTROL_LIKE.search(m["content"]) for m in r["messages"])]
    assert len(injected) >= 5, injected
    prompts = [m["content"] for r in instructions for m in r["messages"] if m["role"] == "user"]
    assert len(set(prompts)) == len(prompts), "duplicate user prompt"
    # Short responses keep the CPU demo fast: most assistant turns are 20-120 words.
    words = [len(m["content"].split()) for r in instructions for m in r["messages"] if m["role"] == "assistant"]
    assert 20 <= statistics.median(words) <= 120
    assert sum(20 <= w <= 120 for w in words) >= 0.75 * len(words)
    assert max(words) <= 200


def test_charter(charter):
    assert len(charter) == 35
    ids = [c["id"] for c in charter]
    assert len(set(ids)) == 35
    keys = []
    for c in charter:
        assert {"id", "token", "title", "text"} <= set(c), c
        m = CHARTER_ID.match(c["id"])
        assert m, f"charter id {c['id']!r} is not X.Y"
        keys.append((int(m[1]), int(m[2])))
        assert c["token"] == f"<charter_{c['id']}>"
        for field in ("title", "text"):
            assert isinstance(c[field], str) and c[field].strip() and "\n" not in c[field], (c["id"], field)
    # File order is token-id order: sections and items ascend and are numbered without gaps.
    assert keys == sorted(keys)
    sections = sorted({x for x, _ in keys})
    assert sections == list(range(1, len(sections) + 1))
    for x in sections:
        items = [y for sx, y in keys if sx == x]
        assert items == list(range(1, len(items) + 1)), f"section {x}"


def test_charter_tokens_are_new_to_smollm2(charter, smol_tokenizer):
    vocab = smol_tokenizer.get_vocab()
    clashes = [c["token"] for c in charter if c["token"] in vocab]
    assert clashes == []


def test_corpus(corpus):
    assert len(corpus) == 40
    assert [d["id"] for d in corpus] == [f"doc-{i:03d}" for i in range(1, 41)]
    for d in corpus:
        assert set(d) == {"id", "text"}
        n = len(d["text"].split())
        assert 80 <= n <= 250, (d["id"], n)


def test_sidecar_matches_corpus_and_charter(corpus, sidecar, charter):
    texts = {d["id"]: d["text"] for d in corpus}
    charter_ids = {c["id"] for c in charter}
    assert [s["doc_id"] for s in sidecar] == [d["id"] for d in corpus], "one annotation per document, same order"
    for s in sidecar:
        assert set(s) == {"doc_id", "offset", "reflection_3p", "charter"}, s["doc_id"]
        text = texts[s["doc_id"]]
        off = s["offset"]
        assert type(off) is int and 0 < off < len(text), (s["doc_id"], off)
        # Documented rule: right after a sentence's closing punctuation, before the next sentence.
        assert text[off - 1] in ".!?'\"" and text[off] == " " and text[off + 1:].strip(), (s["doc_id"], text[off - 5:off + 5])
        refl = s["reflection_3p"]
        assert isinstance(refl, str) and refl.strip() and "\n" not in refl, s["doc_id"]
        assert 1 <= len(s["charter"]) <= 3 and len(set(s["charter"])) == len(s["charter"]), s["doc_id"]
        unknown = set(s["charter"]) - charter_ids
        assert not unknown, (s["doc_id"], unknown)


def test_readme_documents_every_file():
    readme = (RESOURCES / "README.md").read_text(encoding="utf-8")
    data_files = sorted(p.name for p in RESOURCES.glob("*.jsonl"))
    assert data_files == ["charter.jsonl", "epe_corpus.jsonl", "epe_sidecar.jsonl", "instructions.jsonl"]
    for name in data_files:
        assert f"`{name}`" in readme, name
    assert "Apache-2.0" in readme and "tokens.epe.charter" in readme


def test_offsets_are_token_boundaries_on_smollm2(corpus, sidecar, smol_tokenizer):
    # Because each offset sits before the space of a new sentence, splitting there changes no
    # token: pre + post tokenise to exactly the whole document. No snapping needed on SmolLM2.
    texts = {d["id"]: d["text"] for d in corpus}
    enc = lambda s: smol_tokenizer(s, add_special_tokens=False).input_ids  # noqa: E731
    for s in sidecar:
        text, off = texts[s["doc_id"]], s["offset"]
        assert enc(text[:off]) + enc(text[off:]) == enc(text), s["doc_id"]
