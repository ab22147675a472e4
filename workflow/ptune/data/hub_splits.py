"""The splits of a hub data set's snapshot, read from the snapshot's own files, whatever format the repository holds.

A split is named as the datasets library names a repository's splits from its file and folder names (train*,
validation* / valid* / dev*, test*, in the repository's root, in data/ or deeper; data/{split}-00000-of-00001.*
shards), in parquet, JSON lines, CSV or Arrow alike. A name that is a path of the repository (data/dev.parquet)
reads that one file.

The snapshot is the hub's, so every byte of it is untrusted, and the folder is never handed to `datasets` as a data
set: its README.md's `configs: data_files:` may name any file of this machine (an absolute or `../` path) or any
URL, and the library reads them (and sends HEAD requests to the URLs even to list them). So a README's `configs`
are not used (a warning says so); the files are listed here, by globbing the folder with the library's own
split patterns (`get_data_patterns`, which reads no README and asks no network); each file is read only if its
real path (links resolved) is a regular file inside the repository's folder of the hub's cache and it is not an
archive or compressed (the json and csv builders would unpack it, with the tar tricks `sources/archive.py`
refuses); and each split's files are read with their format's builder, handed over as a list the library does
not glob again. The library's Arrow cache lives in a temp folder for the call, not in HF_DATASETS_CACHE: data/raw
is the copy kept.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path

from ..errors import PtuneError

log = logging.getLogger(__name__)

# A file of the repository read as data: its datasets builder, by suffix.
BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".arrow": "arrow"}


def _repo_files(folder: Path) -> list[str]:
    return sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _readable(path: Path, folder: Path, within: Path, key: str, what: str) -> str:
    """The real path of the snapshot file `path`, checked to be safe to read as data."""
    from datasets.utils.extract import Extractor

    name = os.path.relpath(path, folder)
    real = path.resolve()
    if not real.is_relative_to(within.resolve()) or not real.is_file():
        raise PtuneError(
            f"{key}: {name} of {what} leads to {real}, which is not a file of the repository in the hub's cache "
            f"({within}); the snapshot was tampered with or is not the hub's: delete it and fetch again"
        )
    packed = Extractor.infer_extractor_format(real)
    if packed is not None:
        raise PtuneError(
            f"{key}: {name} of {what} is a {packed} archive or compressed file, not plain {path.suffix[1:]}; "
            "archives are not unpacked from a hub. Name a plain parquet, JSON lines, CSV or Arrow file of the "
            "repository, or unpack it yourself and use fetch_data.source: path"
        )
    return str(real)


def _named_file(folder: Path, name: str, key: str, what: str) -> Path | None:
    """The repository file `name` names, or None when it names a split."""
    if Path(name).suffix.lower() not in BUILDERS:
        return None
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise PtuneError(f"{key}: {name!r} is not a path inside the repository; name a file as the hub lists it")
    path = folder / name
    if not path.is_file():
        raise PtuneError(f"{key}: {what} has no file {name}; it holds {_repo_files(folder)[:20]}")
    return path


def _splits(folder: Path, what: str) -> dict[str, list[Path]]:
    """Each split the datasets library names from the snapshot's file names, with its files (paths under `folder`)."""
    from datasets.data_files import EmptyDatasetError, get_data_patterns, resolve_pattern

    try:
        patterns = get_data_patterns(str(folder))
    except EmptyDatasetError:
        patterns = {}
    splits = {}
    for split, globs in patterns.items():
        found: set[str] = set()
        for pattern in globs:
            try:
                found.update(resolve_pattern(pattern, str(folder), allowed_extensions=list(BUILDERS)))
            except FileNotFoundError:
                continue  # a pattern of the split that matches no file of a format we read
        if found:
            splits[str(split)] = sorted(map(Path, found))  # not the library's NamedSplit('train')
    readme = folder / "README.md"
    # Only looked at (its first MiB, where the YAML header is), to say why a split it defines is missing; the YAML
    # is the repository's and is never parsed here.
    head = ""
    if readme.is_file():
        with readme.open("rb") as f:
            head = f.read(1 << 20).decode("utf-8", "replace")
    if re.search(r"^configs:", head, re.M):
        log.warning(
            "%s: README.md's `configs` are not used (they may name files outside the repository, or URLs); the "
            "splits are named from the repository's file names: %s. Name a file of the repository in "
            "fetch_data.train_split or dev_split to read another",
            what,
            {split: [os.path.relpath(p, folder) for p in paths] for split, paths in splits.items()},
        )
    return splits


def _read(files: list[Path], folder: Path, within: Path, cache: str, key: str, what: str):
    """The rows of `files` (one format), as one datasets split."""
    import datasets
    from datasets.data_files import DataFilesList

    names = [os.path.relpath(p, folder) for p in files]
    builders = {BUILDERS.get(p.suffix.lower()) for p in files}
    if len(builders) != 1 or None in builders:
        raise PtuneError(
            f"{key}: the files of {what} that make this split ({', '.join(names[:10])}) are not all parquet, JSON "
            "lines, CSV or Arrow of one kind; name one file of the repository instead (e.g. data/train.parquet)"
        )
    [builder] = builders
    real = [_readable(p, folder, within, key, what) for p in files]
    try:
        # A DataFilesList is taken as it is: the library does not glob the names or treat them as URLs again.
        return datasets.load_dataset(
            builder, data_files={"train": DataFilesList(real, [()] * len(real))}, split="train", cache_dir=cache
        )
    except Exception as exc:  # the library raises many kinds: a malformed file, mixed columns
        raise PtuneError(
            f"{key}: {', '.join(names[:10])} of {what} cannot be read as {builder} "
            f"({type(exc).__name__}: {' '.join(str(exc).split())[:400]})"
        ) from None


def load(folder: Path, wanted: dict[str, str], what: str, within: Path | None = None) -> dict[str, list[dict]]:
    """The rows of each split `wanted` names ({"train": "train", "dev": "validation"}), by our split name.
    `within`: the folder the snapshot's links may lead into (a Hugging Face repository's folder in the cache, whose
    blobs/ its snapshot links to); the snapshot itself by default."""
    import datasets

    datasets.disable_progress_bars()
    folder = folder.absolute()
    within = folder if within is None else within
    rows: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="ptune-datasets-") as cache:
        by_split = None
        for ours, name in wanted.items():
            key = f"fetch_data.{ours}_split"
            path = _named_file(folder, name, key, what)
            if path is None:
                if by_split is None:
                    by_split = _splits(folder, what)
                if name not in by_split:
                    raise PtuneError(
                        f"{key}: {what} has no split {name!r}; its splits are {sorted(by_split)} (named from its "
                        "file names; a README's `configs` are not used). Name one of them, or a file of the "
                        f"repository: {_repo_files(folder)[:20]}"
                    )
            files = [path] if path is not None else by_split[name]
            rows[ours] = _read(files, folder, within, cache, key, what).to_list()
    return rows
