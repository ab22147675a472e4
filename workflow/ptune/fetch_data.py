"""Stage fetch_data: ADGEN-shaped data/raw/train.json and dev.json (JSON lines of content and summary)."""

from __future__ import annotations

from pathlib import Path

from . import adgen, atomic, synthetic_adgen
from .config import Params

OUT = Path("data/raw")


def run(params: Params) -> None:
    cfg = params.fetch_data
    with atomic.atomic_dir(OUT) as tmp:
        if cfg.source == "embedded":
            emb = cfg.embedded
            # Train and dev come from one stream, so no dev example is a copy of a train example by seed reuse.
            examples = list(synthetic_adgen.generate(emb.seed, emb.train_size + emb.dev_size))
            adgen.write(tmp / "train.json", examples[:emb.train_size])
            adgen.write(tmp / "dev.json", examples[emb.train_size:])
        else:
            # Read through the validating reader (errors name file and line), then write unchanged content.
            for split in adgen.SPLITS:
                adgen.write(tmp / f"{split}.json", adgen.read(Path(cfg.path).expanduser() / f"{split}.json"))
