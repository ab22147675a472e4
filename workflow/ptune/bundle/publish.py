"""`ptune publish --repo ID [--private]`: the deploy bundle to a Hugging Face model repository, as adapters are shared.

What is sent is a fixed list, never a folder's whole content: bundle.json, README.md (the model card) and the files
of the bundle's own prefix folder (manifest.prefix_folder: bundle.json's `prefix` must name a real folder inside the
bundle). Before anything is sent each is checked: none is a link (a link would send whatever it points at, from
anywhere on this machine), none is a file of the base (by the sha256s the bundle records), and none contains the hub
token in use. The token is huggingface_hub's own (HF_TOKEN, or `hf auth login`); ptune never reads it from params
nor writes it anywhere. The repository is created if missing (private with --private), then one commit adds the
files (huggingface_hub decides, with the hub, which go through LFS).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import PtuneError
from . import origin
from .manifest import MANIFEST, prefix_folder, read_manifest

CARD = "README.md"


def files_to_send(bundle: Path) -> list[str]:
    """The bundle's files that are published, relative to it (POSIX), sorted; refused if any is a base weight."""
    manifest = read_manifest(bundle)
    if not (bundle / CARD).is_file():
        raise PtuneError(f"{bundle / CARD}: missing; rebuild the bundle with `dvc repro deploy`")
    # Every entry is looked at, links to folders included (a walk would follow them or skip them silently).
    inside = sorted(prefix_folder(bundle, manifest).rglob("*"))
    paths = [bundle / MANIFEST, bundle / CARD, *inside]
    base_digests = set((manifest.get("base") or {}).get("weights", {}).values())
    for path in paths:
        if path.is_symlink():
            raise PtuneError(
                f"{path}: a symbolic link; the bundle must hold its files themselves (a link sends whatever it points "
                "at): rebuild it with `dvc repro deploy`, or copy it with `cp -rL` and publish the copy with --bundle"
            )
        if path.is_file() and origin.sha256(path) in base_digests:
            raise PtuneError(f"{path}: the base model's weights, which are never published; rebuild the bundle")
    return [
        p.relative_to(bundle).as_posix()
        for p in paths
        if p.is_file() and not p.name.startswith(".")  # .snakemake_timestamp and the like
    ]


def _token() -> str | None:
    from huggingface_hub import get_token

    return get_token()


def check_no_token(bundle: Path, names: list[str], token: str | None) -> None:
    if not token:
        return
    needle = token.encode()
    for name in names:
        if needle in (bundle / name).read_bytes():
            raise PtuneError(
                f"{bundle / name}: contains the hub token in use; remove it (and revoke the token), then rebuild"
            )


def run(bundle: Path, repo_id: str, private: bool = False, dry_run: bool = False) -> str:
    """Upload `bundle` to `repo_id`; what was sent, in words."""
    from huggingface_hub import CommitOperationAdd, HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    names = files_to_send(bundle)
    token = _token()
    check_no_token(bundle, names, token)
    listing = "\n".join(f"  {n}" for n in names)
    if dry_run:
        return f"would upload to {repo_id} ({constants.ENDPOINT}):\n{listing}"
    if not token:
        raise PtuneError(
            "no Hugging Face token: set HF_TOKEN (a token with write access) or run `hf auth login`; ptune never "
            "stores it"
        )
    api = HfApi(endpoint=constants.ENDPOINT)
    rec = read_manifest(bundle)["base"]
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.create_commit(
            repo_id,
            [CommitOperationAdd(path_in_repo=n, path_or_fileobj=str(bundle / n)) for n in names],
            commit_message=f"ptune bundle: P-tuning v2 prefix for {origin.describe(rec)}",
            repo_type="model",
        )
    except HfHubHTTPError as exc:
        detail = " ".join(str(exc).split())[:400]
        raise PtuneError(
            f"publish --repo {repo_id} ({constants.ENDPOINT}): {detail}. Check the id, and that the token "
            "(HF_TOKEN or `hf auth login`) may write to it"
        ) from None
    where = (
        ""
        if rec.get("source") in origin.HUB_SOURCES
        else (f"\nIts base ({origin.describe(rec)}) is on no hub: whoever serves it passes --base DIR with that model.")
    )
    return f"uploaded to {url} (commit {commit.oid}):\n{listing}{where}"
