"""The Hugging Face hub, where there is network: files of a repository, from the local cache first.

Whether the hub can be reached is huggingface_hub's own judgement (its endpoint, proxy settings and
HF_HUB_OFFLINE): when it cannot, and the local cache lacks the repository, the error is one line.
"""

from __future__ import annotations

from pathlib import Path

from mdlm_sched.errors import CheckpointError


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
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=allow_patterns))
    except LocalEntryNotFoundError:  # huggingface_hub's answer when the hub cannot be reached (or HF_HUB_OFFLINE)
        raise CheckpointError(f"{what}: {repo} is not in the local Hugging Face cache and the hub cannot be reached; "
                              f"give a local folder, or download it where there is network "
                              f"(huggingface-cli download {repo})") from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise CheckpointError(f"{what}: {repo}{'@' + revision if revision else ''} cannot be downloaded "
                              f"({' '.join(str(exc).split())[:200]}); check the name and revision") from None
