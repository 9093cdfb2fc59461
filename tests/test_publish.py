"""`ctrltok push` / `train.push_to_hub`: up to the upload call, with the file list checked (no network).

`HfApi` is replaced by a subclass whose network calls record their arguments; its `upload_folder`
computes the files to send with huggingface_hub's own folder listing
(`HfApi._prepare_upload_folder_additions`, given the patterns `upload_folder` would pass it), so the
list checked is what the real upload would send.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub import HfApi
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS

from ctrltok.cli.push import push
from ctrltok.core.config import recipe_from_mapping
from ctrltok.training import publish as publish_module
from ctrltok.training.publish import PublishError, publish, upload_files

SENT = ["README.md", "additional_chat_templates/chatml.jinja", "additional_chat_templates/eot.jinja",
        "chat_template.jinja", "config.json", "ctrltok.json", "generation_config.json", "loss_curves.png",
        "metrics.jsonl", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
LEFT_OUT = ["checkpoints/step-000020/state.json", "checkpoints/step-000020/optimizer.pt",
            "checkpoints/step-000040.tmp/model.safetensors", "README.md.tmp", "ctrltok.json.tmp",
            ".git/HEAD"]


def _write(path: Path, text: str = "x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """What `ctrltok train --out DIR` leaves, checkpoints and an interrupted temporary file included."""
    out = tmp_path / "eot-run"
    for name in SENT + LEFT_OUT:
        _write(out / name)
    _write(out / "README.md", "---\nlibrary_name: transformers\n---\n\n# eot-run\n")
    _write(out / "ctrltok.json", json.dumps({"template": "eot", "complete": True}))
    return out


class FakeApi(HfApi):
    """HfApi with its network calls recorded instead of made."""

    calls: list[tuple[str, dict]] = []
    sent: list[str] = []

    def create_repo(self, **kw):
        FakeApi.calls.append(("create_repo", kw))
        name = kw["repo_id"] if "/" in kw["repo_id"] else f"me/{kw['repo_id']}"
        return SimpleNamespace(repo_id=name)

    def create_branch(self, **kw):
        FakeApi.calls.append(("create_branch", kw))

    def _validate_yaml(self, content, **kw):  # the Hub validates the card's YAML; here: it parses
        FakeApi.calls.append(("validate_yaml", {"content": content}))

    def upload_folder(self, **kw):
        FakeApi.calls.append(("upload_folder", kw))
        ops = self._prepare_upload_folder_additions(kw["folder_path"], "",
                                                    ignore_patterns=list(kw["ignore_patterns"]) + DEFAULT_IGNORE_PATTERNS,
                                                    repo_type=kw.get("repo_type"))
        FakeApi.sent = [op.path_in_repo for op in ops]
        return SimpleNamespace(commit_url=f"https://huggingface.co/{kw['repo_id']}/commit/0123abc")


@pytest.fixture
def fake_hub(monkeypatch):
    FakeApi.calls, FakeApi.sent = [], []
    monkeypatch.setattr(publish_module, "HfApi", FakeApi)
    return FakeApi


def _names(calls):
    return [name for name, _ in calls]


def _call(calls, name):
    return next(kw for n, kw in calls if n == name)


def test_publish_uploads_the_folder_without_checkpoints(run_dir, fake_hub):
    done = publish(run_dir, "me/smollm2-eot")
    assert _names(fake_hub.calls) == ["create_repo", "upload_folder", "validate_yaml"]  # the card's YAML checked
    create = _call(fake_hub.calls, "create_repo")
    assert create == {"repo_id": "me/smollm2-eot", "repo_type": "model", "private": False, "exist_ok": True}
    upload = _call(fake_hub.calls, "upload_folder")
    assert upload["repo_id"] == "me/smollm2-eot" and Path(upload["folder_path"]) == run_dir
    assert upload["revision"] is None and "checkpoints/*" in upload["ignore_patterns"]
    # the file list: everything of the model, nothing of the checkpoints or of an interrupted write
    assert sorted(fake_hub.sent) == sorted(SENT)
    assert not [p for p in fake_hub.sent if p.startswith("checkpoints/") or p.endswith(".tmp") or ".git" in p]
    assert sorted(done.files) == sorted(fake_hub.sent) == sorted(upload_files(run_dir))
    assert done.url == "https://huggingface.co/me/smollm2-eot/commit/0123abc"
    assert (run_dir / "checkpoints" / "step-000020" / "state.json").exists()  # the folder stays resumable


def test_private_revision_and_extra_excludes(run_dir, fake_hub):
    done = publish(run_dir, "me/x", private=True, revision="v1", exclude=["metrics.jsonl", "ctrltok.json"],
                   commit_message="first")
    assert _names(fake_hub.calls) == ["create_repo", "create_branch", "upload_folder", "validate_yaml"]
    assert _call(fake_hub.calls, "create_repo")["private"] is True
    assert _call(fake_hub.calls, "create_branch") == {"repo_id": "me/x", "repo_type": "model", "branch": "v1",
                                                      "exist_ok": True}
    upload = _call(fake_hub.calls, "upload_folder")
    assert upload["revision"] == "v1" and upload["commit_message"] == "first"
    assert sorted(fake_hub.sent) == sorted(set(SENT) - {"metrics.jsonl", "ctrltok.json"}) == sorted(done.files)


def test_a_bare_name_is_the_logged_in_users(run_dir, fake_hub):
    done = publish(run_dir, "smollm2-eot")
    assert done.repo == "me/smollm2-eot" and _call(fake_hub.calls, "upload_folder")["repo_id"] == "me/smollm2-eot"


def test_dry_run_sends_nothing(run_dir, monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("a dry run must not build an HfApi")

    monkeypatch.setattr(publish_module, "HfApi", no_network)
    done = publish(run_dir, "me/x", dry_run=True)
    assert sorted(done.files) == sorted(SENT) and done.url is None


def test_refused_before_any_network(run_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(publish_module, "HfApi", lambda *a, **k: pytest.fail("no API call expected"))
    with pytest.raises(PublishError, match="not a Hub repository name"):
        publish(run_dir, "me/x/y")
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        publish(tmp_path / "absent", "me/x")
    (run_dir / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        publish(run_dir, "me/x")
    _write(run_dir / "config.json", "{}")
    _write(run_dir / "ctrltok.json", json.dumps({"complete": False}))
    with pytest.raises(PublishError, match="did not finish"):
        publish(run_dir, "me/x")


def test_an_adapter_only_folder_is_published_as_it_is(run_dir, fake_hub):
    """`save.merged: false`: no config.json, no weights of its own; the adapter is the model."""
    for name in ("config.json", "model.safetensors"):
        (run_dir / name).unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):  # not yet a model: no adapter either
        publish(run_dir, "me/x")
    _write(run_dir / "adapter" / "adapter_config.json", "{}")
    with pytest.raises(FileNotFoundError, match="no adapter weights"):
        publish(run_dir, "me/x")
    _write(run_dir / "adapter" / "adapter_model.safetensors")
    publish(run_dir, "me/x")
    assert sorted(fake_hub.sent) == sorted(set(SENT) - {"config.json", "model.safetensors"}
                                           | {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"})


def test_cli_push(run_dir, fake_hub, capsys):
    args = argparse.Namespace(path=str(run_dir), repo="me/x", private=False, revision=None, exclude=[],
                              message=None, dry_run=False)
    assert push(args) == 0
    out = capsys.readouterr().out
    assert f"uploaded {len(SENT)} files to me/x: https://huggingface.co/me/x/commit/0123abc" in out
    args.dry_run = True
    fake_hub.calls.clear()
    assert push(args) == 0
    captured = capsys.readouterr()
    assert captured.out.split() == upload_files(run_dir) and "dry run" in captured.err
    assert fake_hub.calls == []


def test_recipe_push_to_hub_field():
    data = {"train": "ctrltok:instructions"}
    assert recipe_from_mapping({"data": data}).train.push_to_hub is None
    assert recipe_from_mapping({"data": data, "train": {"push_to_hub": "me/x"}}).train.push_to_hub == "me/x"
