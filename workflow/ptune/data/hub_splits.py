"""The splits of a hub data set's snapshot, read with the datasets library, whatever format the repository holds.

A split is named as the datasets library names the repository's splits: from the `configs` of its README.md, or
from its file names (train*, validation* / valid* / dev*, test*, in the repository's root or in data/), in parquet,
JSON lines, CSV or Arrow alike. A name that is a path of the repository (data/dev.parquet) reads that one file.
The library's Arrow cache lives in a temp folder for the call, not in HF_DATASETS_CACHE: data/raw is the copy kept.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..errors import PtuneError

# A file of the repository named as a split: its datasets builder, by suffix.
BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".arrow": "arrow"}


def _repo_files(folder: Path) -> list[str]:
    return sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


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


def _splits(folder: Path, cache: str, what: str):
    import datasets

    try:
        return datasets.load_dataset(str(folder), cache_dir=cache)
    except Exception as exc:  # the library raises many kinds: no data files, mixed formats, a bad README
        raise PtuneError(
            f"{what}: the datasets library cannot read {folder} as a data set ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:400]}); it holds {_repo_files(folder)[:20]}. Name the files to read "
            "in fetch_data.train_split and dev_split (e.g. data/train.parquet)"
        ) from None


def load(folder: Path, wanted: dict[str, str], what: str) -> dict[str, list[dict]]:
    """The rows of each split `wanted` names ({"train": "train", "dev": "validation"}), by our split name."""
    import datasets

    datasets.disable_progress_bars()
    rows: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="ptune-datasets-") as cache:
        by_split = None
        for ours, name in wanted.items():
            key = f"fetch_data.{ours}_split"
            path = _named_file(folder, name, key, what)
            if path is not None:
                try:
                    split = datasets.load_dataset(
                        BUILDERS[path.suffix.lower()], data_files=str(path), split="train", cache_dir=cache
                    )
                except Exception as exc:
                    raise PtuneError(
                        f"{key}: {name} of {what} cannot be read as {BUILDERS[path.suffix.lower()]} "
                        f"({type(exc).__name__}: {' '.join(str(exc).split())[:400]})"
                    ) from None
            else:
                if by_split is None:
                    by_split = _splits(folder, cache, what)
                if name not in by_split:
                    raise PtuneError(
                        f"{key}: {what} has no split {name!r}; its splits are {sorted(by_split)}. Name one of "
                        f"them, or a file of the repository: {_repo_files(folder)[:20]}"
                    )
                split = by_split[name]
            rows[ours] = split.to_list()
    return rows
