"""Sources `hf_hub` and `modelscope`: a snapshot of a hub repository (a model, or a data set) at a pinned revision.

Downloads go to the hub library's own cache (HF_HOME / HF_HUB_CACHE, MODELSCOPE_CACHE), which resumes an
interrupted download, checks each file against the hub's sha256, is shared with every other tool on the machine,
and works offline once filled. With the hub out of reach (HF_HUB_OFFLINE=1, no network, an endpoint that does not
answer or answers 5xx), the cached snapshot of the same revision is used, with a warning saying so; a revision that
is neither reachable nor cached fails naming the repository and the revision. The mirror comes from the environment,
as those libraries read it: HF_ENDPOINT (e.g. https://hf-mirror.com) and MODELSCOPE_ENDPOINT (MODELSCOPE_DOMAIN in
older modelscope releases). An endpoint is not a param because it does not change the bytes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..errors import PtuneError

log = logging.getLogger(__name__)

MODEL, DATASET = "model", "dataset"


def hf_cache() -> Path:
    """Where huggingface_hub keeps its snapshots (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hf_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set: huggingface_hub asks the hub nothing."""
    from huggingface_hub import constants

    return getattr(constants, "is_offline_mode", lambda: constants.HF_HUB_OFFLINE)()


def endpoint(source: str) -> str:
    """The hub the library of `source` (hf_hub, modelscope) talks to, for messages."""
    if source == "hf_hub":
        from huggingface_hub import constants

        return constants.ENDPOINT
    return _modelscope_endpoint()


def noun(repo_type: str) -> str:
    return "data set" if repo_type == DATASET else "model"


def _hf_unreachable(repo_id: str, revision: str, repo_type: str, key: str) -> str | None:
    """Why the Hugging Face hub cannot be asked about `repo_id` (offline mode, no connection, a server error), or
    None when it answered that the revision exists. An answer that it does not (404, 401, gated) is a PtuneError."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    if hf_offline():
        return "HF_HUB_OFFLINE is set"
    endpoint = constants.ENDPOINT
    try:
        HfApi(endpoint=endpoint).repo_info(repo_id, repo_type=repo_type, revision=revision)
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status is None or status >= 500 or status == 429:
            return f"it answered {status}"
        detail = " ".join(str(exc).split())[:400]
        raise PtuneError(
            f"{key}: {repo_id}@{revision} from the Hugging Face hub ({endpoint}): {detail}. Check the id and the "
            f"revision on the {noun(repo_type)}'s page; a gated or private {noun(repo_type)} needs `hf auth login` "
            "(or HF_TOKEN) after accepting its licence on the hub"
        ) from None
    except Exception as exc:  # no connection, DNS, timeout, proxy: whatever the HTTP client raises
        return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    return None


def hf_hub(
    repo_id: str,
    revision: str,
    repo_type: str = MODEL,
    key: str = "fetch_weights.repo",
    ignore_patterns: list[str] | None = None,
) -> Path:
    """The local folder of `repo_id` at `revision`, downloaded into the Hugging Face cache if missing: a folder
    named by the commit (snapshots/<commit>/) of links into the repository's blobs/. `ignore_patterns`: files left
    out of the download (glob patterns, as snapshot_download takes them)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    endpoint = constants.ENDPOINT
    unreachable = _hf_unreachable(repo_id, revision, repo_type, key)
    if unreachable is None:
        try:
            return Path(
                snapshot_download(repo_id, repo_type=repo_type, revision=revision, ignore_patterns=ignore_patterns)
            )
        except LocalEntryNotFoundError as exc:  # the connection dropped after the hub answered
            unreachable = " ".join(str(exc).split())[:300]
        except HfHubHTTPError as exc:
            raise PtuneError(
                f"{key}: {repo_id}@{revision} from the Hugging Face hub ({endpoint}): "
                f"{' '.join(str(exc).split())[:400]}. A gated {noun(repo_type)} needs `hf auth login` (or "
                "HF_TOKEN) after accepting its licence on the hub"
            ) from None
    try:
        cached = Path(
            snapshot_download(
                repo_id, repo_type=repo_type, revision=revision, local_files_only=True, ignore_patterns=ignore_patterns
            )
        )
    except LocalEntryNotFoundError:  # IncompleteSnapshotError too: a download cut short, the hub out of reach
        raise PtuneError(
            f"{key}: {repo_id}@{revision} is not in the Hugging Face cache ({hf_cache()}), or only part of it, and "
            f"the hub ({endpoint}) cannot be reached ({unreachable}). Check the network, or set HF_ENDPOINT to a "
            "mirror (e.g. https://hf-mirror.com); unset HF_HUB_OFFLINE to allow downloads"
        ) from None
    log.warning(
        "the Hugging Face hub (%s) cannot be reached (%s); using the cached snapshot %s of %s %s@%s as it is, "
        "without asking the hub",
        endpoint,
        unreachable,
        cached,
        noun(repo_type),
        repo_id,
        revision,
    )
    return cached


def modelscope_cache() -> Path:
    return Path(os.environ.get("MODELSCOPE_CACHE") or Path.home() / ".cache" / "modelscope")


def _modelscope_endpoint() -> str:
    """The endpoint modelscope will use, for messages: MODELSCOPE_ENDPOINT, else the older MODELSCOPE_DOMAIN."""
    domain = os.environ.get("MODELSCOPE_DOMAIN", "")
    return (
        os.environ.get("MODELSCOPE_ENDPOINT")
        or (domain and (domain if "://" in domain else f"https://{domain}"))
        or "https://www.modelscope.cn"
    )


def modelscope(model_id: str, revision: str, repo_type: str = MODEL, key: str = "fetch_weights.repo") -> Path:
    """The local folder of `model_id` at `revision`, downloaded into the ModelScope cache if missing."""
    what = noun(repo_type)
    section = key.split(".")[0]
    try:
        from modelscope import snapshot_download
        from modelscope.hub.errors import NetworkError
    except ImportError:
        other = (
            f"source: git_lfs with the repository's git URL, https://www.modelscope.cn/{model_id}.git"
            if repo_type == MODEL
            else "source: hf_hub with the same data set on the Hugging Face hub"
        )
        raise PtuneError(
            f"{section}.source: modelscope needs the modelscope package: `pip install -e '.[modelscope]'`; or use "
            f"{other}"
        ) from None
    endpoint = _modelscope_endpoint()
    try:
        return Path(snapshot_download(model_id, revision=revision, repo_type=repo_type))
    except NetworkError as exc:
        unreachable = exc
    except Exception as exc:  # modelscope raises plain exceptions of many kinds; all mean "not fetched"
        detail = " ".join(str(exc).split())[:600]  # its messages span lines: file by file, request, response
        raise PtuneError(
            f"{key}: {model_id}@{revision} from ModelScope ({endpoint}): "
            f"{type(exc).__name__}: {detail}. Check the id and the revision (a commit, branch or tag) "
            f"on the {what}'s page; set MODELSCOPE_ENDPOINT for a mirror, and MODELSCOPE_API_TOKEN for "
            f"a private {what}"
        ) from None
    try:
        cached = Path(snapshot_download(model_id, revision=revision, repo_type=repo_type, local_files_only=True))
    except Exception:
        raise PtuneError(
            f"{key}: {model_id}@{revision} is not in the ModelScope cache ({modelscope_cache()}) and ModelScope "
            f"({endpoint}) cannot be reached: {str(unreachable).splitlines()[0]}. Check the network, or set "
            "MODELSCOPE_ENDPOINT to a reachable mirror"
        ) from None
    # modelscope writes each file whole (a temp name, then a rename), but a killed download can leave files out:
    # the stage still checks the folder, and the user is told it was not compared with the hub.
    log.warning(
        "ModelScope (%s) cannot be reached; using the cached snapshot %s of %s %s@%s as it is, without "
        "checking it against the hub",
        endpoint,
        cached,
        what,
        model_id,
        revision,
    )
    return cached


def refuse_foreign_links(snapshot: Path, within: Path, what: str) -> None:
    """A hub snapshot's symbolic link that leads out of `within` (its repository's folder in the cache), or to
    anything but a regular file, is refused naming it: no file of this machine outside the cache becomes part of
    the pipeline's outputs (read, pushed, served)."""
    root = within.resolve()
    for path in sorted(snapshot.rglob("*")):
        if path.is_symlink():
            real = path.resolve()
            if not real.is_relative_to(root) or not real.is_file():
                raise PtuneError(
                    f"{what}: {path.relative_to(snapshot)} in {snapshot} is a symbolic link to {os.readlink(path)!r}, "
                    f"which is not a file of the hub's cache ({root}); the snapshot was tampered with or is not the "
                    "hub's: delete it and fetch again"
                )


def cached(source: str, repo_id: str, revision: str, repo_type: str = MODEL) -> Path | None:
    """The hub cache's snapshot of `repo_id` at `revision` (source hf_hub or modelscope), or None; asks no hub.
    A PtuneError when the hub's package is missing."""
    if source == "hf_hub":
        from huggingface_hub import snapshot_download

        def local():
            return snapshot_download(repo_id, repo_type=repo_type, revision=revision, local_files_only=True)

    else:
        try:
            from modelscope import snapshot_download as ms_snapshot_download
        except ImportError:
            raise PtuneError("the modelscope package is not installed: `pip install -e '.[modelscope]'`") from None

        def local():
            return ms_snapshot_download(repo_id, revision=revision, repo_type=repo_type, local_files_only=True)

    try:
        return Path(local())
    except Exception:  # not cached, or only part of it: the libraries raise several kinds
        return None
