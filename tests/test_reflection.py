"""EPE reflections: the sidecar, the layout picture, and THE PROOF (post-reflection logits unchanged).

Tolerance of the proof: 1e-5 absolute on a tiny fp32 Llama and 1e-4 on SmolLM2-135M (30 layers).
The masked positions contribute exact zeros after the softmax, so the only differences left are
summation-order effects of attention over a longer row (0.0 on a single document).
"""

from __future__ import annotations

import json
import textwrap
import tracemalloc

import pytest
import torch

import ctrltok.epe.reflection
from ctrltok.core.attention import VARLEN, draw, register_varlen
from ctrltok.core.example import IGNORE
from ctrltok.core.loss import logits as forward_logits
from ctrltok.core.packing import collate, pack
from ctrltok.core.records import RecordError, Skips, read_records, resource_path
from ctrltok.data.encode import build_examples, heldout_indices
from ctrltok.epe.reflection import (
    MAX_HELD,
    AnnotatedDocument,
    Annotation,
    Insert,
    charter_ids,
    insert_reflection,
    layout,
    read_annotated,
    read_documents,
    read_sidecar,
)

register_varlen()  # the per-document SDPA path is set on test models by name

PICTURE = """\
tokens     p0 p1  A r0 r1 c0 c1
positions   0  1  2  3  4  2  3
doc_ids     0  0  0  0  0  0  0
targets    p1  . r0 r1 c0 c1  .

mask       p0 p1  A r0 r1 c0 c1
  p0        1  .  .  .  .  .  .
  p1        1  1  .  .  .  .  .
  A         1  1  1  .  .  .  .
  r0        1  1  1  1  .  .  .
  r1        1  1  1  1  1  .  .
  c0        1  1  .  .  .  1  .
  c1        1  1  .  .  .  1  1"""

ATOL = 1e-5


def test_picture_matches_docstring():
    ex = layout([10, 11, 20, 21], [Insert(2, [30, 31], [1.0, 0.0])], assistant_id=99)
    batch = collate([[ex]], pad_id=0)
    names = {10: "p0", 11: "p1", 20: "c0", 21: "c1", 30: "r0", 31: "r1", 99: "A"}
    assert draw(batch, 0, names) == PICTURE
    assert textwrap.indent(PICTURE, "    ") in ctrltok.epe.reflection.__doc__
    assert ex.blocked == [(5, 7, 2, 5)]
    assert ex.head_positions == [2] and ex.head_targets == [[1.0, 0.0]]


def test_layout_weights_marker_and_resume_options():
    ex = layout([1, 2, 3, 4], [Insert(2, [7, 8], [])], 9, reflection_weight=2.0, context_weight=0.5, resume_target=False)
    assert ex.labels == [1, 2, IGNORE, 7, 8, IGNORE, 4]
    assert ex.loss_weights == [0.5, 0.5, 0.0, 2.0, 2.0, 0.0, 0.5]
    marked = layout([1, 2, 3], [Insert(1, [7], [])], 9, supervise_marker=True)
    assert marked.labels == [1, 9, 7, 2, 3]
    # Two reflections: the second cannot see the first; the end one has no post-context, so no hole.
    two = layout([1, 2, 3], [Insert(1, [7], []), Insert(3, [8], [])], 9)
    assert two.input_ids == [1, 9, 7, 2, 3, 9, 8]
    assert two.position_ids == [0, 1, 2, 1, 2, 3, 4]
    assert two.blocked == [(3, 7, 1, 3)]
    with pytest.raises(ValueError, match="outside"):
        layout([1, 2], [Insert(2, [7], []), Insert(1, [8], [])], 9)


@pytest.fixture
def epe_tokenizer(smol_tokenizer):
    tokens = ["<assistant>"] + [f"<charter_{cid}>" for cid in charter_ids()]
    smol_tokenizer.add_special_tokens({"additional_special_tokens": tokens})
    return smol_tokenizer


def _corpus(n_docs=4):
    docs = list(read_annotated(resource_path("epe_corpus"), resource_path("epe_sidecar")))[:n_docs]
    # A second reflection in one document, to cover several holes in a document.
    first = docs[0]
    extra = Annotation(first.doc_id, len(first.text) // 4, "A second, earlier reflection.", ("1.1",), "test")
    first.annotations = sorted(first.annotations + [extra], key=lambda a: a.offset)
    return docs


def _plain_ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def _context_index(example):
    """Index in the plain document of each token of ``example``; None inside reflection regions.

    A region starts at a head position (the marker) and runs while positions stay above the
    marker's (the reflection); the post-context restarts at the marker's position.
    """
    pos, heads = example.positions, set(example.head_positions)
    inside: set[int] = set()
    for h in example.head_positions:
        i = h + 1
        while i < len(example) and i not in heads and pos[i] > pos[h]:
            i += 1
        inside.update(range(h, i))
    out, count = [], 0
    for i in range(len(example)):
        out.append(None if i in inside else count)
        count += i not in inside
    return out


def _check_proof(model, tokenizer, docs, impl, atol, max_length=1024):
    order = charter_ids()
    examples = [insert_reflection(d.text, d.annotations, tokenizer, order, source=d.doc_id) for d in docs]
    plain = {d.doc_id: _plain_ids(tokenizer, d.text) for d in docs}
    result = pack(examples, max_length=max_length, overlong="error")
    assert any(len(row) > 1 for row in result.rows), "the proof must cover packed rows"
    pad_to = None
    if impl == "flex_attention":  # torch 2.13's CPU FlexAttention is exact only on block-padded rows
        pad_to = -(-max(sum(len(ex) for ex in row) for row in result.rows) // 128) * 128
    batch = collate(result.rows, pad_id=tokenizer.pad_token_id or 0, pad_to=pad_to)
    with torch.no_grad():
        logits = forward_logits(model, batch, impl)
    if impl == "flex_attention":  # the plain references go through SDPA, for the same reason
        model.set_attn_implementation("sdpa")
    worst_post, worst_pre, checked = 0.0, 0.0, 0
    for b, row in enumerate(result.rows):
        offset = 0
        for ex in row:
            ids = plain[ex.source]
            with torch.no_grad():
                ref = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
            index = _context_index(ex)
            first_head = ex.head_positions[0] if ex.head_positions else len(ex)
            assert [ex.input_ids[i] for i, j in enumerate(index) if j is not None] == ids
            for part in ("pre", "post"):
                cols = [i for i, j in enumerate(index) if j is not None and (i < first_head) == (part == "pre")]
                if not cols:
                    continue
                got = logits[b, [offset + i for i in cols]]
                diff = (got - ref[[index[i] for i in cols]]).abs().max().item()
                if part == "pre":
                    worst_pre = max(worst_pre, diff)
                else:
                    worst_post = max(worst_post, diff)
                    checked += len(cols)
            offset += len(ex)
    assert checked > 100
    assert worst_post <= atol, f"post-reflection logits differ by {worst_post}"
    assert worst_pre <= atol, f"pre-reflection logits differ by {worst_pre}"
    return batch, logits


@pytest.mark.parametrize("impl", ["sdpa", "eager", VARLEN])
def test_proof_post_reflection_logits_equal_plain_document(tiny_llama, epe_tokenizer, impl):
    model = tiny_llama(len(epe_tokenizer), attn=impl)
    _check_proof(model, epe_tokenizer, _corpus(3), impl, ATOL)


def test_proof_fails_without_the_hole_or_the_aliasing(tiny_llama, epe_tokenizer):
    """The invariant is not vacuous: remove either ingredient and the logits move."""
    model = tiny_llama(len(epe_tokenizer))
    doc = _corpus(1)[0]
    ex = insert_reflection(doc.text, doc.annotations, epe_tokenizer, charter_ids())
    ids = _plain_ids(epe_tokenizer, doc.text)
    index = _context_index(ex)
    post = [i for i, j in enumerate(index) if j is not None and i > ex.head_positions[-1]]
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
        ref_post = ref[[index[i] for i in post]]
        for variant in ("no hole", "no aliasing", "no mask at all"):
            v = ex
            if variant == "no hole":
                v = type(ex)(**{**ex.__dict__, "blocked": []})
            elif variant == "no aliasing":
                v = type(ex)(**{**ex.__dict__, "position_ids": None})
            batch = collate([[v]], pad_id=0)
            if variant == "no mask at all":
                out = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits[0]
            else:
                out = forward_logits(model, batch)[0]
            assert (out[post] - ref_post).abs().max().item() > 1e-3, variant


@pytest.mark.slow
def test_proof_flex_attention(tiny_llama, epe_tokenizer):
    pytest.importorskip("torch.nn.attention.flex_attention")
    model = tiny_llama(len(epe_tokenizer), attn="flex_attention", layers=1)
    _check_proof(model, epe_tokenizer, _corpus(3), "flex_attention", ATOL)


@pytest.mark.slow
def test_proof_on_smollm2_135m():
    from ctrltok.core.models import load_model

    model, tokenizer = load_model("smollm2-135m")
    tokens = ["<assistant>"] + [f"<charter_{cid}>" for cid in charter_ids()]
    tokenizer.add_special_tokens({"additional_special_tokens": tokens})
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    assert tokenizer.convert_tokens_to_ids("<assistant>") == 49152
    _check_proof(model, tokenizer, _corpus(3), model.config._attn_implementation, 1e-4)


def test_snapping_rule_moves_back_to_the_token_start(epe_tokenizer):
    text = "Hello wonderful world. Next sentence."
    inside = text.index("wonderful") + 3  # inside the word: snaps back before " wonderful"
    ex = insert_reflection(text, [Annotation("d", inside, "Hm.", ())], epe_tokenizer, charter_ids())
    at = ex.head_positions[0]
    assert epe_tokenizer.decode(ex.input_ids[:at]) == "Hello"
    boundary = text.index(" Next")  # right after the full stop: nothing moves
    ex = insert_reflection(text, [Annotation("d", boundary, "Hm.", ())], epe_tokenizer, charter_ids())
    at = ex.head_positions[0]
    assert epe_tokenizer.decode(ex.input_ids[:at]) == text[:boundary]
    # Special-token spellings in the document stay text: only the inserted marker is a control id.
    ex = insert_reflection("Say <assistant> now.", [Annotation("d", 3, "Hm.", ("2.1",))], epe_tokenizer, charter_ids())
    assistant = epe_tokenizer.convert_tokens_to_ids("<assistant>")
    assert ex.input_ids.count(assistant) == 1
    assert ex.head_targets[0][charter_ids().index("2.1")] == 1.0 and sum(ex.head_targets[0]) == 1.0


def test_insert_refuses_a_tokenizer_without_the_marker(smol_tokenizer):
    with pytest.raises(ValueError, match="<assistant>"):
        insert_reflection("Some text.", [Annotation("d", 4, "Hm.", ())], smol_tokenizer, charter_ids())


def test_shipped_corpus_and_sidecar_read_cleanly():
    skips = Skips()
    docs = list(read_annotated(resource_path("epe_corpus"), resource_path("epe_sidecar"), skips=skips))
    assert len(docs) == 40 and not skips
    assert all(len(d.annotations) == 1 for d in docs)
    assert docs[0].annotations[0].where.endswith("epe_sidecar.jsonl:1")


def _write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


BAD_LINES = [
    ({"doc_id": "nope", "offset": 1, "reflection_3p": "r", "charter": []}, "unknown document", "unknown document"),
    ({"doc_id": "a", "offset": 99, "reflection_3p": "r", "charter": []}, "outside document 'a'", "offset out of range"),
    ({"doc_id": "a", "offset": -1, "reflection_3p": "r", "charter": []}, "outside document", "offset out of range"),
    ({"doc_id": "a", "offset": "3", "reflection_3p": "r", "charter": []}, "must be an integer", "offset not an integer"),
    ({"doc_id": "a", "offset": 2, "reflection_3p": "  ", "charter": []}, "empty reflection", "empty reflection"),
    ({"doc_id": "a", "offset": 2, "reflection_3p": "r", "charter": ["9.9"]}, "unknown charter id", "unknown charter id"),
    ({"doc_id": "a", "offset": 2, "charter": []}, "missing field", "missing field"),
    ("{not json", "malformed JSON", "malformed JSON"),
]


@pytest.mark.parametrize("line,message,reason", BAD_LINES, ids=[b[2] + str(i) for i, b in enumerate(BAD_LINES)])
def test_sidecar_errors_name_file_and_line(tmp_path, line, message, reason):
    corpus = _write(tmp_path / "corpus.jsonl", [{"id": "a", "text": "Some text."}])
    good = {"doc_id": "a", "offset": 4, "reflection_3p": "Fine.", "charter": ["1.1"]}
    sidecar = _write(tmp_path / "side.jsonl", [good, line])
    docs = read_documents(corpus)
    with pytest.raises(RecordError, match=rf"side\.jsonl:2: .*{message}"):
        read_sidecar(sidecar, docs)
    skips = Skips()
    kept = read_sidecar(sidecar, docs, on_error="skip", skips=skips)
    assert skips.summary() == {reason: 1}
    assert [a.offset for a in kept["a"]] == [4]


def test_sidecar_reflection_column_is_configurable(tmp_path):
    corpus = _write(tmp_path / "c.jsonl", [{"id": "a", "text": "Some text."}])
    sidecar = _write(tmp_path / "s.jsonl", [{"doc_id": "a", "offset": 4, "reflection_1p": "I see.", "charter": []}])
    docs = read_documents(corpus)
    with pytest.raises(RecordError, match="reflection_3p"):
        read_sidecar(sidecar, docs)
    assert read_sidecar(sidecar, docs, reflection_field="reflection_1p")["a"][0].reflection == "I see."


def test_parquet_sidecar(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    corpus = _write(tmp_path / "c.jsonl", [{"id": "a", "text": "Some text."}])
    table = pa.table({"doc_id": ["a", "a"], "offset": [4, 40], "reflection_3p": ["Ok.", "Bad."], "charter": [["1.1"], []]})
    pq.write_table(table, tmp_path / "s.parquet")
    with pytest.raises(RecordError, match=r"s\.parquet:row 2: offset 40"):
        read_sidecar(tmp_path / "s.parquet", read_documents(corpus))


# ---------------------------------------------------------------- the streamed join (issue 11, deliverable 6)


def _in_memory_join(corpus, sidecar):
    """The join as it was: the whole corpus in a dict, then the sidecar checked against it."""
    docs = read_documents(corpus)
    anns = read_sidecar(sidecar, docs)
    return [AnnotatedDocument(doc_id, text, anns.get(doc_id, []), where) for doc_id, (text, where) in docs.items()]


@pytest.mark.parametrize("max_held", [MAX_HELD, 1, 0], ids=["hash", "merge", "merge-empty-start"])
def test_streamed_join_equals_the_in_memory_join(max_held):
    corpus, sidecar = resource_path("epe_corpus"), resource_path("epe_sidecar")
    assert list(read_annotated(corpus, sidecar, max_held=max_held)) == _in_memory_join(corpus, sidecar)


def test_join_yields_documents_before_the_corpus_is_read():
    read = []

    def corpus():
        for where, rec in read_records(resource_path("epe_corpus")):
            read.append(where)
            yield where, rec

    docs = read_annotated(corpus(), resource_path("epe_sidecar"))
    first = next(docs)
    assert len(read) == 1 and first.doc_id == "doc-001" and first.annotations
    assert next(docs).doc_id == "doc-002" and len(read) == 2


def test_join_memory_does_not_grow_with_the_corpus(tmp_path):
    sidecar = _write(tmp_path / "s.jsonl", [{"doc_id": f"d{i}", "offset": 5, "reflection_3p": "Fine.", "charter": ["1.1"]}
                                            for i in range(0, 2000, 100)])

    def peak(n: int) -> int:
        corpus = ((f"gen:{i}", {"id": f"d{i}", "text": f"word {i} " * 300}) for i in range(n))  # ~2.5 KB each
        tracemalloc.start()
        annotated = sum(bool(d.annotations) for d in read_annotated(corpus, sidecar))
        top = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert annotated == 20
        return top

    small, large = peak(2000), peak(20000)  # 5 MB and 50 MB of text streamed
    assert large < 1.5 * small and large < 4_000_000


def test_join_reports_unknown_documents_offsets_and_duplicates(tmp_path):
    corpus = _write(tmp_path / "c.jsonl", [{"id": "a", "text": "Some text."}, {"id": "b", "text": "Other."},
                                           {"id": "a", "text": "Again."}, {"id": "x", "text": "Plain."},
                                           {"id": "x", "text": "Plain."}])
    rows = [{"doc_id": "a", "offset": 4, "reflection_3p": "Fine.", "charter": ["1.1"]},
            {"doc_id": "nope", "offset": 1, "reflection_3p": "r", "charter": []},
            {"doc_id": "b", "offset": 60, "reflection_3p": "Too far.", "charter": []}]
    sidecar = _write(tmp_path / "s.jsonl", rows)
    plain = _write(tmp_path / "plain.jsonl", [{"id": "a", "text": "Some text."}, {"id": "b", "text": "Other."}])
    for row, message in [(1, r"one\.jsonl:2: unknown document 'nope' \(not in the corpus\)"),
                         (2, r"one\.jsonl:2: offset 60 is outside document 'b' \(0\.\.6 characters\)")]:
        with pytest.raises(RecordError, match=message):
            list(read_annotated(plain, _write(tmp_path / "one.jsonl", [rows[0], rows[row]])))
    with pytest.raises(RecordError, match=r"c\.jsonl:3: document id 'a' appears twice \(first at .*c\.jsonl:1\)"):
        list(read_annotated(corpus, _write(tmp_path / "one.jsonl", [rows[0]])))
    skips = Skips()
    docs = list(read_annotated(corpus, sidecar, on_error="skip", skips=skips))
    assert skips.summary() == {"unknown document": 1, "offset out of range": 1, "duplicate document id": 1}
    # The first "a" takes its annotation, "b" keeps its text without the bad one; duplicates among
    # documents without annotations do not touch the join and are not looked for.
    assert [(d.doc_id, [a.offset for a in d.annotations]) for d in docs] == [("a", [4]), ("b", []), ("x", []), ("x", [])]


def test_hash_join_takes_any_order_and_merge_recovers_from_a_misplaced_row(tmp_path):
    corpus = _write(tmp_path / "c.jsonl", [{"id": k, "text": f"Text of {k}."} for k in "abcd"])
    sidecar = _write(tmp_path / "s.jsonl", [{"doc_id": k, "offset": 2, "reflection_3p": f"On {k}.", "charter": []}
                                            for k in "acbd"])
    held = list(read_annotated(corpus, sidecar))
    assert [len(d.annotations) for d in held] == [1, 1, 1, 1]
    skips = Skips()
    merged = list(read_annotated(corpus, sidecar, on_error="skip", skips=skips, max_held=1))
    assert [len(d.annotations) for d in merged] == [1, 1, 0, 1]  # "c" was listed before "b": reported, the rest joins
    assert skips.summary() == {"unknown document": 1} and skips.examples["unknown document"][0].endswith("s.jsonl:2")
    with pytest.raises(RecordError, match=r"s\.jsonl:2: unknown document 'c' .*corpus order"):
        list(read_annotated(corpus, sidecar, max_held=1))


def test_merge_reports_an_unknown_document_before_the_corpus_ends(tmp_path):
    sidecar = _write(tmp_path / "s.jsonl", [{"doc_id": k, "offset": 0, "reflection_3p": "R.", "charter": []}
                                            for k in ("a", "nope", "b")])
    skips = Skips()
    docs = read_annotated(iter([("g:1", {"id": "a", "text": "A."}), ("g:2", {"id": "b", "text": "B."}),
                                ("g:3", {"id": "c", "text": "C."})]), sidecar, on_error="skip", skips=skips, max_held=0)
    assert next(docs).doc_id == "a" and not skips
    assert next(docs).doc_id == "b" and skips.summary() == {"unknown document": 1}
    assert [d.doc_id for d in docs] == ["c"]


def test_build_epe_examples_from_a_recipe(epe_tokenizer):
    from ctrltok.core.config import DataConfig, EpeConfig, Recipe

    recipe = Recipe(
        data=DataConfig(kind="epe", train="ctrltok:epe_corpus", eval_fraction=0.25),
        epe=EpeConfig(sidecar=str(resource_path("epe_sidecar")), reflection_weight=2.0, context_weight=0.5),
    )
    encoded = build_examples(recipe, epe_tokenizer)
    held = len(heldout_indices(40, 0.25, recipe.train.seed))
    assert (len(encoded.train), len(encoded.eval), encoded.records) == (40 - held, held, 40) and held > 0
    assistant = epe_tokenizer.convert_tokens_to_ids("<assistant>")
    for ex in encoded.train + encoded.eval:
        assert ex.input_ids.count(assistant) == 1 and len(ex.head_targets[0]) == 35
        assert set(ex.loss_weights) == {0.0, 0.5, 2.0}
    # The eval split is a seeded, fixed choice.
    again = build_examples(recipe, epe_tokenizer)
    assert [ex.source for ex in again.eval] == [ex.source for ex in encoded.eval]
