"""Input fingerprints (``core.inputs``): what the resume checks compare."""

from __future__ import annotations

from ctrltok.core.inputs import (
    ADAPTER,
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    content,
    model_fingerprint,
)


def test_an_adapter_only_model_folder_is_fingerprinted_by_its_adapter(tmp_path):
    """``model.name`` may be a ``save.merged: false`` run: its adapter is its only weights."""
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / ADAPTER).mkdir()
    (tmp_path / ADAPTER / ADAPTER_CONFIG).write_text('{"r": 4}')
    weights = tmp_path / ADAPTER / ADAPTER_WEIGHTS
    weights.write_bytes(b"\0" * 64)
    (tmp_path / ADAPTER / "README.md").write_text("PEFT's card")  # not read as the model
    before = model_fingerprint(str(tmp_path))
    assert [f["path"] for f in before["files"]] == ["tokenizer.json", f"{ADAPTER}/{ADAPTER_CONFIG}",
                                                   f"{ADAPTER}/{ADAPTER_WEIGHTS}"]
    weights.write_bytes(b"\1" * 64)  # retrained: same size, other bytes
    assert content(model_fingerprint(str(tmp_path))) != content(before)
    (tmp_path / ADAPTER / ADAPTER_CONFIG).write_text('{"r": 8}')
    assert content(model_fingerprint(str(tmp_path))) != content(before)


def test_a_merged_folder_is_fingerprinted_by_its_own_weights_not_its_adapter_copy(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 64)
    (tmp_path / ADAPTER).mkdir()
    (tmp_path / ADAPTER / ADAPTER_WEIGHTS).write_bytes(b"\0" * 64)
    assert [f["path"] for f in model_fingerprint(str(tmp_path))["files"]] == ["config.json", "model.safetensors"]
