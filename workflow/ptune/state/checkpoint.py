"""Training checkpoints as safetensors: tensors in the file, everything else as JSON in its metadata.

A checkpoint can come back from a DVC remote (`ptune checkpoint pull`), so it must never be a pickle, which runs
code when loaded. Prefix weights, optimizer moments and RNG states are tensors; steps, hyper-parameters, the
loss log and Python's RNG state are JSON.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load, save

from ..errors import PtuneError
from . import atomic

META_KEY = "ptune"


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors = {"rng.torch": torch.get_rng_state(), "rng.numpy": torch.from_numpy(np_keys.astype(np.int64))}
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    version, internal, gauss_next = random.getstate()
    meta = {"python": [version, list(internal), gauss_next], "numpy": [np_kind, np_pos, np_has_gauss, np_gauss]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    cuda = [
        tensors[k]
        for k in sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    ]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _split_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for idx, per_param in state_dict["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "state": scalars}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict:
    state: dict[int, dict] = {int(i): dict(v) for i, v in meta["state"].items()}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_training(
    path: Path,
    *,
    step: int,
    prefix: dict,
    optimizer: dict,
    scaler: dict | None,
    log_rows: list,
    rng_per_rank: list[tuple[dict[str, torch.Tensor], dict[str, Any]]],
    window_losses: list[float] = (),
) -> None:
    """Write one training checkpoint atomically (temp file, then rename); `rng_per_rank[r]` is rank r's
    `rng_state()`, so that every process of a multi-device run resumes its own random streams. `window_losses`:
    the losses of the steps since the last log row (a checkpoint between two rows, as a stop on request makes),
    so that the resumed run's next row is the mean an uninterrupted run logs."""
    opt_tensors, opt_meta = _split_optimizer(optimizer)
    tensors = {**{f"prefix.{k}": v for k, v in prefix.items()}, **opt_tensors}
    for rank, (rng_tensors, _) in enumerate(rng_per_rank):
        tensors.update({f"rank{rank}.{k}": v for k, v in rng_tensors.items()})
    meta = {
        "step": step,
        "optimizer": opt_meta,
        "scaler": scaler,
        "rng": [m for _, m in rng_per_rank],
        "log_rows": log_rows,
        "window_losses": list(window_losses),
    }
    blob = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata={META_KEY: json.dumps(meta)})
    with atomic.atomic_file(path, "wb") as fh:
        fh.write(blob)


def load_training(path: Path, rank: int = 0) -> dict[str, Any]:
    """Read a checkpoint written by `save_training` onto the CPU (load_state_dict moves tensors where they
    belong); restores rank `rank`'s RNG states as a side effect."""
    try:
        tensors = load(path.read_bytes())
        from safetensors import safe_open  # the metadata needs the file API

        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads(fh.metadata()[META_KEY])
        rng_meta = meta["rng"][rank]
    except Exception as exc:  # a truncated or foreign file: say which and what to do, not a decoder traceback
        raise PtuneError(
            f"{path}: not a readable ptune checkpoint for process {rank} ({exc}); delete it to resume "
            "from the one before, or delete the folder to start over"
        ) from None
    mine = f"rank{rank}."
    set_rng_state({k[len(mine) :]: v for k, v in tensors.items() if k.startswith(mine)}, rng_meta)
    prefix = {k[len("prefix.") :]: v for k, v in tensors.items() if k.startswith("prefix.")}
    optimizer = _join_optimizer(tensors, meta["optimizer"])
    return {
        "step": meta["step"],
        "prefix": prefix,
        "optimizer": optimizer,
        "scaler": meta["scaler"],
        "log_rows": [tuple(r) for r in meta["log_rows"]],
        "window_losses": [float(x) for x in meta.get("window_losses", [])],  # older checkpoints have none
    }
