"""Experiment tracking through accelerate (`train.report_to`), offline: W&B in offline mode leaves a
run folder whose `.wandb` log holds the logged metrics, trackio keeps them in its local SQLite store,
and a tracker whose package is missing is a one-line error before the model loads. TensorBoard's
event files are checked in test_serving.py. Nothing here may reach the network: connections to
anything but this machine fail the test."""

from __future__ import annotations

import json
import socket
import struct
import sys
from pathlib import Path

import pytest

from ctrltok.core.config import ConfigError, recipe_from_mapping
from ctrltok.training import train as train_module
from ctrltok.training.train import train


def _recipe(model, report_to: list[str]):
    return recipe_from_mapping({
        "name": "tracked", "model": {"name": str(model)}, "tokens": {"presets": ["eot"]},
        "data": {"train": "ctrltok:instructions", "template": "eot", "max_length": 128, "limit": 24},
        "train": {"max_steps": 2, "lr": 1e-3, "micro_batch_size": 2, "log_every": 1, "report_to": report_to}})


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def no_network(monkeypatch):
    """Connections to other machines raise (and are recorded); local sockets (a tracker's own service) pass."""
    attempts: list = []
    connect = socket.socket.connect

    def guarded(self, address):
        local = self.family == getattr(socket, "AF_UNIX", None) or (
            isinstance(address, tuple) and str(address[0]) in ("127.0.0.1", "::1", "localhost"))
        if not local:
            attempts.append(address)
            raise OSError(f"test_trackers: no network ({address})")
        return connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    return attempts


def read_wandb_log(path: Path) -> list:
    """The records of a `.wandb` transaction log, decoded with wandb's own protobuf messages.

    The file is a 7-byte header (`:W&B`, magic, version), then LevelDB's log format: 32 KiB blocks of
    chunks, each `crc32 (4) | length (2, LE) | type (1: full, 2: first, 3: middle, 4: last)`; a
    block's last bytes, when fewer than a chunk header, are padding. (wandb 0.31 ships no reader of its own.)
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a wandb transaction log"
    records, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


@pytest.mark.slow
def test_wandb_offline_run_holds_the_logged_metrics(tmp_path, tiny_model_dir, monkeypatch, no_network):
    pytest.importorskip("wandb")
    for key in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")  # no login, nothing sent: the run is written to WANDB_DIR
    monkeypatch.setenv("WANDB_SILENT", "true")
    for key, sub in (("WANDB_DIR", "wandb-dir"), ("WANDB_CONFIG_DIR", "wandb-config"),
                     ("WANDB_CACHE_DIR", "wandb-cache"), ("WANDB_DATA_DIR", "wandb-data")):
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(key, str(tmp_path / sub))
    out = tmp_path / "run"
    train(_recipe(tiny_model_dir, ["wandb"]), out, progress=False)

    runs = sorted((tmp_path / "wandb-dir").glob("wandb/offline-run-*"))
    assert len(runs) == 1, f"expected one offline run folder, found {runs}"
    logs = list(runs[0].glob("run-*.wandb"))
    assert len(logs) == 1
    records = read_wandb_log(logs[0])
    history = [{(i.key or ".".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    config = {i.key: json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "config"
              for i in r.config.update}
    train_lines = [m for m in _metrics(out) if "loss" in m]
    logged = {h["_step"]: h for h in history}
    assert sorted(logged) == [0, 1, 2], "the held-out loss at step 0 and both train steps"
    for line in train_lines:  # the same values as metrics.jsonl, at the same steps
        assert logged[line["step"]]["loss"] == pytest.approx(line["loss"])
        assert logged[line["step"]]["lr"] == pytest.approx(line["lr"])
    final_eval = [m for m in _metrics(out) if "eval_loss" in m][-1]
    assert logged[2]["eval_loss"] == pytest.approx(final_eval["eval_loss"])
    assert config["train.max_steps"] == 2 and config["data.template"] == "eot"  # the recipe's values as config
    assert no_network == []


@pytest.mark.slow
def test_trackio_logs_locally(tmp_path, tiny_model_dir, monkeypatch, no_network):
    pytest.importorskip("trackio")
    for key in ("TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL", "TRACKIO_BUCKET_ID", "TRACKIO_DATASET_ID"):
        monkeypatch.delenv(key, raising=False)  # any of these would send the run to a Space or a server
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    # trackio reads TRACKIO_DIR when it is imported: import it afresh for this test (the old modules come back after)
    for name in [n for n in sys.modules if n == "trackio" or n.startswith("trackio.")]:
        monkeypatch.delitem(sys.modules, name)
    out = tmp_path / "run"
    train(_recipe(tiny_model_dir, ["trackio"]), out, progress=False)

    from trackio.sqlite_storage import SQLiteStorage

    assert (tmp_path / "trackio" / "tracked.db").is_file()
    runs = SQLiteStorage.get_runs("tracked")
    assert len(runs) == 1
    logs = SQLiteStorage.get_logs("tracked", runs[0])
    by_step = {}
    for entry in logs:
        by_step.setdefault(entry["step"], {}).update(entry)
    for line in [m for m in _metrics(out) if "loss" in m]:
        assert by_step[line["step"]]["loss"] == pytest.approx(line["loss"])
    assert "eval_loss" in by_step[0] and "eval_loss" in by_step[2]
    assert no_network == []


def test_a_missing_tracker_package_is_an_error_before_the_model_loads(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import blocked: find_spec says it is not installed

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the tracker check")

    monkeypatch.setattr(train_module, "prepare_model", no_loading)
    with pytest.raises(ConfigError, match=r"train.report_to: 'wandb' needs the `wandb` package \(pip install wandb\)"):
        train(_recipe(tiny_model_dir, ["tensorboard", "wandb"]), tmp_path / "run", progress=False)
    with pytest.raises(ConfigError, match="'nosuch' is not a tracker accelerate knows"):
        train(_recipe(tiny_model_dir, ["nosuch"]), tmp_path / "run2", progress=False)
    assert not (tmp_path / "run").exists() and not (tmp_path / "run2").exists()
