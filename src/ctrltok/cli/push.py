"""`ctrltok push DIR --repo OWNER/NAME [--private] [--revision BRANCH] [--exclude PATTERN] [--dry-run]`:
upload a saved model folder to the Hugging Face Hub, without its training checkpoints
(:func:`ctrltok.training.publish.publish`). Its arguments are ``_a_push`` in ``cli/main.py``."""

from __future__ import annotations

import sys

from ctrltok.training.publish import publish


def push(a) -> int:
    done = publish(a.path, a.repo, private=a.private, revision=a.revision, exclude=a.exclude,
                   commit_message=a.message, dry_run=a.dry_run)
    where = f"{done.repo}@{done.revision}" if done.revision else done.repo
    if a.dry_run:
        for path in done.files:
            print(path)
        print(f"would upload {len(done.files)} files to {where} (dry run: nothing sent)", file=sys.stderr)
        return 0
    print(f"uploaded {len(done.files)} files to {where}: {done.url or 'https://huggingface.co/' + done.repo}")
    return 0
