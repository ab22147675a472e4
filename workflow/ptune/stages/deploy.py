"""Stage deploy: write the bundle to models/deploy/, serve it over HTTP as a user would, ask it one prompt.

The check starts `ptune serve api` on the bundle (a fresh process, a free loopback port), asks the smoke prompt
through the seed-compatible `POST /` and the OpenAI-compatible `/v1/chat/completions`, checks both answers, and
stops the server. The bundle names its base by origin (bundle/origin.py) and carries a model card (bundle/card.py).
The answer, the server's start-up time and each request's latency go to
reports/deploy_check.json (the one place besides reports/timings* where wall times are allowed). A bundle that
fails its check is never published: the check runs on the temporary directory before it is renamed into place.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from ..bundle import card, manifest, origin
from ..config import GenerationConfig, Params
from ..errors import PtuneError
from ..model import prompting
from ..paths import BASE, METRICS, PREFIX
from ..paths import DEPLOY as OUT
from ..paths import DEPLOY_CHECK as CHECK
from ..serve.process import ApiProcess
from ..state import atomic


def _facts(params: Params, prefix_cfg: dict, base: dict, backend: str, fmt: str, metrics: dict) -> card.CardFacts:
    data = params.fetch_data
    hub_data = data.source == "hf_hub" and bool(data.repo)
    named = {
        "hf_hub": f"the Hugging Face data set {data.repo}",
        "modelscope": f"the ModelScope data set {data.repo}",
        "embedded": "ptune's generated ADGEN-shaped data set (embedded)",
    }.get(data.source, f"ADGEN-shaped data ({data.source} source)")
    ref = params.report.reference
    reference = None if ref is None else {"name": ref.name, **{m: ref.score(m) for m in card.METRICS}}
    return card.CardFacts(
        base=base,
        backend=backend,
        pre_seq_len=prefix_cfg["pre_seq_len"],
        prompt_format=fmt,
        metrics=metrics,
        dataset=data.repo if hub_data else "",
        dataset_name=named,
        reference=reference,
        smoke_prompt=params.deploy.smoke_prompt,
    )


def run(params: Params) -> None:
    cfg = params.deploy
    prompter = prompting.for_base(params.preprocess, BASE)
    backend = prompter.backend
    allow_pickle = params.fetch_weights.allow_pickle
    prefix_cfg = backend.describe_prefix(PREFIX, BASE, allow_pickle)
    metrics = json.loads(METRICS.read_text(encoding="utf-8"))
    generation = GenerationConfig.of(cfg)
    base = origin.record(BASE, prefix_cfg["base_config_sha256"])
    facts = _facts(params, prefix_cfg, base, backend.name, prompter.format.kind, metrics)
    with atomic.atomic_dir(OUT) as tmp:
        backend.copy_prefix(PREFIX, tmp / "prefix", allow_pickle)
        manifest.write(
            tmp,
            {
                "base": base,
                "backend": backend.name,
                "quantization": params.evaluate.quantization,  # served as it was evaluated
                "base_config_sha256": prefix_cfg["base_config_sha256"],
                "prefix": "prefix",
                "prompt": prompter.format.to_dict(),
                "generation": asdict(generation),
                "evaluation": {"n_examples": metrics["n_examples"], "ptuned": metrics["ptuned"]},
            },
        )
        atomic.write_text(tmp / "README.md", card.render(facts, f"ptune prefix for {origin.describe(base)}", str(OUT)))
        check = smoke_test(tmp, cfg.smoke_prompt, generation)
    atomic.write_json(CHECK, {"bundle": str(OUT), "prompt": cfg.smoke_prompt, **check})


def smoke_test(bundle: Path, prompt: str, generation: GenerationConfig) -> dict:
    """Serve `bundle` with `ptune serve api` on a free loopback port, ask `prompt` over HTTP, stop the server."""
    try:
        with ApiProcess(["--bundle", str(bundle)]) as api:
            model = api.get("/v1/models")[1]["data"][0]["id"]
            t0 = time.perf_counter()
            _, seed = api.post("/", {"prompt": prompt})
            t1 = time.perf_counter()
            _, chat = api.post(
                "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": prompt}]}
            )
            t2 = time.perf_counter()
            load_s = api.load_s
    except PtuneError as exc:
        raise PtuneError(f"deploy check failed: the bundle in {bundle} was not served: {exc}") from None
    answer = seed.get("response")
    problems = []
    if not isinstance(answer, str) or seed.get("status") != 200:
        problems.append(f"POST / answered {seed}, not {{'response': str, 'status': 200, ...}}")
    elif seed.get("history") != [[prompt, answer]]:
        problems.append(f"POST / returned history {seed.get('history')!r}, not [[prompt, response]]")
    content = (chat.get("choices") or [{}])[0].get("message", {}).get("content")
    if not isinstance(content, str):
        problems.append(f"/v1/chat/completions answered {chat}, with no choices[0].message.content")
    elif not generation.do_sample and content != answer:
        problems.append(f"greedy decoding, yet POST / answered {answer!r} and /v1/chat/completions {content!r}")
    if problems:
        raise PtuneError("deploy check failed for the bundle in " + str(bundle) + ":\n  " + "\n  ".join(problems))
    return {
        "answer": answer,
        "server": "ptune serve api",
        "load_s": round(load_s, 3),
        "latency_s": round(t1 - t0, 3),
        "openai_latency_s": round(t2 - t1, 3),
        "completion_tokens": chat["usage"]["completion_tokens"],
    }
