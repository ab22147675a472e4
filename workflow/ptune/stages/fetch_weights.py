"""Stage fetch_weights: put a base model and its tokenizer in models/base/, whatever the source.

Sources: embedded (built here), path (a local folder), git_lfs (a git repository with LFS files), hf_hub and
modelscope (hub snapshots); see ptune.sources. Every source ends in the same checked folder: a config.json and
no Git LFS pointer left in place of content.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from ..config import FetchWeightsConfig, Params
from ..errors import PtuneError
from ..model import backends, trust
from ..paths import BASE as OUT
from ..paths import SOURCE_RECORD
from ..sources import git_lfs, hub, lock
from ..sources.lfs_pointer import require_no_pointers
from ..state import atomic
from ..state.resume import ResumeState

log = logging.getLogger(__name__)


def check_model_dir(folder: Path, what: str) -> None:
    """A transformers model folder with real content: config.json and weights present, every weight shard its index
    names present (a download cut short leaves some out), no LFS pointer files."""
    if not (folder / "config.json").is_file():
        raise PtuneError(f"{what}: {folder} has no config.json; is it a transformers model directory?")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise PtuneError(
            f"{what}: {folder} has a config.json but no weights (*.safetensors or *.bin); the download "
            "did not finish, or the folder holds only the configuration: fetch it again"
        )
    for index in sorted(folder.glob("*.index.json")):
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values())
        except (ValueError, AttributeError) as exc:
            raise PtuneError(
                f"{what}: {index} is not a weight index (JSON with a weight_map): {exc}; fetch the model again"
            ) from None
        missing = sorted(name for name in shards if not (folder / name).is_file())
        if missing:
            raise PtuneError(
                f"{what}: {index.name} names {len(missing)} weight file(s) missing from {folder}: "
                f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; the download did "
                "not finish: fetch again with the hub reachable"
            )
    require_no_pointers(folder, what)


def _link_or_copy(src: Path, dest: Path, links_within: Path, what: str) -> None:
    """Files out of a hub cache: a hard link where the disk allows (no second copy of 18 GB), else a copy.

    A Hugging Face snapshot is a folder of symbolic links into its repository's blobs/; a link that leads
    anywhere else (out of `links_within`), or to anything but a regular file, is refused naming it, so that no
    file of this machine outside the cache becomes part of models/base (read, pushed, served).
    """
    root = links_within.resolve()
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if ".git" in rel.parts or ".cache" in rel.parts:
            continue
        target = dest / rel
        real = path.resolve()
        if path.is_symlink() and (not real.is_relative_to(root) or not real.is_file()):
            raise PtuneError(
                f"{what}: {rel} in {src} is a symbolic link to {os.readlink(path)!r}, which is not a file of "
                f"the hub's cache ({root}); the snapshot was tampered with or is not the hub's: delete it and "
                "fetch again"
            )
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(real, target)
        except OSError:
            shutil.copy2(real, target)


def _copy_local(src: Path, dest: Path, what: str) -> None:
    """A local model folder, copied (not linked: it stays the user's) into models/base.

    A symbolic link in it is followed only to a regular file inside the folder. One that leads out of it, or to a
    folder, is refused naming it, before anything is read: a link can reach any file of this machine (an SSH key,
    a token file, a whole home folder), and models/base is read, pushed to the DVC remote and bundled for serving.
    The git source refuses every link, the hub sources those leaving the hub's cache.
    """
    root = src.resolve()
    bad = []
    for top, dirs, files in os.walk(src):
        if ".git" in dirs:
            dirs.remove(".git")  # not copied (ignore_patterns below skips it at every level)
        for name in sorted(dirs + files):
            path = Path(top, name)
            if path.is_symlink():
                real = path.resolve()
                if not real.is_relative_to(root) or not real.is_file():
                    bad.append(f"{path.relative_to(src)} -> {os.readlink(path)}")
    if bad:
        raise PtuneError(
            f"{what}: {len(bad)} symbolic link(s) lead out of the folder or to a folder: {', '.join(bad[:5])}"
            f"{' ...' if len(bad) > 5 else ''}. A link can reach any file of this machine, and models/base is pushed "
            "to the DVC remote and bundled: put the files themselves in the folder (after checking what they are), "
            "or, for a snapshot in the Hugging Face cache, use fetch_weights.source: hf_hub with its repo and "
            "revision (it reads the cache offline)"
        )
    check_model_dir(src, what)
    shutil.copytree(src, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".git"))


def _move_tree(src: Path, dest: Path) -> None:
    """Move a clone's working tree (not its .git) into `dest`: a rename, so the weights are never copied."""
    for entry in src.iterdir():
        if entry.name != ".git":
            os.replace(entry, dest / entry.name)


def _fetch_git_lfs(cfg: FetchWeightsConfig, dest: Path) -> dict:
    state = ResumeState("fetch_weights", [], {"source": cfg.source, "repo": cfg.repo, "revision": cfg.revision})
    clone, commit = git_lfs.fetch(cfg.repo, cfg.revision, state.dir)
    check_model_dir(clone, f"fetch_weights.repo {cfg.repo}")
    _move_tree(clone, dest)
    state.finish()
    return {"repo": cfg.repo, "revision": commit}


def _fetch(cfg: FetchWeightsConfig, dest: Path) -> dict:
    if cfg.source == "path":
        src = Path(cfg.path).expanduser()
        if not src.is_dir():
            raise PtuneError(
                f"fetch_weights.path: {cfg.path!r} is not a directory; point it at a transformers "
                "model directory (config.json, weights, tokenizer files)"
            )
        _copy_local(src, dest, f"fetch_weights.path {src}")
        return {"path": str(src)}
    if not re.fullmatch(r"[0-9a-f]{40}", cfg.revision):
        log.warning(
            "fetch_weights.revision %r is not a commit: a branch or tag can move, and a later run may "
            "fetch other weights; pin the commit for a reproducible run",
            cfg.revision,
        )
    if cfg.source == "git_lfs":
        return _fetch_git_lfs(cfg, dest)
    snapshot = hub.hf_hub(cfg.repo, cfg.revision) if cfg.source == "hf_hub" else hub.modelscope(cfg.repo, cfg.revision)
    check_model_dir(snapshot, f"fetch_weights.repo {cfg.repo}")
    # Hugging Face: snapshots/<commit>/ links into the repository's blobs/; ModelScope writes the files themselves.
    within = snapshot.parent.parent if cfg.source == "hf_hub" else snapshot
    _link_or_copy(snapshot, dest, within, f"fetch_weights.repo {cfg.repo}")
    # A Hugging Face snapshot folder is named by its commit.
    return {"repo": cfg.repo, "revision": snapshot.name if cfg.source == "hf_hub" else cfg.revision}


def _describe(cfg: FetchWeightsConfig) -> str:
    return f"fetch_weights.path {cfg.path}" if cfg.source == "path" else f"fetch_weights.repo {cfg.repo}"


def check_tokenizer_fits(model_dir: Path) -> None:
    """A tokenizer from another model hands out ids past the embedding table: an index error deep in torch later."""
    from ..model.loading import load_tokenizer

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    if "auto_map" in config:
        return  # remote-code models (ChatGLM-6B) bring their own tokenizer class; their backend checks them
    if not any((model_dir / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return  # nothing to compare: preprocess names the missing tokenizer when it needs one
    vocab = config.get("vocab_size")
    n_tokens = len(load_tokenizer(model_dir))
    if isinstance(vocab, int) and n_tokens > vocab:
        raise PtuneError(
            f"{model_dir}: the tokenizer has {n_tokens} tokens but the model's config.json says "
            f"vocab_size {vocab}; the tokenizer belongs to another model. Fetch the model and its "
            "own tokenizer from the same repository and revision"
        )


def run(params: Params) -> None:
    cfg = params.fetch_weights
    with lock.exclusive(OUT), atomic.atomic_dir(OUT) as tmp:
        if cfg.source == "embedded":
            if cfg.backend != backends.TRANSFORMERS:
                raise PtuneError(
                    f"fetch_weights.backend: {cfg.backend!r} runs ChatGLM-6B's remote code, but the "
                    "embedded model is a transformers-native GLM; set backend: transformers, or a source "
                    "that gives a ChatGLM-6B model"
                )
            from ..model import embedded  # torch and transformers: seconds to import, which other sources need not wait

            facts = embedded.build(cfg.embedded, tmp)
        else:
            facts = _fetch(cfg, tmp)
            backends.check_model_dir(tmp, cfg.backend)
            trust.check_folder(
                tmp,
                backend=cfg.backend,
                trust_remote_code=cfg.trust_remote_code,
                allow_pickle=cfg.allow_pickle,
                what=_describe(cfg),
            )
            check_tokenizer_fits(tmp)
        # Later stages read the backend from this record (backends.name_of): they depend on models/base anyway.
        atomic.write_json(
            tmp / SOURCE_RECORD,
            {
                "source": cfg.source,
                "backend": cfg.backend,
                **trust.record(cfg.trust_remote_code, cfg.allow_pickle),
                **facts,
            },
        )
