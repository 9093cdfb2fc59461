"""The resumable stage runner: shards renamed into place, kill anywhere and resume to the same
bytes, drops counted by reason with their first places, settings checked on resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ctrltok.core.stages import (
    JsonlSink,
    Outcome,
    ResumeError,
    StageRun,
    map_ordered,
    read_jsonl,
    repair_jsonl,
    run_stage,
)

N = 23


class Killed(RuntimeError):
    pass


def items(n: int = N) -> list[tuple[str, dict]]:
    return [(f"in.jsonl:{i + 1}", {"id": i, "text": "" if i % 5 == 2 else f"doc {i}"}) for i in range(n)]


def upper(seen: list | None = None, kill_at: int | None = None):
    """A stage: one outcome per input; empty texts dropped; ``kill_at``: dies on that input."""
    def stage(inputs):
        for where, rec in inputs:
            if seen is not None:
                seen.append(rec["id"])
            if rec["id"] == kill_at:
                raise Killed(f"killed at {rec['id']}")
            if not rec["text"]:
                yield Outcome.dropped("empty document", where)
            elif rec["id"] % 7 == 3:
                yield Outcome.dropped("unlucky", where, record={"id": rec["id"], "why": "unlucky"})
            else:
                yield Outcome.keep({"id": rec["id"], "text": rec["text"].upper()}, where, counts={"chars": len(rec["text"])})
    return stage


def clean_run(tmp_path: Path, size: int = 4) -> tuple[bytes, dict]:
    run = StageRun(tmp_path / "clean.parts", size, {"case": "upper"})
    stats = run.run(upper(), items())
    run.merge(tmp_path / "clean.jsonl")
    return (tmp_path / "clean.jsonl").read_bytes(), stats.as_dict()


def test_layout_merge_and_drops_by_reason(tmp_path):
    folder = tmp_path / "out.jsonl.parts"
    run = StageRun(folder, 4, {"case": "upper"}, sink=lambda base: JsonlSink(base, dropped="apart"))
    stats = run.run(upper(), items())
    names = sorted(p.name for p in folder.iterdir())
    assert "run.json" in names and not [n for n in names if n.endswith(".tmp")]
    assert [n for n in names if n.endswith(".done")] == [f"shard-{k:06d}.done" for k in range(6)]  # 23 = 5 * 4 + 3
    assert stats.outcomes == N and stats.shards == 6 and stats.resumed_at == 0
    empty = [i for i in range(N) if i % 5 == 2]
    unlucky = [i for i in range(N) if i % 7 == 3 and i % 5 != 2]
    assert dict(stats.drops) == {"empty document": len(empty), "unlucky": len(unlucky)}
    assert stats.drops.examples["empty document"] == [f"in.jsonl:{i + 1}" for i in empty[:3]]  # first places
    assert stats.kept == N - len(empty) - len(unlucky)
    assert stats.counts["chars"] == sum(len(f"doc {i}") for i in range(N) if i not in empty and i not in unlucky)
    marker = json.loads((folder / "shard-000000.done").read_text())
    assert marker["outcomes"] == 4 and marker["files"]["shard-000000.jsonl"] == (folder / "shard-000000.jsonl").stat().st_size
    run.merge(tmp_path / "out.jsonl")
    run.merge(tmp_path / "out.dropped.jsonl", ".dropped.jsonl")
    kept = [r["id"] for _, r in read_jsonl(tmp_path / "out.jsonl")]
    assert kept == [i for i in range(N) if i not in empty and i not in unlucky]
    assert [r["id"] for _, r in read_jsonl(tmp_path / "out.dropped.jsonl")] == unlucky
    assert StageRun(folder).stats().as_dict() == {**stats.as_dict(), "resumed_at": 0}  # read back from the markers
    run.remove()
    assert not folder.exists()


def test_killed_at_every_input_resumes_to_the_same_bytes(tmp_path):
    reference, ref_stats = clean_run(tmp_path)
    for kill_at in range(N):
        folder = tmp_path / f"k{kill_at}.parts"
        with pytest.raises(Killed):
            StageRun(folder, 4, {"case": "upper"}).run(upper(kill_at=kill_at), items())
        complete = kill_at // 4  # shards before the one the kill came in
        assert StageRun(folder).committed() == complete
        seen: list[int] = []
        run = StageRun(folder, 4, {"case": "upper"})
        stats = run.run(upper(seen), items())
        assert seen == list(range(complete * 4, N))  # complete shards are not redone
        assert stats.resumed_at == complete * 4
        run.merge(tmp_path / f"k{kill_at}.jsonl")
        assert (tmp_path / f"k{kill_at}.jsonl").read_bytes() == reference
        assert {**stats.as_dict(), "resumed_at": 0} == ref_stats  # every drop counted once


def test_sigkill_in_mid_write_then_resume(tmp_path):
    """A real SIGKILL while a shard is half written: the rerun gives the uninterrupted bytes."""
    reference, _ = clean_run(tmp_path, size=5)
    folder = tmp_path / "out.jsonl.parts"
    code = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_stages import JsonlSink, StageRun, items, upper
        write = JsonlSink.write
        def dying(self, outcome):
            write(self, outcome)
            if outcome.record and outcome.record.get("id") == 16:
                self.fh.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        JsonlSink.write = dying
        StageRun({str(folder)!r}, 5, {{"case": "upper"}}).run(upper(), items())
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert sorted(p.name for p in folder.glob("*.done")) == [f"shard-{k:06d}.done" for k in range(3)]
    assert (folder / "shard-000003.jsonl.tmp").read_text()  # the shard in progress, written so far
    run = StageRun(folder, 5, {"case": "upper"})
    assert run.run(upper(), items()).resumed_at == 15
    run.merge(tmp_path / "out.jsonl")
    assert (tmp_path / "out.jsonl").read_bytes() == reference


def test_partial_and_damaged_shards_are_redone(tmp_path):
    reference, _ = clean_run(tmp_path)
    folder = tmp_path / "out.parts"
    StageRun(folder, 4, {"case": "upper"}).run(upper(), items())
    # the state a machine crash can leave: shard 2's file shorter than its marker says, shard 3's
    # marker unreadable, a torn temporary file
    (folder / "shard-000002.jsonl").write_text('{"id": 8}\n')
    (folder / "shard-000003.done").write_text("")
    (folder / "shard-000004.jsonl.tmp").write_text('{"id": 1')
    seen: list[int] = []
    run = StageRun(folder, 4, {"case": "upper"})
    assert run.run(upper(seen), items()).resumed_at == 8 and seen == list(range(8, N))
    run.merge(tmp_path / "out.jsonl")
    assert (tmp_path / "out.jsonl").read_bytes() == reference


def test_resume_checks_settings_and_keeps_its_shard_size(tmp_path):
    reference, _ = clean_run(tmp_path)
    folder = tmp_path / "out.parts"
    with pytest.raises(Killed):
        StageRun(folder, 4, {"case": "upper"}).run(upper(kill_at=13), items())
    with pytest.raises(ResumeError, match=r"unfinished run with different 'case' \('upper', now 'lower'\)"):
        StageRun(folder, 4, {"case": "lower"}).run(upper(), items())
    run = StageRun(folder, 10, {"case": "upper"})  # another shard size: the stored one wins
    assert run.run(upper(), items()).resumed_at == 12 and run.shard_size == 4
    run.merge(tmp_path / "out.jsonl")
    assert (tmp_path / "out.jsonl").read_bytes() == reference


def test_resume_compares_input_fingerprints_by_content(tmp_path):
    """``inputs``: the same bytes under another path resume; other bytes under the same path are
    refused, naming the input; a folder started before inputs were recorded resumes."""
    from ctrltok.core.inputs import file_fingerprint

    reference, _ = clean_run(tmp_path)
    data = tmp_path / "in.jsonl"
    data.write_text("one\ntwo\n")
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(data.read_bytes())
    folder = tmp_path / "out.parts"
    with pytest.raises(Killed):
        StageRun(folder, 4, {"case": "upper"}, inputs={"input": file_fingerprint(data)}).run(upper(kill_at=13), items())
    assert json.loads((folder / "run.json").read_text())["inputs"]["input"]["path"] == str(data)
    data.write_text("one\nTWO\n")  # same size, other contents
    with pytest.raises(ResumeError, match=rf"other inputs: input {data}: contents changed \(8 bytes"):
        StageRun(folder, 4, {"case": "upper"}, inputs={"input": file_fingerprint(data)}).run(upper(), items())
    with pytest.raises(ResumeError, match=rf"other inputs: sidecar none -> {copy}"):
        StageRun(folder, 4, {"case": "upper"}, inputs={"input": file_fingerprint(copy),
                                                       "sidecar": file_fingerprint(copy)}).run(upper(), items())
    run = StageRun(folder, 4, {"case": "upper"}, inputs={"input": file_fingerprint(copy)})
    assert run.run(upper(), items()).resumed_at == 12
    run.merge(tmp_path / "out.jsonl")
    assert (tmp_path / "out.jsonl").read_bytes() == reference

    old = tmp_path / "old.parts"  # run.json without "inputs": nothing to compare with
    with pytest.raises(Killed):
        StageRun(old, 4, {"case": "upper"}).run(upper(kill_at=13), items())
    assert StageRun(old, 4, {"case": "upper"}, inputs={"input": file_fingerprint(data)}).run(
        upper(), items()).resumed_at == 12


def test_info_is_decided_once(tmp_path):
    calls = []

    def decide():
        calls.append(1)
        return {"threshold": 0.5}

    folder = tmp_path / "out.parts"
    with pytest.raises(Killed):
        run = StageRun(folder, 4)
        assert run.begin(decide) == {"threshold": 0.5}
        run.run(upper(kill_at=9), items())
    assert StageRun(folder, 4).begin(decide) == {"threshold": 0.5} and len(calls) == 1


def test_skip_outputs_regenerates_a_stateful_stage(tmp_path):
    """A deduplicating stage sees every input again; the outcomes already written are discarded."""
    texts = [f"t{i % 6}" for i in range(20)]

    def dedup(kill_at=None):
        def stage(inputs):
            seen = set()
            for i, t in enumerate(inputs):
                if i == kill_at:
                    raise Killed
                yield Outcome.dropped("duplicate", str(i)) if t in seen else Outcome.keep({"i": i, "t": t}, str(i))
                seen.add(t)
        return stage

    ref = run_stage(tmp_path / "ref.jsonl", dedup(), texts, skip="outputs", shard_size=3)
    with pytest.raises(Killed):
        run_stage(tmp_path / "out.jsonl", dedup(kill_at=11), texts, skip="outputs", shard_size=3)
    done = run_stage(tmp_path / "out.jsonl", dedup(), texts, skip="outputs", shard_size=3)
    assert (tmp_path / "out.jsonl").read_bytes() == (tmp_path / "ref.jsonl").read_bytes()
    assert done["dropped"] == ref["dropped"] == {"duplicate": 14} and done["resumed_at"] == 9


def test_run_stage_marker_and_info(tmp_path):
    calls = []

    def stage(inputs):
        for x in inputs:
            calls.append(x)
            yield Outcome.keep({"x": x}) if x % 2 else Outcome.dropped("even", str(x), record={"x": x})

    done = run_stage(tmp_path / "s.jsonl", stage, range(5), shard_size=2, info=lambda: {"stats": {"docs": 5}})
    assert [r["x"] for _, r in read_jsonl(tmp_path / "s.jsonl")] == [0, 1, 2, 3, 4]  # drops inline by default
    assert done["dropped"] == {"even": 3} and done["kept"] == 2 and done["stats"] == {"docs": 5}
    assert json.loads((tmp_path / "s.done").read_text()) == done and not (tmp_path / "s.parts").exists()
    assert run_stage(tmp_path / "s.jsonl", stage, range(5)) == done and len(calls) == 5  # done: not run again


def test_a_stage_must_give_one_outcome_per_input(tmp_path):
    def greedy(inputs):
        for x in inputs:
            yield Outcome.keep({"x": x})
            yield Outcome.keep({"x": x})

    with pytest.raises(RuntimeError, match="one outcome per input"):
        StageRun(tmp_path / "p", 4).run(greedy, range(3))
    with pytest.raises(TypeError, match="Outcome"):
        StageRun(tmp_path / "q", 4).run(lambda xs: ({"x": x} for x in xs), range(3))


def test_merge_append_with_a_key_adds_nothing_twice(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"k": "a"}\n{"k": "b"}\n{"k": "torn')
    run = StageRun(tmp_path / "p", 2)
    run.run(lambda xs: (Outcome.keep({"k": x}) for x in xs), ["c", "d", "e"])
    run.merge(out, append=True, key=lambda r: r["k"])
    run.merge(out, append=True, key=lambda r: r["k"])  # redone after a kill before the removal
    assert [r["k"] for _, r in read_jsonl(out)] == ["a", "b", "c", "d", "e"]


def test_read_jsonl_names_the_line_and_repairs_a_torn_end(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n{"a": 3')
    with pytest.raises(ValueError, match=r"a.jsonl:4: the last line is incomplete"):
        list(read_jsonl(path))
    assert [(w.rsplit(":", 1)[1], r["a"]) for w, r in read_jsonl(path, repair=True)] == [("1", 1), ("3", 2)]
    assert path.read_text() == '{"a": 1}\n\n{"a": 2}\n' and repair_jsonl(path) == 0
    path.write_text('{"a": 1}\n[2]\n')
    with pytest.raises(ValueError, match=r"a.jsonl:2: expected a JSON object"):
        list(read_jsonl(path))
    path.write_text("no newline at all")
    assert repair_jsonl(path) == 17 and path.read_text() == ""


def _square(x: int) -> int:
    return x * x + _OFFSET.get("v", 0)


_OFFSET: dict[str, int] = {}


def _init(v: int) -> None:
    _OFFSET["v"] = v


def test_map_ordered_keeps_the_input_order_across_processes():
    one = list(map_ordered(_square, range(40), processes=1, initializer=_init, initargs=(1,)))
    two = list(map_ordered(_square, range(40), processes=2, initializer=_init, initargs=(1,), in_flight=3))
    assert one == two == [x * x + 1 for x in range(40)]


def test_a_sink_can_write_other_formats(tmp_path):
    """Shards need not be JSON lines: a binary sink, shards kept in place (no merge)."""
    class Uint16Sink:
        def __init__(self, base: Path):
            self.path = Path(f"{base}.bin.tmp")
            self.fh = open(self.path, "wb")

        def write(self, outcome):
            if outcome.drop is None:
                self.fh.write(int(outcome.record).to_bytes(2, "little"))

        def close(self):
            self.fh.close()
            return [self.path]

        def abort(self):
            self.fh.close()

    def ids(kill_at=None):
        def stage(xs):
            for x in xs:
                if x == kill_at:
                    raise Killed
                yield Outcome.keep(x)
        return stage

    with pytest.raises(Killed):
        StageRun(tmp_path / "tokens", 4, sink=Uint16Sink).run(ids(kill_at=9), range(12))
    run = StageRun(tmp_path / "tokens", 4, sink=Uint16Sink)
    assert run.run(ids(), range(12)).resumed_at == 8
    data = b"".join(p.read_bytes() for p in run.shard_files(".bin"))
    assert [int.from_bytes(data[i:i + 2], "little") for i in range(0, len(data), 2)] == list(range(12))
    assert os.path.getsize(run.shard_files(".bin")[0]) == 8
