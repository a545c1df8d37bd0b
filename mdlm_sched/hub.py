"""The Hugging Face hub, where there is network: files of a repository, from the local cache first.

Without network, huggingface_hub retries a download for about a minute and prints a page of
warnings; here a name that is not in the local cache fails at once, with one line, when the hub
cannot be reached.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from mdlm_sched.errors import CheckpointError


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether a connection to the hub's endpoint can be opened now (False when HF_HUB_OFFLINE is set)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout_s).close()
    except OSError:
        return False
    return True


HUB_PREFIX = "hf:"  # a model or data set named by its hub repository: hf:REPO[@REVISION]


def local_path(name: str, what: str) -> Path:
    """The local path of a model named `name`: hf:REPO[@REVISION] is fetched (the cache first), anything else is
    a path as given. what: the setting that names it, for the error."""
    if not name.startswith(HUB_PREFIX):
        return Path(name).expanduser()
    repo, _, revision = name[len(HUB_PREFIX):].partition("@")
    return snapshot(repo, revision or None, what)


def snapshot(repo: str, revision: str | None, what: str, allow_patterns: list[str] | None = None) -> Path:
    """The local folder of a hub repository at `revision` (the cache if it holds it, else a download).

    what: what the repository is for, in the error ("judge gpt2-large", "model large=hf:...").
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError:
        raise CheckpointError(f"{what}: {repo!r} is not a hub repository name; write NAME or OWNER/NAME, e.g. "
                              f"hf:kuleshov-group/mdlm-owt[@REVISION]") from None
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=allow_patterns, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    if not hub_reachable():
        raise CheckpointError(f"{what}: {repo} is not in the local Hugging Face cache and the hub cannot be reached; "
                              f"give a local folder, or download it where there is network "
                              f"(huggingface-cli download {repo})")
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=allow_patterns))
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise CheckpointError(f"{what}: {repo}{'@' + revision if revision else ''} cannot be downloaded "
                              f"({' '.join(str(exc).split())[:200]}); check the name and revision") from None
