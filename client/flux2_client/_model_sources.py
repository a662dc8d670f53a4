"""Checking `--model` and `--dit` before anything else runs: a folder or repo that does not exist, is gated,
lacks a file or a revision fails in seconds, naming the argument, before embeddings are fetched or a
weight is loaded. Reads only small JSON files (the hub downloads them into its cache, where loading
finds them again)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ._errors import CliError, ExitCode, hub_failure_message

#: Files every pipeline folder/repo (`--model`) and every DiT (`--dit`) must have.
MODEL_FILES = ("vae/config.json", "scheduler/scheduler_config.json")
DIT_FILES = ("transformer/config.json",)


class ModelSourceError(CliError):
    """`--model` / `--dit` cannot be used; the message names the argument and what to do."""

    def __init__(self, message: str):
        super().__init__(message, ExitCode.MODEL)


def looks_like_path(value: str) -> bool:
    """A string a user meant as a folder (hub repo ids are `name` or `owner/name`)."""
    return value.startswith(("/", ".", "~")) or value.count("/") > 1 or (os.sep != "/" and os.sep in value)


def read_json(flag: str, repo: str, filename: str, revision: str | None) -> dict[str, Any] | None:
    """`filename` of folder or hub repo `repo` (None where it has none); hub failures as `ModelSourceError`."""
    from .families import read_repo_json

    try:
        return read_repo_json(repo, filename, revision)
    except ModelSourceError:
        raise
    except (OSError, ValueError) as exc:
        message = hub_failure_message(exc, repo, revision)
        if message is None:
            if isinstance(exc, json.JSONDecodeError):
                message = f"{repo}: {filename} is not valid JSON ({exc})"
            else:
                raise
        raise ModelSourceError(f"{flag}: {message}") from exc


def check_source(flag: str, repo: str, revision: str | None, files: tuple[str, ...]) -> None:
    local = Path(repo).expanduser()
    if local.exists() and not local.is_dir():
        raise ModelSourceError(f"{flag}: {repo} is a file; expected a folder or a hub repo id (owner/name)")
    if not local.exists() and looks_like_path(repo):
        raise ModelSourceError(f"{flag}: no such folder {repo}")
    if local.is_dir() and revision:
        raise ModelSourceError(f"{flag}: {repo} is a local folder; a revision applies to hub repos only")
    for filename in files:
        if read_json(flag, str(local) if local.is_dir() else repo, filename, revision) is None:
            where = "folder" if local.is_dir() else "repo"
            raise ModelSourceError(f"{flag}: the {where} {repo} has no {filename}")


def check_model_sources(
    model: str, dit: str, *, revision: str | None = None, dit_revision: str | None = None, dit_flag: str = "--dit"
) -> None:
    """Raise `ModelSourceError` unless `model` has a VAE and scheduler, `dit` a transformer config, and
    `model` is a FLUX.2 pipeline `families.detect_family` recognises. `dit_flag` names the argument the DiT
    came from ("--model" when the model's own transformer/ is used)."""
    from .families import detect_family

    check_source("--model", model, revision, MODEL_FILES)
    check_source(dit_flag, dit, dit_revision, DIT_FILES)
    try:
        detect_family(model, revision, dit=dit, dit_revision=dit_revision)
    except (OSError, ValueError) as exc:
        message = hub_failure_message(exc, model, revision)
        if message is not None:
            raise ModelSourceError(f"--model: {message}") from exc
        if isinstance(exc, OSError):
            raise
        raise ModelSourceError(f"--{exc}") from None  # "model: X holds a <other pipeline class>; expected ..."
