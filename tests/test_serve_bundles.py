"""Several bundles of one base from one server (issue 39): the base loaded once, each prefix once, rows of different
prefixes, prefix lengths and the base alone decoded together in one batch, each answer the one a server of its bundle
alone gives (greedy: token-identical), in the scheduler's thread and in its own process; the OpenAI options per row;
the flags, the base check and the routing of `model`."""

from __future__ import annotations

import contextlib
import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from support.serving import dev_prompts

# The second bundle's prompt format: another template than the tiny pipeline's, so that rows of one batch are built
# in two formats (its end of turn is the tokenizer's EOS, as the first's).
QA_TEMPLATE = "问题：{content}\n回答："


def make_second_bundle(root: Path, dest: Path, pre_seq_len: int = 9, seed: int = 1) -> Path:
    """A copy of the tiny pipeline's bundle with a prefix of its own (another length, random weights: P-tuned on
    another task, as far as serving can tell) and another prompt template; the same base record."""
    import torch

    from ptune.model.prefix_encoder import PrefixConfig, PrefixEncoder

    src = root / "models" / "deploy"
    shutil.copytree(src, dest)
    config = json.loads((src / "prefix" / "prefix_config.json").read_text(encoding="utf-8"))
    config["pre_seq_len"] = pre_seq_len
    torch.manual_seed(seed)
    encoder = PrefixEncoder(PrefixConfig(**config))
    with torch.no_grad():
        for p in encoder.parameters():
            p.normal_(0, 0.5)  # large enough that its answers differ from the first bundle's
    shutil.rmtree(dest / "prefix")
    encoder.save(dest / "prefix")
    manifest = json.loads((dest / "bundle.json").read_text(encoding="utf-8"))
    manifest["prompt"] = {
        **manifest["prompt"],
        "template": QA_TEMPLATE,
        "history_template": "问题：{question}\n回答：{answer}\n",
    }
    manifest["generation"] = {**manifest["generation"], "max_new_tokens": 20}
    (dest / "bundle.json").write_text(json.dumps(manifest, ensure_ascii=False, indent=1), encoding="utf-8")
    return dest


@pytest.fixture(scope="module")
def qa_bundle(serving_project, tmp_path_factory) -> Path:
    return make_second_bundle(serving_project.root, tmp_path_factory.mktemp("bundles") / "qa")


def _engine(root: Path, *args, **kwargs):
    from ptune.serve.engine import Engine

    with contextlib.chdir(root):  # the bundles name their base relative to the project root
        return Engine.from_bundle(*args, max_pending=64, **kwargs)


@pytest.fixture(scope="module")
def mixed(serving_project, qa_bundle):
    """One engine: the tiny pipeline's bundle (`ptune`, prefix 4), the second (`qa`, prefix 9, another template) and
    the base alone (`base`), in a thread."""
    return _engine(serving_project.root, "models/deploy", others=[("qa", qa_bundle)], serve_base=True, max_batch=8)


@pytest.fixture(scope="module")
def alone(serving_project, qa_bundle):
    """A server of each alone, as before this issue: the bundle, the second bundle, the base alone (--base-only)."""
    root = serving_project.root
    return {
        "ptune": _engine(root, "models/deploy", max_batch=8),
        "qa": _engine(root, qa_bundle, max_batch=8),
        "base": _engine(root, "models/deploy", base_only=True, max_batch=8),
    }


def _requests(engine, root: Path, count: int = 4) -> list[tuple[str, str, object]]:
    """(model, prompt, settings) for each model and prompt: greedy, and seeded sampling of another length."""
    out = []
    for i, prompt in enumerate(dev_prompts(root)[:count]):
        for model in engine.variants:
            out.append((model, prompt, engine.settings(max_new_tokens=10 + i, do_sample=False, model=model)))
            sampled = engine.settings(max_new_tokens=6, temperature=0.95, top_p=0.7, seed=i, model=model)
            out.append((model, prompt, sampled))
    return out


def _lone_ids(alone, requests) -> list[list[int]]:
    return [alone[m].complete(p, settings=s).token_ids for m, p, s in requests]


def _together(engine, requests) -> list:
    replies = [engine.start(p, settings=s, model=m) for m, p, s in requests]
    return [r.wait() for r in replies]


def test_one_load_of_the_base_each_prefix_once(serving_project, qa_bundle, monkeypatch):
    """The base's weights load once for all bundles (and the base alone); each bundle has its own prefix, length and
    prompt format; the flags' names are what clients call them."""
    from ptune.model import native

    loads = []
    real = native.load_frozen
    monkeypatch.setattr(native, "load_frozen", lambda *a, **k: loads.append(a) or real(*a, **k))
    engine = _engine(serving_project.root, "models/deploy", others=[("qa", qa_bundle)], serve_base=True, max_batch=4)
    assert len(loads) == 1
    assert list(engine.variants) == ["ptune", "qa", "base"] and engine.name == "ptune"
    lengths = [v.prefix_length for v in engine.variants.values()]
    assert lengths[1:] == [9, 0] and lengths[0] not in (0, 9)
    assert engine.variants["qa"].prompter.format.template == QA_TEMPLATE
    assert engine.variants["base"].encoder is None
    assert engine.variants["ptune"].encoder is not engine.variants["qa"].encoder


def test_mixed_batches_answer_as_each_bundle_alone(mixed, alone, serving_project):
    """Rows of two prefixes (4 and 9 tokens, two prompt formats) and the base alone, greedy and seeded, decoded
    together: each answer token-identical to the one a server of that bundle alone gives."""
    requests = _requests(mixed, serving_project.root)
    expected = _lone_ids(alone, requests)
    before = mixed.scheduler.largest_batch
    got = _together(mixed, requests)
    assert max(before, mixed.scheduler.largest_batch) >= 6, "the rows were never decoded together"
    assert [r.token_ids for r in got] == expected
    # The prefixes matter: the same prompt gets other answers from the other bundle and from the base.
    # (Sampled: the tiny model's greedy answers repeat one token whatever the prefix.)
    first = {m: ids for (m, p, s), ids in zip(requests, expected) if p == requests[0][1] and s.do_sample}
    assert len({tuple(v) for v in first.values()}) == 3


def test_mixed_batches_in_the_schedulers_own_process(mixed, alone, serving_project):
    """The same with the scheduler in a child process (what `ptune serve` runs on a CPU): the prefixes go to it once,
    each row names its own."""
    from ptune.serve.engine import Engine
    from ptune.serve.scheduler_process import SchedulerProcess

    apart = Engine(
        mixed.bundle,
        "ptune",
        "apart",
        max_pending=64,
        max_batch=8,
        own_process=True,
        more=[mixed.variants["qa"], mixed.variants["base"]],
    )._ready()
    assert isinstance(apart.scheduler, SchedulerProcess)
    requests = _requests(apart, serving_project.root, 3)
    assert [r.token_ids for r in _together(apart, requests)] == _lone_ids(alone, requests)


def test_openai_options_per_row_in_a_mixed_batch(mixed, alone, serving_project):
    """stop strings, n seeded choices and log-probabilities, each on rows of another model, in one batch: each as the
    model alone gives it."""
    prompt = dev_prompts(serving_project.root)[1]
    plan = [
        ("qa", 2, dict(max_new_tokens=12, temperature=0.95, top_p=0.7, seed=5)),
        ("ptune", 1, dict(max_new_tokens=12, temperature=0.95, top_p=0.7, seed=3, logprobs=3)),
        ("base", 1, dict(max_new_tokens=12, do_sample=False, logprobs=0)),
    ]
    # A stop string the bundle's seeded answer holds: its answer is cut before it and its row ends there.
    whole = alone["ptune"].complete(
        prompt, settings=alone["ptune"].settings(max_new_tokens=12, temperature=0.95, top_p=0.7, seed=3)
    )
    stop = whole.text[3:5]
    assert len(stop) == 2 and stop.strip(), f"the tiny bundle's answer is too short: {whole.text!r}"
    plan[1][2]["stop"] = [stop]
    started = [
        (m, n, kw, mixed.start_choices(prompt, settings=mixed.settings(**kw, model=m), n=n, model=m))
        for m, n, kw in plan
    ]
    for m, n, kw, replies in started:
        lone = alone[m].start_choices(prompt, settings=alone[m].settings(**kw), n=n)
        for mine, theirs in zip([r.wait() for r in replies], [r.wait() for r in lone], strict=True):
            assert (mine.token_ids, mine.text, mine.finish_reason) == (
                theirs.token_ids,
                theirs.text,
                theirs.finish_reason,
            )
            if kw.get("logprobs") is not None:
                assert mine.infos() and [t for t, _ in mine.infos()] == [t for t, _ in theirs.infos()]
                for (_, a), (_, b) in zip(mine.infos(), theirs.infos()):
                    assert a[0] == pytest.approx(b[0], abs=1e-4) and [i for i, _ in a[1]] == [i for i, _ in b[1]]
    cut = started[1][3][0].result()
    assert cut.text == whole.text[: whole.text.index(stop)].strip() and cut.finish_reason == "stop"


def test_names_and_the_shared_base_are_checked(serving_project, qa_bundle, tmp_path):
    from ptune.bundle.opening import check_shared_base
    from ptune.errors import PtuneError
    from ptune.serve.arguments import named_bundles

    assert named_bundles(None) == [("ptune", Path("models/deploy"))]
    assert named_bundles(["x/y"]) == [("ptune", Path("x/y"))]
    assert named_bundles(["adgen=a", "qa=../b"]) == [("adgen", Path("a")), ("qa", Path("../b"))]
    for bad, says in (
        (["a", "b"], "named 'ptune' is given already"),
        (["base=a"], "reserved"),
        (["x=a", "x=b"], "named 'x'"),
        (["x="], "no folder"),
    ):
        with pytest.raises(PtuneError, match=says):
            named_bundles(bad)
    deploy = serving_project.root / "models" / "deploy"
    check_shared_base([("ptune", deploy), ("qa", qa_bundle)])
    other = tmp_path / "other"
    shutil.copytree(qa_bundle, other)
    manifest = json.loads((other / "bundle.json").read_text(encoding="utf-8"))
    manifest["base"]["weights"] = {k: "0" * 64 for k in manifest["base"]["weights"]}
    (other / "bundle.json").write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(PtuneError, match=r"--bundle ptune=.* and --bundle other=.* different bases.*0{64}"):
        check_shared_base([("ptune", deploy), ("other", other)])
    manifest = json.loads((qa_bundle / "bundle.json").read_text(encoding="utf-8"))
    (other / "bundle.json").write_text(json.dumps({**manifest, "quantization": "4bit"}), encoding="utf-8")
    with pytest.raises(PtuneError, match="quantization none and 4bit differ"):
        check_shared_base([("ptune", deploy), ("other", other)])


# Seeded sampling: the tiny model's greedy answers are one token repeated, whatever the prefix.
SAMPLED = {"max_tokens": 10, "temperature": 0.95, "top_p": 0.7, "seed": 7}


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as resp:
        return json.loads(resp.read())


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_the_api_routes_each_request_to_its_model(serving_project, qa_bundle, alone):
    """`ptune serve api --bundle ptune=... --bundle qa=... --serve-base`: /v1/models lists them, the first is the
    default, OpenAI's `model` and POST /'s `model` choose one (its answer as that bundle alone gives it), another
    name is a 404 naming those served; requests for all three at once are answered as each alone."""
    from concurrent.futures import ThreadPoolExecutor

    from ptune.serve.process import ApiProcess

    root = serving_project.root
    args = ["--bundle", "ptune=models/deploy", "--bundle", f"qa={qa_bundle}", "--serve-base"]
    with ApiProcess(args, cwd=root, env=serving_project.env) as api:
        assert [m["id"] for m in _get(api.url + "/v1/models")["data"]] == ["ptune", "qa", "base"]
        assert _get(api.url + "/v1/models/qa")["id"] == "qa"
        assert [m["prefix_length"] for m in _get(api.url + "/health")["models"]][1:] == [9, 0]
        prompts = dev_prompts(root)[:3]

        def ask(job):
            model, prompt = job
            body = {"model": model, "messages": [{"role": "user", "content": prompt}], **SAMPLED}
            return _post(api.url + "/v1/chat/completions", body)

        jobs = [(m, p) for p in prompts for m in ("ptune", "qa", "base")]
        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(ask, jobs))
        for (model, prompt), (status, body) in zip(jobs, answers, strict=True):
            assert status == 200 and body["model"] == model
            lone = alone[model]
            expected = lone.complete(
                prompt, settings=lone.settings(max_new_tokens=10, temperature=0.95, top_p=0.7, seed=7)
            ).text
            assert body["choices"][0]["message"]["content"] == expected, model
        texts = [body["choices"][0]["message"]["content"] for _, body in answers[:3]]
        assert len(set(texts)) == 3, texts  # three models, three answers to one prompt
        seed_body = {"prompt": prompts[0], "max_new_tokens": 10, "temperature": 0.95, "top_p": 0.7, "seed": 7}
        status, seed = _post(api.url + "/", {**seed_body, "model": "qa"})
        assert status == 200 and seed["response"] == answers[1][1]["choices"][0]["message"]["content"]
        status, default = _post(api.url + "/", seed_body)
        assert default["response"] == answers[0][1]["choices"][0]["message"]["content"]
        status, missing = _post(api.url + "/", {"prompt": prompts[0], "model": "nope"})
        assert status == 404 and missing["error"]["code"] == "model_not_found"
        assert "'ptune', 'qa', 'base'" in missing["error"]["message"]
        status, missing = ask(("ptune-base", prompts[0]))
        assert status == 404 and missing["error"]["param"] == "model"


def test_bundles_of_another_base_are_refused_before_loading(serving_project, qa_bundle, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(qa_bundle, other)
    manifest = json.loads((other / "bundle.json").read_text(encoding="utf-8"))
    manifest["base"]["weights"] = {k: "f" * 64 for k in manifest["base"]["weights"]}
    (other / "bundle.json").write_text(json.dumps(manifest), encoding="utf-8")
    proc = serving_project.run(
        "python",
        "-m",
        "ptune.serve",
        "serve",
        "api",
        "--port",
        "0",
        "--bundle",
        "models/deploy",
        "--bundle",
        f"other={other}",
        check=False,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "--bundle ptune=models/deploy and --bundle other=" in proc.stderr and "different bases" in proc.stderr
    proc = serving_project.run(
        "python",
        "-m",
        "ptune.serve",
        "chat",
        "--bundle",
        "models/deploy",
        "--bundle",
        "models/deploy",
        check=False,
        timeout=120,
    )
    assert proc.returncode == 2 and "named 'ptune' is given already" in proc.stderr
