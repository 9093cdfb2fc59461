"""`ctrltok demo --quick` end to end in a subprocess, on a tiny random Llama with the real tokenizer.

The demo is the first thing a user runs (`make demo`) and it wires a dozen library calls together;
a moved function broke it once while every library test passed. The tiny model keeps this to
seconds: what is checked is the plumbing and the files the demo promises, not the outcome (the
outcome is measured on SmolLM2 by `make demo` itself)."""

from __future__ import annotations

import json
import subprocess
import sys


def test_demo_quick_runs_end_to_end_and_writes_what_it_lists(tiny_model_dir, tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "ctrltok", "demo", "--quick", "--steps", "2",
                           "--model", str(tiny_model_dir), "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    run_dir = out / "eot-model"
    for name in ("config.json", "model.safetensors", "README.md", "metrics.jsonl", "ctrltok.json",
                 "chat_template.jinja", "loss_curves.png"):
        assert (run_dir / name).is_file(), name
    evaluation = json.loads((run_dir / "demo_evaluation.json").read_text())
    assert set(evaluation) == {"before", "after"}
    assert (out / "epe-tokenizer" / "tokenizer.json").is_file()
    assert "done in" in proc.stdout
