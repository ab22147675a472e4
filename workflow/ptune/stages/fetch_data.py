"""Stage fetch_data: data/raw/train.json and dev.json, JSON lines of content and summary (and history).

Sources: embedded (generated), path (a local folder), url (an archive over https, downloaded with resume
and a checksum, unpacked by sources.archive.safe_extract: regular files and folders only, within size caps), and
hf_hub / modelscope (a data set repository at a pinned revision, through the hub's cache: sources.hub, the weights'
code; its splits read by the datasets library, data.hub_splits). The files found there, ADGEN's or your own
(JSON lines or CSV, columns by name), are read through one validating reader and written in the one layout later
stages read. A hub source records what it fetched in data/raw/ptune_source.json: the repository, the commit and
every file's sha256. The original ADGEN is checked for (fetch_data.expect): counts per split and dev.json's sha256.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

from ..config import FetchDataConfig, Params
from ..data import adgen, general, hub_splits, readers, synthetic_adgen
from ..errors import PtuneError
from ..paths import GENERAL_SET, SOURCE_RECORD
from ..paths import RAW as OUT
from ..sources import hub, lock, url
from ..sources.lfs_pointer import require_no_pointers
from ..state import atomic
from ..state.resume import ResumeState

log = logging.getLogger(__name__)


def _source_folder(cfg: FetchDataConfig) -> tuple[Path, ResumeState | None]:
    if cfg.source == "path":
        folder = Path(cfg.path).expanduser()
        if not folder.is_dir():
            raise PtuneError(
                f"fetch_data.path: {cfg.path!r} is not a directory; point it at the folder that "
                f"holds {cfg.train_file} and {cfg.dev_file}"
            )
        return folder, None
    # Keyed on the URL alone: a download kept for want of a checksum is used once the checksum is set.
    state = ResumeState("fetch_data", [], {"url": cfg.url})
    archive = state.path("download")
    url.download(cfg.url, archive, cfg.sha256, allow_http=cfg.allow_http)
    extracted = url.extract(archive, state.path("extracted"), cfg.max_unpacked_bytes, cfg.max_archive_members)
    return extracted, state


def _write_embedded(cfg: FetchDataConfig, out: Path) -> None:
    emb = cfg.embedded
    # Train and dev come from one stream, so no dev example is a copy of a train example by seed reuse.
    examples = list(synthetic_adgen.generate(emb.seed, emb.train_size + emb.dev_size))
    adgen.write(out / "train.json", examples[: emb.train_size])
    adgen.write(out / "dev.json", examples[emb.train_size :])


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _columns(cfg: FetchDataConfig) -> readers.Columns:
    return readers.Columns(cfg.prompt_column, cfg.response_column, cfg.history_column, cfg.system_column)


def _write_hub(cfg: FetchDataConfig, out: Path) -> None:
    """A data set repository's snapshot: its splits into data/raw, and what was fetched into the record."""
    what = f"fetch_data.repo {cfg.repo}@{cfg.revision}"
    if cfg.source == "hf_hub":
        snapshot = hub.hf_hub(cfg.repo, cfg.revision, repo_type=hub.DATASET, key="fetch_data.repo")
        # snapshots/<commit>/ of links into the repository's blobs/: the folder is named by the commit.
        commit, within = snapshot.name, snapshot.parent.parent
    else:
        snapshot = hub.modelscope(cfg.repo, cfg.revision, repo_type=hub.DATASET, key="fetch_data.repo")
        commit, within = cfg.revision, snapshot
    hub.refuse_foreign_links(snapshot, within, what)
    if not re.fullmatch(r"[0-9a-f]{40}", cfg.revision):
        pin = (
            f"it is commit {commit}: set fetch_data.revision: {commit}"
            if commit != cfg.revision
            else "pin a commit (ModelScope names none to ptune; data/raw/ptune_source.json records each file's sha256)"
        )
        log.warning(
            "fetch_data.revision %r is not a commit: a branch or tag can move, and a later run may fetch other "
            "data; %s to fetch the same bytes on every run",
            cfg.revision,
            pin,
        )
    what = f"fetch_data.repo {cfg.repo}@{commit}"
    splits = hub_splits.load(snapshot, {"train": cfg.train_split, "dev": cfg.dev_split}, what, within)
    for split, rows in splits.items():
        name = cfg.train_split if split == "train" else cfg.dev_split
        adgen.write(out / f"{split}.json", readers.from_rows(rows, f"{what} {name}", _columns(cfg)))
    files = {
        str(p.relative_to(snapshot)): _sha256(p)
        for p in sorted(snapshot.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(snapshot).parts)
    }
    record = {"source": cfg.source, "repo": cfg.repo, "revision": commit}
    if commit != cfg.revision:
        record["requested"] = cfg.revision
    record.update(train_split=cfg.train_split, dev_split=cfg.dev_split, files=files)
    atomic.write_json(out / SOURCE_RECORD, record)


def _expects_adgen(cfg: FetchDataConfig) -> bool:
    hub_id = adgen.HUB_IDS.get(cfg.source)
    return cfg.expect == "adgen" or (cfg.expect == "auto" and hub_id is not None and hub_id.lower() == cfg.repo.lower())


def _describe(cfg: FetchDataConfig) -> str:
    if cfg.source in adgen.HUB_IDS:
        return f"fetch_data.repo {cfg.repo}@{cfg.revision}"
    return f"fetch_data.{cfg.source} {getattr(cfg, cfg.source, '')}".rstrip()


def run(params: Params) -> None:
    cfg = params.fetch_data
    with lock.exclusive(OUT), atomic.atomic_dir(OUT) as tmp:
        _fetch(cfg, tmp)
        if _expects_adgen(cfg):
            adgen.check(tmp, f"{_describe(cfg)} (fetch_data.expect: {cfg.expect})")
    atomic.write_text(GENERAL_SET, general.dumps(_general_set(params)))


def _general_set(params: Params) -> list[dict[str, str]]:
    """data/general.jsonl: the file fetch_data.general_file names, else (embedded source) text of the embedded
    base's pre-training distribution that it never saw, else nothing (an empty file: the report says so)."""
    cfg = params.fetch_data
    if cfg.general_file:
        path = Path(cfg.general_file).expanduser()
        if not path.is_file():
            raise PtuneError(
                f"fetch_data.general_file: {cfg.general_file!r} is not a file; give a JSON-lines file of "
                '{"prompt": ..., "response": ...} (docs/report.md, The prefix outside its task), or "" for none'
            )
        return general.parse(path.read_text(encoding="utf-8"), f"fetch_data.general_file {path}")
    if cfg.source != "embedded" or cfg.embedded.general_size == 0:
        return []
    base = params.fetch_weights.embedded  # held out from what this base is pre-trained on
    return synthetic_adgen.held_out_general(base.seed, base.corpus_size, cfg.embedded.general_size)


def _fetch(cfg: FetchDataConfig, tmp: Path) -> None:
    if cfg.source == "embedded":
        _write_embedded(cfg, tmp)
        return
    if cfg.source in ("hf_hub", "modelscope"):
        _write_hub(cfg, tmp)
        return
    folder, state = _source_folder(cfg)
    require_no_pointers(folder, f"fetch_data {folder}")
    columns = _columns(cfg)
    for split, name in (("train", cfg.train_file), ("dev", cfg.dev_file)):
        src = folder / name
        if not src.is_file():
            found = sorted(p.name for p in folder.iterdir())[:10]
            raise PtuneError(f"fetch_data.{split}_file: {src} does not exist; {folder} holds {found}")
        adgen.write(tmp / f"{split}.json", readers.read(src, columns, cfg.encoding))
    if state is not None:
        state.finish()
