"""`python -m ptune.bundle DIR PROMPT [--base DIR] [--trust-remote-code] [--allow-pickle]`: loads a bundle in a fresh
process and prints one answer with its latency as JSON. Kept at this name because bundles' READMEs (published model
cards), the deploy check and users' scripts run it. A bundle of a chatglm base runs in the legacy environment; the
command switches to it by itself, with the user's consent (bundle/consent.py)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..errors import PtuneError
from . import opening
from .consent import ALLOW_PICKLE_FLAG, TRUST_FLAG
from .loader import Bundle
from .manifest import read_manifest


def _parse(argv: list[str]) -> tuple[str, str, str | None, bool, bool]:
    """DIR PROMPT [--base DIR] [--trust-remote-code] [--allow-pickle], in any order."""
    flags = {TRUST_FLAG: False, ALLOW_PICKLE_FLAG: False}
    base, rest, args = None, [], iter(argv)
    for arg in args:
        if arg in flags:
            flags[arg] = True
        elif arg == "--base":
            base = next(args, None)
            if base is None:
                raise PtuneError("--base: give the base model's folder")
        else:
            rest.append(arg)
    if len(rest) != 2:
        raise PtuneError("usage: python -m ptune.bundle DIR PROMPT [--base DIR] [--trust-remote-code] [--allow-pickle]")
    return rest[0], rest[1], base, flags[TRUST_FLAG], flags[ALLOW_PICKLE_FLAG]


def main(argv: list[str]) -> int:
    try:
        directory, prompt, base_dir, flag, allow_pickle = _parse(argv)
        local, chatglm = opening.served_base(directory, base_dir)
        named = local or Path(str(read_manifest(directory)["base"].get("repo"))) if chatglm else None
        opening.switch_environment(named, chatglm, flag, "params.yaml", f"the bundle {directory}", "ptune.bundle", argv)
        t0 = time.perf_counter()
        opened = opening.open_bundle(
            directory, base_dir, trust_flag=flag, allow_pickle_flag=allow_pickle, params="params.yaml"
        )
        bundle = Bundle.load(directory, trust_remote_code=opened.trust_remote_code, base=opened.base)
    except PtuneError as exc:
        print(f"ptune: error: {exc}", file=sys.stderr)
        return 2
    t1 = time.perf_counter()
    answer = bundle.answer(prompt)
    t2 = time.perf_counter()
    print(
        json.dumps({"answer": answer, "load_s": round(t1 - t0, 3), "latency_s": round(t2 - t1, 3)}, ensure_ascii=False)
    )
    return 0
