"""Models named by Hugging Face Hub id: `org/name[@revision]` -> a local snapshot.

    model = resolve_hub_model("HuggingFaceTB/SmolLM2-135M@main")   # HubModel
    digest = store_hub_model(store, "HuggingFaceTB/SmolLM2-135M")   # a source artifact

Only safetensors weights and the config / tokenizer files are fetched (allow_patterns:
never a pickle), through huggingface_hub with the user's cache and token, as it would.
Offline (HF_HUB_OFFLINE=1, tailwise's default unless the user set it) only the cache is
read: a cached model resolves, an uncached one is a one-line HubError. A local path
that exists always wins over a Hub id (the callers check it first). The stored
artifact's manifest records the repo, the commit the revision resolved to and each
file's Hub blob id, so its lineage names exactly which weights were used.

No torch here: flows import this module.
"""

from __future__ import annotations

import fnmatch
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steps.core.errors import TailwiseError, one_line
from steps.core.store import ArtifactStore

# What a Hugging Face model directory needs beside the weights (never weights, never pickles).
HF_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "vocab.txt",
                 "merges.txt", "tokenizer.model", "added_tokens.json")
ALLOW_PATTERNS = ("*.safetensors", "*.safetensors.index.json", *HF_SIDE_FILES)
# The Hub's rules for a repo id (huggingface_hub.utils.validate_repo_id), with the org
# required, and an optional @revision (branch, tag or commit hash).
_HUB_ID = re.compile(
    r"(?P<repo>[\w][\w.-]{0,95}/[\w][\w.-]{0,95})(?:@(?P<revision>[\w./-]{1,200}))?")


class HubError(TailwiseError, ValueError):
    """A Hub id that cannot be resolved: the message names it and why."""


@dataclass(frozen=True)
class HubModel:
    """A Hub repo at one commit, and the files of it tailwise reads."""

    repo_id: str
    requested: str  # the revision asked for (branch, tag or commit)
    revision: str  # the commit hash it resolved to
    snapshot: Path  # huggingface_hub's snapshot folder (links into the repo's blobs)
    files: dict[str, Path]  # relative path -> file, only ALLOW_PATTERNS

    def source(self) -> dict[str, Any]:
        """What the source artifact's manifest records: repo, commit, each file's blob id
        (the SHA-256 of an LFS file such as the weights, the git blob id of the others)."""
        return {"hub": self.repo_id, "requested_revision": self.requested,
                "revision": self.revision, "endpoint": _endpoint(),
                "files": {rel: path.resolve().name for rel, path in self.files.items()}}


def parse_hub_id(text: str) -> tuple[str, str] | None:
    """(repo_id, revision) of `org/name[@revision]`, or None when `text` is not one."""
    match = _HUB_ID.fullmatch(text)
    if match is None or "--" in match["repo"] or ".." in match["repo"]:
        return None
    revision = match["revision"] or "main"
    if ".." in revision:
        return None
    return match["repo"], revision


def is_hub_id(text: str) -> bool:
    """Whether `text` names a Hub model rather than a local path (a path that exists wins)."""
    return parse_hub_id(text) is not None and not Path(text).exists()


def resolve_hub_model(hub_id: str) -> HubModel:
    """The snapshot of `org/name[@revision]` (downloaded unless offline); HubError otherwise."""
    parsed = parse_hub_id(hub_id)
    if parsed is None:
        raise HubError(f"{hub_id!r} is not a Hub model id (org/name[@revision])")
    repo_id, revision = parsed
    offline = hub_offline()
    folder = Path(_snapshot(hub_id, repo_id, revision, offline))
    files = {path.relative_to(folder).as_posix(): path for path in sorted(folder.rglob("*"))
             if path.is_file() and _allowed(path.relative_to(folder).as_posix())}
    if not any(name.endswith(".safetensors") for name in files):
        raise HubError(f"{hub_id} (commit {folder.name[:12]}): no safetensors weights"
                       f"{' in the cache' if offline else ''}; tailwise never loads pickles "
                       "(convert a state dict with `tailwise convert`)")
    return HubModel(repo_id, revision, folder.name, folder, files)


def store_hub_model(store: ArtifactStore, hub_id: str) -> str:
    """Put the resolved snapshot's files into `store` as a model source artifact; its digest.

    The files are stored as they are in huggingface_hub's cache (the snapshot's links are
    followed into the repo's blob folder only), and the manifest's `source` says where
    they came from.
    """
    model = resolve_hub_model(hub_id)
    with tempfile.TemporaryDirectory(prefix="tailwise-hub-") as scratch:
        staging = Path(scratch) / f"{model.repo_id.split('/')[1]}@{model.revision[:12]}"
        for rel, path in model.files.items():
            link = staging / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(path.resolve())
        repo_folder = model.snapshot.parent.parent  # models--org--name
        manifest = store.put(staging, "model", source=model.source(),
                             links_into=repo_folder.resolve())
    return manifest.digest


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it, at call time (tailwise sets it to 1 unless
    the user set it; an explicit 0 goes online)."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_cache_dir() -> Path:
    """huggingface_hub's cache folder, read from the environment now (HF_HUB_CACHE, else
    HF_HOME/hub, else its default) so a process that changes them is followed."""
    if cache := os.environ.get("HF_HUB_CACHE"):
        return Path(cache).expanduser()
    if home := os.environ.get("HF_HOME"):
        return Path(home).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _snapshot(hub_id: str, repo_id: str, revision: str, offline: bool) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache = hub_cache_dir()
    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=list(ALLOW_PATTERNS),
                                 cache_dir=cache, local_files_only=offline)
    except LocalEntryNotFoundError:
        if offline:
            raise HubError(f"{hub_id}: not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE"
                           " is on (tailwise's default): run once with HF_HUB_OFFLINE=0 to "
                           "download it, or give a local path") from None
        raise HubError(f"{hub_id}: the Hub cannot be reached and the model is not in the cache "
                       f"({cache})") from None
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as error:
        raise HubError(f"{hub_id}: {one_line(str(error).splitlines()[0])}") from None
    except (HfHubHTTPError, OSError, ValueError) as error:
        raise HubError(f"{hub_id}: cannot fetch it ({one_line(error)[:200]})") from None


def _allowed(relative: str) -> bool:
    return any(fnmatch.fnmatch(relative, pattern) for pattern in ALLOW_PATTERNS)


def _endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")
