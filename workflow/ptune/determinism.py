"""Same seeds and the same thread count give the same bytes: seed every generator and ask torch for determinism."""

from __future__ import annotations

import os
import random


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    # warn_only: a few CUDA kernels have no deterministic variant; on the CPU all the ones we use do.
    torch.use_deterministic_algorithms(True, warn_only=True)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
