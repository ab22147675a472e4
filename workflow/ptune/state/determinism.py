"""Same seeds and the same thread count give the same bytes: seed every generator and ask torch for determinism."""

from __future__ import annotations

import os
import random

from ..errors import PtuneError

THREADS_ENV = "PTUNE_NUM_THREADS"
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def configure_threads() -> int:
    """Use every CPU this process may run on (or $PTUNE_NUM_THREADS), whoever started the stage.

    Snakemake sets OMP_NUM_THREADS to the job's thread count (1 under `--cores 1`), DVC does not: left alone, the
    two front ends would compute with different thread counts, at different speeds and, through the order of
    floating-point sums, with different bytes. Call before torch is imported.
    """
    value = os.environ.get(THREADS_ENV)
    if value:
        if not value.isdigit() or int(value) < 1:
            raise PtuneError(f"{THREADS_ENV}={value!r}: must be a whole number of threads, 1 or more")
        n = int(value)
    else:
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    for var in _THREAD_VARS:
        os.environ[var] = str(n)
    # MKL (torch's CPU BLAS) may take different code paths for differently aligned buffers, and so round
    # differently from run to run; its strict conditional-reproducibility mode removes that.
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
    # An OpenMP thread with no work spins on its core before it sleeps (libgomp, which torch's Linux wheels use, spins
    # 300,000 times by default): beside another busy process on a notebook's few cores, the spinning takes the
    # neighbour's share and the threads then wait for each other (4-9x slower beside one torch process on 2 cores).
    # A short spin keeps the quiet speed and gives the cores up when they are shared; sleeping at once
    # (OMP_WAIT_POLICY=PASSIVE) shares best but costs a fifth of the quiet speed (bench/contention.py, bench/README.md).
    # It changes no result, only who gets the CPU.
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")
    return n


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    # warn_only: a few CUDA kernels have no deterministic variant; on the CPU all the ones we use do.
    torch.use_deterministic_algorithms(True, warn_only=True)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
