"""The inputs users have: compressed JSON lines, JSON arrays, hub datasets (streamed), OASST message
trees, LIMA, and several weighted sources mixed by seed; each with good and bad records."""

from __future__ import annotations

import gzip
import itertools
import json
import types

import pytest
import zstandard
from conftest import SMOL_TOKENIZER, shared_data

import ctrltok.core.records as records
from ctrltok.cli.main import main
from ctrltok.core.chat import ChatError
from ctrltok.core.config import ConfigError, DataConfig, recipe_from_mapping
from ctrltok.core.conversation import to_conversation, to_conversations
from ctrltok.core.records import RecordError, Skips, mix, read_records, read_sources
from ctrltok.data.encode import build_examples


def chat(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}


def jsonl(lines: list[bytes | dict]) -> bytes:
    return b"".join((json.dumps(x).encode() if isinstance(x, dict) else x) + b"\n" for x in lines)


COMPRESS = {"gz": gzip.compress, "zst": lambda b: zstandard.ZstdCompressor().compress(b)}


# -- compressed JSON lines ---------------------------------------------------------------------------
@pytest.mark.parametrize("ext", ["gz", "zst"])
def test_compressed_jsonl_reads_like_jsonl(tmp_path, ext):
    p = tmp_path / f"chats.jsonl.{ext}"
    p.write_bytes(COMPRESS[ext](jsonl([chat(0), chat(1), b"", chat(2)])))
    got = list(read_records(p))
    assert [w for w, _ in got] == [f"{p}:1", f"{p}:2", f"{p}:4"]
    assert got[2][1] == chat(2)


@pytest.mark.parametrize("ext", ["gz", "zst"])
def test_compressed_jsonl_bad_records_name_file_and_line(tmp_path, ext):
    p = tmp_path / f"chats.jsonl.{ext}"
    p.write_bytes(COMPRESS[ext](jsonl([chat(0), b"{oops", b"\xff\xfe", b"[1]", chat(1)])))
    with pytest.raises(RecordError, match=rf"chats.jsonl.{ext}:2: malformed JSON"):
        list(read_records(p))
    skips = Skips()
    assert [r for _, r in read_records(p, on_error="skip", skips=skips)] == [chat(0), chat(1)]
    assert skips.summary() == {"malformed JSON": 1, "invalid UTF-8": 1, "not an object": 1}
    assert skips.examples["invalid UTF-8"] == [f"{p}:3"]


def test_corrupt_gzip_is_an_error_naming_the_file(tmp_path):
    p = tmp_path / "bad.jsonl.gz"
    p.write_bytes(gzip.compress(jsonl([chat(i) for i in range(50)]))[:-20])
    with pytest.raises(RecordError, match=r"bad.jsonl.gz:\d+: cannot decompress"):
        list(read_records(p))
    p.write_bytes(b"not gzip at all")
    with pytest.raises(RecordError, match=r"bad.jsonl.gz:1: cannot decompress"):
        list(read_records(p))


def test_reading_is_lazy(tmp_path):
    """A generator: the first record comes before a bad line further on is read."""
    p = tmp_path / "x.jsonl.gz"
    p.write_bytes(gzip.compress(jsonl([chat(0), b"{broken"])))
    it = read_records(p)
    assert isinstance(it, types.GeneratorType)
    assert next(it)[1] == chat(0)
    with pytest.raises(RecordError, match="x.jsonl.gz:2"):
        next(it)


# -- JSON arrays ------------------------------------------------------------------------------------
@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(records, "CHUNK", 5)  # every record spans several reads


@pytest.mark.parametrize("indent", [None, 2])
def test_json_array_is_streamed_item_by_item(tmp_path, small_chunks, indent):
    p = tmp_path / "chats.json"
    items = [chat(i) | {"n": 10 ** i} for i in range(6)]
    p.write_text(json.dumps(items, indent=indent))
    got = list(read_records(p))
    assert [r for _, r in got] == items
    assert got[0][0] == f"{p}:{1 if indent is None else 2} (item 1)"
    assert len({w for w, _ in got}) == 6


def test_json_array_compressed_and_json_lines_in_a_json_file(tmp_path):
    p = tmp_path / "chats.json.gz"
    p.write_bytes(gzip.compress(json.dumps([chat(0), chat(1)]).encode()))
    assert [r for _, r in read_records(p)] == [chat(0), chat(1)]
    q = tmp_path / "lines.json"  # many hub datasets store JSON lines under .json
    q.write_bytes(jsonl([chat(0), chat(1)]))
    assert [w for w, _ in read_records(q)] == [f"{q}:1", f"{q}:2"]
    e = tmp_path / "empty.json"
    e.write_text("[ ]\n")
    assert list(read_records(e)) == []


def test_json_array_bad_items_are_rejected_or_counted(tmp_path, small_chunks):
    p = tmp_path / "mixed.json"
    p.write_text('[\n  {"messages": []},\n  42,\n  "text",\n  {"prompt": "p", "response": "r"}\n]\n')
    with pytest.raises(RecordError, match=r"mixed.json:3 \(item 2\): expected a JSON object, found int"):
        list(read_records(p))
    skips = Skips()
    got = list(read_records(p, on_error="skip", skips=skips))
    assert [w for w, _ in got] == [f"{p}:2 (item 1)", f"{p}:5 (item 4)"]
    assert skips.summary() == {"not an object": 2}


@pytest.mark.parametrize("text,match", [
    ('[{"a": 1},\n {"a": tru}]', r"broken.json:2: malformed JSON \(Expecting value\)"),
    ('[{"a": 1}\n {"b": 2}]', r"broken.json:2: malformed JSON \(expected ',' or ']' after item 1"),
    ('[{"a": 1},\n]', r"broken.json:2: malformed JSON \(a value expected"),
    ('[{"a": 1}', r"broken.json:1: .*found the end of the file"),
    ('[{"a": 1}] [', r"broken.json:1: malformed JSON \(extra data"),
    ('"just text"', r"broken.json:1: expected a JSON array of records"),
])
def test_broken_json_arrays_are_errors_even_when_skipping(tmp_path, small_chunks, text, match):
    p = tmp_path / "broken.json"
    p.write_text(text)
    with pytest.raises(RecordError, match=match):
        list(read_records(p, on_error="skip", skips=Skips()))


def test_folder_reads_every_format(tmp_path):
    (tmp_path / "a.jsonl.zst").write_bytes(COMPRESS["zst"](jsonl([{"text": "a"}])))
    (tmp_path / "b.json").write_text(json.dumps([{"text": "b"}]))
    (tmp_path / "c.txt").write_text("c")
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(jsonl([{"text": "d"}])))
    (tmp_path / "notes.md").write_text("ignored")
    assert [r["text"] for _, r in read_records(tmp_path)] == ["a", "b", "c", "d"]


def test_unsupported_and_missing_files(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(RecordError, match=r"x.csv: unsupported file type"):
        list(read_records(tmp_path / "x.csv"))
    with pytest.raises(RecordError, match=r"gone.jsonl.zst: no such file"):
        list(read_records(tmp_path / "gone.jsonl.zst"))


# -- Hugging Face datasets, streamed --------------------------------------------------------------
class FakeHub:
    """Stands in for ``datasets.load_dataset``; records every call."""

    def __init__(self, rows=None, fail_at=None, error=None):
        self.calls, self.rows, self.fail_at, self.error = [], rows or [{"text": "x"}, {"text": "y"}], fail_at, error

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        if self.error:
            raise self.error

        def rows():
            for i, r in enumerate(self.rows):
                if i == self.fail_at:
                    raise ValueError("bad shard")
                yield r
        return rows()


@pytest.fixture
def hub(monkeypatch):
    import datasets

    fake = FakeHub()
    monkeypatch.setattr(datasets, "load_dataset", fake)
    return fake


def test_hub_spec_string_reaches_load_dataset_streaming(hub):
    got = list(read_records("hf:allenai/c4:en?split=validation&revision=abc123&data_files=en/a.json.gz,en/b.json.gz"))
    assert hub.calls == [(("allenai/c4", "en"), {"split": "validation", "revision": "abc123",
                                                 "data_files": ["en/a.json.gz", "en/b.json.gz"], "streaming": True})]
    assert got == [("hf:allenai/c4:en[validation]:row 1", {"text": "x"}), ("hf:allenai/c4:en[validation]:row 2",
                                                                         {"text": "y"})]


def test_hub_mapping_in_a_recipe(hub):
    recipe = recipe_from_mapping({"data": {"kind": "text", "train": {
        "hf": "HuggingFaceFW/fineweb", "config": "sample-10BT", "revision": "v1.2", "data_files": {"train": "s/*.parquet"}}}})
    assert [w for w, _ in read_sources(recipe.data, seed=0)] == [
        "hf:HuggingFaceFW/fineweb:sample-10BT[train]:row 1", "hf:HuggingFaceFW/fineweb:sample-10BT[train]:row 2"]
    assert hub.calls == [(("HuggingFaceFW/fineweb", "sample-10BT"), {
        "split": "train", "revision": "v1.2", "data_files": {"train": "s/*.parquet"}, "streaming": True})]


def test_hub_path_spec_merges_with_fields(hub):
    data = DataConfig(train=[{"path": "hf:org/set", "split": "test", "weight": 2}])
    list(read_sources(data, seed=0))
    assert hub.calls[0] == (("org/set", None), {"split": "test", "revision": None, "data_files": None,
                                                "streaming": True})
    with pytest.raises(ConfigError, match=r"data.train.config = 'b' contradicts path 'hf:org/set:a'"):
        DataConfig(train={"path": "hf:org/set:a", "config": "b"})


def test_the_older_datasets_name_spelling_still_works(hub):
    list(read_records("some/dataset:validation"))
    assert hub.calls[0] == (("some/dataset", None), {"split": "validation", "revision": None, "data_files": None,
                                                     "streaming": True})


def test_hub_errors_name_the_source(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", FakeHub(error=FileNotFoundError("no such dataset")))
    with pytest.raises(RecordError, match=r"hf:nope/nope\[train\]: `datasets` could not load it \(FileNotFoundError"):
        list(read_records("hf:nope/nope"))
    with pytest.raises(RecordError, match=r"missing/dir: not a file, folder or ctrltok resource, and `datasets`"):
        list(read_records("missing/dir"))
    monkeypatch.setattr(datasets, "load_dataset", FakeHub(rows=[{"a": 1}, {"a": 2}], fail_at=1))
    it = read_records("hf:org/set")
    assert next(it) == ("hf:org/set[train]:row 1", {"a": 1})
    with pytest.raises(RecordError, match=r"hf:org/set\[train\]:row 2: `datasets` failed reading it \(ValueError"):
        next(it)


def test_local_data_files_are_streamed_through_datasets(tmp_path, monkeypatch):
    import datasets

    real, seen = datasets.load_dataset, []

    def spy(*args, **kwargs):
        ds = real(*args, **kwargs)
        seen.append(ds)
        return ds

    monkeypatch.setattr(datasets, "load_dataset", spy)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_bytes(jsonl([chat(0), chat(1)]))
    b.write_bytes(jsonl([chat(2)]))
    recipe = recipe_from_mapping({"data": {"train": {"hf": "json", "data_files": [str(a), str(b)]}, "eval_fraction": 0}})
    got = list(read_sources(recipe.data, seed=0))
    assert isinstance(seen[0], datasets.IterableDataset)  # streamed, not downloaded and loaded whole
    assert [r for _, r in got] == [chat(0), chat(1), chat(2)]
    assert got[0][0] == "hf:json[train]:row 1"


def test_source_config_errors_name_the_key():
    for bad, match in [
        ({"train": [{"pth": "x"}]}, r"data.train\[0\]: unknown key 'pth'"),
        ({"train": {"hf": "a", "path": "b"}}, r"data.train: give exactly one of `path`"),
        ({"train": {"path": "a.jsonl", "split": "test"}}, r"data.train: split is for hub sources"),
        ({"train": ["a.jsonl", {"path": "b.jsonl", "weight": 0}]}, r"data.train\[1\].weight = 0.0; expected > 0"),
        ({"train": "hf:org/set?spilt=test"}, r"unknown hub option 'spilt=test'"),
        ({"train": []}, r"data.train: an empty list"),
        ({"oasst_paths": "some"}, r"data.oasst_paths = 'some'"),
    ]:
        with pytest.raises(ConfigError, match=match):
            recipe_from_mapping({"data": bad})


# -- several sources, mixed by seed -----------------------------------------------------------------
def test_mix_is_deterministic_and_follows_weights():
    a, b = [("a", i) for i in range(3000)], [("b", i) for i in range(1000)]
    first = list(itertools.islice(mix([a, b], [3.0, 1.0], seed=7), 2000))
    assert first == list(itertools.islice(mix([a, b], [3.0, 1.0], seed=7), 2000))
    assert first != list(itertools.islice(mix([a, b], [3.0, 1.0], seed=8), 2000))
    n_a = sum(1 for s, _ in first if s == "a")
    assert abs(n_a - 1500) <= 2  # 3:1, within an item of the weights
    for prefix in (first[:40], first[:400]):  # every stretch, not just the total
        assert abs(sum(s == "a" for s, _ in prefix) - 0.75 * len(prefix)) <= 2
    assert [x for x in first if x[0] == "a"] == a[:n_a]  # each source keeps its order


def test_mix_streams_and_reads_every_item_once():
    endless = mix([itertools.count(), itertools.count(10 ** 9)], [1.0, 2.0], seed=0)
    head = list(itertools.islice(endless, 3000))  # infinite sources: nothing is read ahead
    assert abs(sum(x >= 10 ** 9 for x in head) - 2000) <= 2
    out = list(mix([range(5), range(100, 200), range(1000, 1003)], [1.0, 1.0, 5.0], seed=3))
    assert sorted(out) == list(range(5)) + list(range(100, 200)) + list(range(1000, 1003))


def test_a_records_place_depends_only_on_seed_source_and_index():
    full = list(mix([range(100), range(1000, 1100)], [1.0, 1.0], seed=5))
    short = list(mix([range(100), range(1000, 1010)], [1.0, 1.0], seed=5))
    assert short == [x for x in full if x < 1010]


def test_weighted_sources_in_a_recipe(tmp_path, smol_tokenizer):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.json"
    a.write_bytes(jsonl([chat(i) for i in range(200)]))
    b.write_text(json.dumps([chat(1000 + i) for i in range(200)]))
    mapping = {"data": {"train": [{"path": str(a), "weight": 3.0}, str(b)], "eval_fraction": 0}, "train": {"seed": 1}}
    recipe = recipe_from_mapping(mapping)
    got = [w for w, _ in read_sources(recipe.data, recipe.train.seed)]
    assert got == [w for w, _ in read_sources(recipe_from_mapping(mapping).data, 1)]  # a rerun reads the same
    assert sorted(got) == sorted([f"{a}:{i + 1}" for i in range(200)] + [f"{b}:1 (item {i + 1})" for i in range(200)])
    assert abs(sum(str(a) in w for w in got[:100]) - 75) <= 2
    enc = build_examples(recipe, smol_tokenizer)
    assert [e.source for e in enc.train] == got
    again = recipe_from_mapping(mapping, overrides=[f"data.train={a}"])  # --set still names one source
    assert again.data.train == str(a)
    assert [w for w, _ in read_sources(again.data, 1)] == [f"{a}:{i + 1}" for i in range(200)]


# -- OASST message trees ----------------------------------------------------------------------------
def msg(role, text, rank=None, replies=(), **kw):
    return {"role": role, "text": text, "rank": rank, "replies": list(replies), **kw}


TREE = {"message_tree_id": "t1", "tree_state": "ready_for_export", "prompt": msg("prompter", "Q <|assistant|>", replies=[
    msg("assistant", "A-rank1", 1, [msg("prompter", "follow-up")]),
    msg("assistant", "A-best", 0, [
        msg("prompter", "Q2", replies=[
            msg("assistant", "B-unranked"),
            msg("assistant", "B-rank2", 2),
            msg("assistant", "B-deleted", 0, deleted=True),
        ]),
        msg("prompter", "Q2-second", replies=[msg("assistant", "C", 0)]),
    ]),
    msg("assistant", "A-failed-review", 0, review_result=False),
])}


def texts(conv):
    return [m["content"] for m in conv]


def test_best_path_follows_the_lowest_rank():
    conv = to_conversation(TREE, "t.jsonl:1")
    assert texts(conv) == ["Q <|assistant|>", "A-best", "Q2", "B-rank2"]  # ranked before unranked
    assert [m["role"] for m in conv] == ["user", "assistant", "user", "assistant"]
    assert to_conversations(TREE, "w") == [conv]
    assert to_conversation(TREE, "w", prompt_only=True) == [{"role": "user", "content": "Q <|assistant|>"}]
    deeper = {"prompt": msg("prompter", "q", replies=[msg("assistant", "a", 0, [
        msg("prompter", "unanswered"), msg("prompter", "answered", replies=[msg("assistant", "b")])])])}
    assert texts(to_conversation(deeper, "w")) == ["q", "a", "answered", "b"]  # unranked: answered first


def test_all_paths_are_every_thread_cut_after_the_last_reply():
    convs = to_conversations(TREE, "w", paths="all")
    assert [texts(c)[1:] for c in convs] == [
        ["A-rank1"],  # the prompter leaf has no reply: cut
        ["A-best", "Q2", "B-unranked"],
        ["A-best", "Q2", "B-rank2"],
        ["A-best", "Q2-second", "C"],
    ]  # deleted and failed-review messages left out


def test_bad_trees_name_the_field():
    with pytest.raises(ChatError, match=r"w: unknown role; prompt.replies\[0\].role = 'bot'"):
        to_conversation({"prompt": msg("prompter", "q", replies=[msg("bot", "a")])}, "w")
    with pytest.raises(ChatError, match=r"w: a tree message's text is not text; prompt.replies\[0\].text must be a string"):
        to_conversations({"prompt": msg("prompter", "q", replies=[msg("assistant", None)])}, "w", "all")
    with pytest.raises(ChatError, match=r"w: message tree has no assistant reply"):
        to_conversation({"prompt": msg("prompter", "q", replies=[msg("assistant", "a", deleted=True)])}, "w")
    with pytest.raises(ChatError, match=r"one OASST message, not a tree"):
        to_conversation({"message_id": "m", "parent_id": None, "role": "prompter", "text": "q"}, "w")


def test_a_tree_file_trains_best_or_all_threads(tmp_path, smol_tokenizer):
    p = tmp_path / "trees.jsonl"
    p.write_bytes(jsonl([TREE, {"prompt": msg("prompter", "lonely")}, chat(0)]))
    base = {"train": str(p), "eval_fraction": 0, "on_error": "skip"}
    best = build_examples(recipe_from_mapping({"data": base}), smol_tokenizer)
    assert [e.source for e in best.train] == [f"{p}:1", f"{p}:3"]
    assert best.skips.summary() == {"message tree has no assistant reply (after leaving out deleted or "
                                    "failed-review messages)": 1}
    every = build_examples(recipe_from_mapping({"data": base | {"oasst_paths": "all"}}), smol_tokenizer)
    assert [e.source for e in every.train] == [f"{p}:1 (thread {j})" for j in (1, 2, 3, 4)] + [f"{p}:3"]


def test_real_oasst_trees_best_and_all_paths():
    path = shared_data("oasst", "oasst_trees.jsonl")
    skips = Skips()
    trees = [r for _, r in read_records(path, on_error="skip", skips=skips)]
    assert len(trees) == 80 and not skips
    best = [to_conversations(t, "w") for t in trees]
    assert all(len(b) == 1 for b in best)
    for tree, (conv,) in zip(trees, best):
        roles = [m["role"] for m in conv]
        assert roles[0] == "user" and roles[-1] == "assistant"
        assert all(roles[i] != roles[i + 1] for i in range(len(roles) - 1))
        node = tree["prompt"]
        for m in conv[1:]:  # each step is the best-ranked reply among its siblings
            replies = node["replies"]
            node = next(r for r in replies if r["text"] == m["content"])
            ranks = [r["rank"] for r in replies if r.get("rank") is not None]
            if node.get("rank") is not None:
                assert node["rank"] == min(ranks)
    every = sum(len(to_conversations(t, "w", paths="all")) for t in trees)
    assert every > 2 * len(trees)


# -- the command line reads what train reads --------------------------------------------------------
def _render(tmp_path, src):
    out = tmp_path / "out.jsonl"
    code = main(["render", "--model", str(SMOL_TOKENIZER), "--template", "default", "--input", str(src),
                 "--out", str(out)])
    assert code == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_render_reads_lima_and_oasst_trees(tmp_path):
    lima = tmp_path / "lima.jsonl"
    lima.write_bytes(jsonl([{"conversations": ["q", "a", "q2", "a2"], "source": "stackexchange"},
                            {"instruction": "Do", "input": "", "output": "done", "history": [["hi", "hello"]]}]))
    rows = _render(tmp_path, lima)
    assert len(rows) == 2 and all(len(r["input_ids"]) == len(r["labels"]) for r in rows)
    trees = tmp_path / "trees.jsonl.gz"
    trees.write_bytes(gzip.compress(jsonl([TREE, TREE])))
    rows = _render(tmp_path, trees)
    assert len(rows) == 2 and any(lab != -100 for lab in rows[0]["labels"])


def test_render_reads_the_shared_lima_and_oasst_files(tmp_path):
    for parts, n in ((("lima", "lima_train.jsonl"), 30), (("oasst", "oasst_trees.jsonl"), 10)):
        src = shared_data(*parts)
        head = tmp_path / src.name
        head.write_text("".join(src.read_text(encoding="utf-8").splitlines(keepends=True)[:n]), encoding="utf-8")
        assert len(_render(tmp_path, head)) == n
