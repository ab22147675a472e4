"""Sources `hf_hub` and `modelscope`: a snapshot of a hub repository at a pinned revision.

Downloads go to the hub library's own cache (HF_HOME / HF_HUB_CACHE, MODELSCOPE_CACHE), which resumes an
interrupted download, checks each file against the hub's sha256, is shared with every other tool on the machine,
and works offline once filled: HF_HUB_OFFLINE=1 for Hugging Face; for ModelScope, which has no such switch, an
unreachable hub falls back to the cached snapshot of the same revision. The mirror comes from the environment, as
those libraries read it: HF_ENDPOINT (e.g. https://hf-mirror.com) and MODELSCOPE_ENDPOINT (MODELSCOPE_DOMAIN in
older modelscope releases). An endpoint is not a param because it does not change the bytes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..errors import PtuneError

log = logging.getLogger(__name__)


def hf_hub(repo_id: str, revision: str) -> Path:
    """The local folder of `repo_id` at `revision`, downloaded into the Hugging Face cache if missing."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        return Path(snapshot_download(repo_id, revision=revision))
    except LocalEntryNotFoundError as exc:
        raise PtuneError(
            f"fetch_weights.repo: {repo_id}@{revision} is not in the Hugging Face cache and the hub "
            f"({endpoint}) cannot be reached: {exc}. Check the network, or set HF_ENDPOINT to a "
            "mirror (e.g. https://hf-mirror.com); unset HF_HUB_OFFLINE to allow downloads"
        ) from None
    except HfHubHTTPError as exc:
        raise PtuneError(
            f"fetch_weights.repo: {repo_id}@{revision} from {endpoint}: {exc}. A gated model needs "
            "`hf auth login` (or HF_TOKEN) after accepting its licence on the hub"
        ) from None


def _modelscope_endpoint() -> str:
    """The endpoint modelscope will use, for messages: MODELSCOPE_ENDPOINT, else the older MODELSCOPE_DOMAIN."""
    domain = os.environ.get("MODELSCOPE_DOMAIN", "")
    return (
        os.environ.get("MODELSCOPE_ENDPOINT")
        or (domain and (domain if "://" in domain else f"https://{domain}"))
        or "https://www.modelscope.cn"
    )


def modelscope(model_id: str, revision: str) -> Path:
    """The local folder of `model_id` at `revision`, downloaded into the ModelScope cache if missing."""
    try:
        from modelscope import snapshot_download
        from modelscope.hub.errors import NetworkError
    except ImportError:
        raise PtuneError(
            "fetch_weights.source: modelscope needs the modelscope package: "
            "`pip install -e '.[modelscope]'`; or use source: git_lfs with the repository's "
            f"git URL, https://www.modelscope.cn/{model_id}.git"
        ) from None
    endpoint = _modelscope_endpoint()
    try:
        return Path(snapshot_download(model_id, revision=revision))
    except NetworkError as exc:
        unreachable = exc
    except Exception as exc:  # modelscope raises plain exceptions of many kinds; all mean "not fetched"
        detail = " ".join(str(exc).split())[:600]  # its messages span lines: file by file, request, response
        raise PtuneError(
            f"fetch_weights.repo: {model_id}@{revision} from ModelScope ({endpoint}): "
            f"{type(exc).__name__}: {detail}. Check the id and the revision (a commit, branch or tag) "
            "on the model's page; set MODELSCOPE_ENDPOINT for a mirror, and MODELSCOPE_API_TOKEN for "
            "a private model"
        ) from None
    try:
        cached = Path(snapshot_download(model_id, revision=revision, local_files_only=True))
    except Exception:
        raise PtuneError(
            f"fetch_weights.repo: {model_id}@{revision} is not in the ModelScope cache "
            f"({os.environ.get('MODELSCOPE_CACHE', '~/.cache/modelscope')}) and ModelScope ({endpoint}) "
            f"cannot be reached: {str(unreachable).splitlines()[0]}. Check the network, or set "
            "MODELSCOPE_ENDPOINT to a reachable mirror"
        ) from None
    # modelscope writes each file whole (a temp name, then a rename), but a killed download can leave files out:
    # fetch_weights still checks the folder, and the user is told it was not compared with the hub.
    log.warning(
        "ModelScope (%s) cannot be reached; using the cached snapshot %s of %s@%s as it is, without "
        "checking it against the hub",
        endpoint,
        cached,
        model_id,
        revision,
    )
    return cached
