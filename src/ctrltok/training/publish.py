"""Publishing a saved model folder to the Hugging Face Hub (``ctrltok push``, ``train.push_to_hub``).

::

    publish("runs/eot-cpu", "me/smollm2-eot", private=True)

creates the repository if needed (``HfApi.create_repo(exist_ok=True)``), the branch when a
``revision`` is named, and uploads the folder in one commit with ``HfApi.upload_folder``. The card
``train`` wrote (``README.md``) becomes the repository's model card; the trained chat template is
the tokenizer's default (``chat_template.jinja``), so the Hub widget, ``pipeline`` and servers
render the format the model learned.

What is left out, and why excluded rather than moved: the training checkpoints live in
``DIR/checkpoints/step-N`` (optimizer state, 57 MB for the demo's 135M model), which is where
``train`` looks to resume a run (:func:`ctrltok.training.checkpoint.latest_checkpoint`). Moving them
to a sibling folder would change that contract for every run, and a run that was pushed could no
longer be resumed or extended by rerunning the same command; so the folder keeps its layout and the
upload skips them with ``ignore_patterns`` (:data:`IGNORE`: the checkpoints and temporary files of
an interrupted write), plus whatever the caller adds. :func:`upload_files` lists exactly what
``upload_folder`` will send (the same listing and the same pattern matcher, including
``huggingface_hub``'s own defaults such as ``.git/``), so ``ctrltok push --dry-run`` shows it without
the network.

A folder whose manifest says the final save did not finish (``complete: false``: the run was
killed while saving) is refused, as is a folder with no model in it. A LoRA run saved with
``save.merged: false`` is published as what it holds: the adapter (``adapter/``), the tokenizer,
the card and the manifest, which ``ctrltok generate`` reads back onto the base.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import (
    DEFAULT_IGNORE_PATTERNS,
    filter_repo_objects,
    validate_repo_id,
)

from ctrltok.core.models import ADAPTER, ADAPTER_WEIGHTS, adapter_only
from ctrltok.training.checkpoint import MANIFEST, RunManifest, checkpoint_root

TEMPORARY = ["*.tmp", "*.tmp/*"]  # atomic writes in flight (card, manifest, checkpoints)


class PublishError(ValueError):
    """A folder that cannot be published as it is, or a repository name the Hub refuses."""


def ignore_patterns(out_dir: str | Path, exclude: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The patterns ``upload_folder`` skips: the training checkpoints, temporary files, ``exclude``."""
    out_dir = Path(out_dir)
    checkpoints = checkpoint_root(out_dir).relative_to(out_dir).as_posix()
    return [f"{checkpoints}/*", *TEMPORARY, *exclude]


IGNORE = ignore_patterns(Path("."))


@dataclass
class Published:
    """What was (or, dry, would be) uploaded: the repository, its revision, the files, the commit URL."""

    repo: str
    revision: str | None
    files: list[str] = field(default_factory=list)
    url: str | None = None
    private: bool = False


def upload_files(out_dir: str | Path, exclude: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The paths (relative, POSIX) ``upload_folder`` sends from ``out_dir``, in its order."""
    folder = Path(out_dir).expanduser().resolve()
    paths = [p.relative_to(folder).as_posix() for p in sorted(folder.glob("**/*")) if p.is_file()]
    patterns = ignore_patterns(folder, exclude) + list(DEFAULT_IGNORE_PATTERNS)
    return list(filter_repo_objects(paths, ignore_patterns=patterns))


def check_publishable(out_dir: str | Path, repo: str | None = None) -> None:
    """Refuse a folder that is not a finished saved model, or a malformed repository name (clear
    errors, before any network)."""
    out_dir = Path(out_dir)
    if repo is not None:
        try:
            validate_repo_id(repo)
        except HFValidationError as exc:
            raise PublishError(f"{repo!r} is not a Hub repository name (owner/name): {exc}") from exc
    if not out_dir.is_dir():
        raise FileNotFoundError(f"{out_dir}: no such model folder")
    if adapter_only(out_dir):  # save.merged: false: the adapter is the model
        if not (out_dir / ADAPTER / ADAPTER_WEIGHTS).is_file():
            raise FileNotFoundError(f"{out_dir / ADAPTER}: no adapter weights ({ADAPTER_WEIGHTS})")
    elif not (out_dir / "config.json").is_file():
        raise FileNotFoundError(f"{out_dir}: no config.json; not a saved model folder (the output of ctrltok train "
                                "or add-tokens)")
    elif not any(out_dir.glob("*.safetensors")) and not any(out_dir.glob("*.bin")):
        raise FileNotFoundError(f"{out_dir}: no model weights (*.safetensors)")
    manifest = RunManifest.read(out_dir)
    if manifest.exists and not manifest.complete:
        raise PublishError(f"{out_dir / MANIFEST}: the final save did not finish (complete: false); rerun the same "
                           "ctrltok train command to finish it before pushing")


def publish(out_dir: str | Path, repo: str, *, private: bool = False, revision: str | None = None,
            exclude: list[str] | tuple[str, ...] = (), commit_message: str | None = None,
            token: str | None = None, dry_run: bool = False, api: Any = None) -> Published:
    """Upload the model folder ``out_dir`` to the Hub repository ``repo`` (``owner/name``; a bare
    name is the logged-in user's), without its training checkpoints. ``private`` applies when the
    repository is created; ``revision`` is a branch, created from the main branch when missing.
    ``token``: ``None`` uses the login (``hf auth login``) or ``HF_TOKEN``. ``dry_run`` checks and
    lists, and sends nothing."""
    out_dir = Path(out_dir)
    check_publishable(out_dir, repo)
    files = upload_files(out_dir, exclude)
    done = Published(repo, revision, files, None, private)
    if dry_run:
        return done
    api = api if api is not None else HfApi(token=token)
    created = api.create_repo(repo_id=repo, repo_type="model", private=private, exist_ok=True)
    repo = getattr(created, "repo_id", None) or repo  # `name` alone lands under the logged-in user
    done.repo = repo
    if revision:
        api.create_branch(repo_id=repo, repo_type="model", branch=revision, exist_ok=True)
    info = api.upload_folder(repo_id=repo, repo_type="model", folder_path=str(out_dir), revision=revision,
                             ignore_patterns=ignore_patterns(out_dir, exclude),
                             commit_message=commit_message or f"Upload {out_dir.resolve().name} (ctrltok)")
    done.url = getattr(info, "commit_url", None) or (str(info) if info is not None else None)
    return done
