"""Sources `hf_hub` and `modelscope`: a snapshot of a hub repository at a pinned revision.

Downloads go to the hub library's own cache (HF_HOME / HF_HUB_CACHE, MODELSCOPE_CACHE), which resumes an
interrupted download, is shared with every other tool on the machine, and works offline once filled
(HF_HUB_OFFLINE=1). The mirror comes from the environment, as those libraries read it: HF_ENDPOINT (e.g.
https://hf-mirror.com) and MODELSCOPE_DOMAIN. An endpoint is not a param because it does not change the bytes.
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
        raise PtuneError(f"fetch_weights.repo: {repo_id}@{revision} is not in the Hugging Face cache and the hub "
                         f"({endpoint}) cannot be reached: {exc}. Check the network, or set HF_ENDPOINT to a "
                         "mirror (e.g. https://hf-mirror.com); unset HF_HUB_OFFLINE to allow downloads") from None
    except HfHubHTTPError as exc:
        raise PtuneError(f"fetch_weights.repo: {repo_id}@{revision} from {endpoint}: {exc}. A gated model needs "
                         "`hf auth login` (or HF_TOKEN) after accepting its licence on the hub") from None


def modelscope(model_id: str, revision: str) -> Path:
    """The local folder of `model_id` at `revision`, downloaded into the ModelScope cache if missing."""
    try:
        from modelscope import snapshot_download
    except ImportError:
        raise PtuneError("fetch_weights.source: modelscope needs the modelscope package: "
                         "`pip install -e '.[modelscope]'`; or use source: git_lfs with the repository's "
                         f"git URL, https://www.modelscope.cn/{model_id}.git") from None
    try:
        return Path(snapshot_download(model_id, revision=revision))
    except Exception as exc:  # modelscope raises plain exceptions of many kinds; all mean "not fetched"
        raise PtuneError(f"fetch_weights.repo: {model_id}@{revision} from ModelScope: {type(exc).__name__}: "
                         f"{exc}") from None
