"""`accelerate launch --cpu --num_processes N`: detecting the one process it starts and reading N."""

from __future__ import annotations

import pytest

from ctrltok.training.launch import (
    RELAUNCHED,
    accelerate_cpu_single,
    requested_processes,
)

PY = "/venv/bin/python"


@pytest.mark.parametrize("cmdline, n", [
    ([PY, "/venv/bin/accelerate", "launch", "--cpu", "--num_processes", "2", "-m", "ctrltok", "train", "r.yaml"], 2),
    ([PY, "/venv/bin/accelerate", "launch", "--cpu", "--num_processes=3", "-m", "ctrltok", "train", "r.yaml"], 3),
    ([PY, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "4", "-m", "ctrltok", "train"], 4),
    ([PY, "/venv/bin/accelerate-launch", "--cpu", "--num_processes", "2", "-m", "ctrltok", "train"], 2),
    # the training command's own flags (--set train.x=1, --out) do not confuse accelerate's parser
    ([PY, "/venv/bin/accelerate", "launch", "--cpu", "--num_processes", "2", "-m", "ctrltok", "train", "r.yaml",
      "--set", "train.max_steps=3", "--out", "d"], 2),
    ([PY, "/venv/bin/accelerate", "launch", "--cpu", "-m", "ctrltok", "train", "r.yaml"], None),
    ([PY, "-m", "ctrltok", "train", "r.yaml"], None),  # not started by accelerate
    ([], None),
])
def test_requested_processes(cmdline, n):
    assert requested_processes(cmdline) == n


def test_requested_processes_from_an_accelerate_config_file(tmp_path):
    cfg = tmp_path / "cpu.yaml"
    cfg.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_CPU\nnum_processes: 2\n"
                   "num_machines: 1\nmixed_precision: 'no'\nuse_cpu: true\n")
    assert requested_processes([PY, "accelerate", "launch", "--cpu", "--config_file", str(cfg), "train.py"]) == 2


def test_only_accelerates_single_cpu_process_is_detected():
    single = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert accelerate_cpu_single(single)
    assert not accelerate_cpu_single({**single, "RANK": "0", "WORLD_SIZE": "2"})  # a real process group
    assert not accelerate_cpu_single({**single, RELAUNCHED: "1"})  # never relaunch twice
    assert not accelerate_cpu_single({**single, "ACCELERATE_USE_CPU": "False"})
    assert not accelerate_cpu_single({"ACCELERATE_USE_CPU": "True"})  # --num_processes 1 sets no address
