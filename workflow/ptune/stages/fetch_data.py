"""Stage fetch_data: data/raw/train.json and dev.json, JSON lines of content and summary (and history).

Sources: embedded (generated), path (a local folder) and url (an archive over https, downloaded with resume
and a checksum, unpacked by sources.archive.safe_extract: regular files and folders only, within size caps).
The files found there, ADGEN's or your own (JSON lines or CSV, columns by name), are read through one validating
reader and written in the one layout later stages read.
"""

from __future__ import annotations

from pathlib import Path

from ..config import FetchDataConfig, Params
from ..data import adgen, readers, synthetic_adgen
from ..errors import PtuneError
from ..paths import RAW as OUT
from ..sources import lock, url
from ..sources.lfs_pointer import require_no_pointers
from ..state import atomic
from ..state.resume import ResumeState


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


def run(params: Params) -> None:
    cfg = params.fetch_data
    with lock.exclusive(OUT), atomic.atomic_dir(OUT) as tmp:
        if cfg.source == "embedded":
            _write_embedded(cfg, tmp)
            return
        folder, state = _source_folder(cfg)
        require_no_pointers(folder, f"fetch_data {folder}")
        columns = readers.Columns(cfg.prompt_column, cfg.response_column, cfg.history_column, cfg.system_column)
        for split, name in (("train", cfg.train_file), ("dev", cfg.dev_file)):
            src = folder / name
            if not src.is_file():
                found = sorted(p.name for p in folder.iterdir())[:10]
                raise PtuneError(f"fetch_data.{split}_file: {src} does not exist; {folder} holds {found}")
            adgen.write(tmp / f"{split}.json", readers.read(src, columns, cfg.encoding))
        if state is not None:
            state.finish()
