"""What a fetched model folder may make ptune run: Python code shipped with the weights, and pickles.

Both can run arbitrary code on this machine, so both are off unless params.yaml says otherwise:
- `fetch_weights.trust_remote_code`: the chatglm backend imports ChatGLM-6B's modeling/tokenization code from
  models/base. The transformers backend never runs such code, whatever this says.
- `fetch_weights.allow_pickle`: weights in pickle formats (pytorch_model*.bin, *.pt, ...), which torch unpickles.
  Without it a folder that has safetensors weights keeps only those (the pickled copies are left out of
  models/base, which also halves its size when a repository ships both), and a folder with pickles alone is refused.

fetch_weights checks the folder and records both settings in models/base/ptune_source.json; the code that would run
remote code reads the record again (require_remote_code), so a models/base from before the check is not trusted.

Which files are weights is decided here once (`weight_files`), for fetch_weights' pickle check and for the bundle's
sha256 record (model/origin.py): not by suffix alone, since a sharded checkpoint's index maps tensors to shard file
names that may be anything, and transformers loads whatever the index names.

Whether the user consents to running a served bundle's base code is decided by ptune/bundle/consent.py.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..errors import PtuneError
from ..paths import SOURCE_RECORD

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
SAFETENSORS = ".safetensors"
WEIGHT_SUFFIXES = (SAFETENSORS, *PICKLE_SUFFIXES)
# A sharded checkpoint's index: model.safetensors.index.json, pytorch_model.bin.index.json (and what config.json's
# transformers_weights names, which transformers requires to end in .safetensors or .safetensors.index.json).
INDEX_SUFFIX = ".index.json"


def weight_files(folder: Path) -> list[Path]:
    """Every file of `folder` that transformers may read as weights, relative to it, sorted (none in .git/.cache):
    safetensors and pickles by suffix, each sharded checkpoint's index, and every file an index names, whatever its
    name. An index naming anything but a plain file name beside it is refused (see _shards)."""
    found = set()
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if not path.is_file() or {".git", ".cache"} & set(rel.parts):
            continue
        if path.suffix in WEIGHT_SUFFIXES:
            found.add(rel)
        elif path.name.endswith(INDEX_SUFFIX):
            found.add(rel)
            # A shard the index names but the folder lacks is no file to record: loading through it fails.
            found.update(rel.parent / name for name in _shards(path) if (path.parent / name).is_file())
    return sorted(found)


def _shards(index: Path) -> set[str]:
    """The shard file names `index` maps tensors to. transformers joins each to the model folder as it stands, so
    `../x.safetensors` or an absolute path would load a file from outside the folder, which no record covers."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = set(weight_map.values())
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise PtuneError(
            f"{index}: not a sharded checkpoint's index (no weight_map of tensor -> file name: "
            f"{type(exc).__name__}: {exc}); transformers reads it as one: remove it, or fetch the model again"
        ) from None
    for name in sorted(names, key=repr):
        if not is_plain_name(name):
            raise PtuneError(
                f"{index}: weight_map names the shard {name!r}, which is not a plain file name in {index.parent}; "
                "transformers would load it from wherever it points. Use a model whose index names its own shards"
            )
    return names


def is_plain_name(name: object) -> bool:
    """A file name a folder's own metadata may use to name its files: no separator, not `.`/`..`, no NUL."""
    return isinstance(name, str) and name not in ("", ".", "..") and not {"/", "\\", "\0"} & set(name)


def is_pickle(name: str | Path) -> bool:
    """Whether transformers may unpickle this weight file (one of weight_files): every one but safetensors and
    indexes, since it hands any shard not named *.safetensors to torch.load."""
    name = Path(name).name
    return not (name.endswith(SAFETENSORS) or name.endswith(INDEX_SUFFIX))


def _weights(folder: Path) -> tuple[list[Path], list[Path]]:
    files = [folder / rel for rel in weight_files(folder)]
    return ([p for p in files if p.name.endswith(SAFETENSORS)], [p for p in files if is_pickle(p)])


def remote_code_files(folder: Path) -> list[str]:
    """The Python modules config.json's auto_map points at (what trust_remote_code would import)."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    # A value is "module.Class", or a [slow, fast] pair of them in which either may be null.
    refs = [r for ref in config.get("auto_map", {}).values() for r in (ref if isinstance(ref, list) else [ref])]
    return sorted({r.split(".")[0] + ".py" for r in refs if isinstance(r, str)})


def check_folder(folder: Path, *, backend: str, trust_remote_code: bool, allow_pickle: bool, what: str) -> None:
    """Refuse what params do not allow; drop pickled duplicates of safetensors weights. `folder` is fetch_weights'
    temporary output, so removing files there loses nothing of the source."""
    if backend == "chatglm" and not trust_remote_code:
        modules = ", ".join(remote_code_files(folder)) or "the model's .py files"
        raise PtuneError(
            f"fetch_weights.trust_remote_code is false, but backend chatglm runs the Python code that "
            f"{what} ships ({modules}), with your account's rights. Read it, and set "
            "fetch_weights.trust_remote_code: true in params.yaml if you trust it"
        )
    safe, pickles = _weights(folder)
    if not pickles or allow_pickle:
        return
    names = ", ".join(str(p.relative_to(folder)) for p in pickles[:4]) + (" ..." if len(pickles) > 4 else "")
    if not safe:
        raise PtuneError(
            f"{what} has its weights only as pickles ({names}); unpickling can run code. Set "
            "fetch_weights.allow_pickle: true in params.yaml if you trust where they come from, or use "
            "a revision with safetensors weights"
        )
    unnamed = [str(p.relative_to(folder)) for p in pickles if p.suffix not in PICKLE_SUFFIXES]
    if unnamed:
        # Not a pickled copy to leave out: a shard an index names, which the model cannot load without.
        raise PtuneError(
            f"{what} has weight shards without the .safetensors suffix ({', '.join(unnamed[:4])}), named by its "
            "index: transformers unpickles them (torch.load), and unpickling can run code. Set "
            "fetch_weights.allow_pickle: true in params.yaml if you trust where they come from"
        )
    for path in pickles:
        path.unlink()
    log.info(
        "left out %d pickle file(s) of %s (%s): its safetensors weights are used; fetch_weights.allow_pickle: "
        "true keeps them",
        len(pickles),
        what,
        names,
    )


def record(trust_remote_code: bool, allow_pickle: bool) -> dict:
    """What fetch_weights writes into ptune_source.json."""
    return {"trust_remote_code": trust_remote_code, "allow_pickle": allow_pickle}


def require_remote_code(base: Path) -> None:
    """Before importing code from `base`: fetch_weights must have been told to trust it."""
    path = base / SOURCE_RECORD
    recorded = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    if recorded.get("trust_remote_code") is not True:
        raise PtuneError(
            f"{base}: its Python code would run, but {path} does not record "
            "fetch_weights.trust_remote_code: true; set it in params.yaml if you trust the model, and "
            "rerun fetch_weights (dvc repro / snakemake do)"
        )
