"""Load on the HTTP API: N concurrent clients for a bounded time; requests/s, latency percentiles, errors.

    python bench/serve_load.py                          # serves models/deploy on a free loopback port itself
    python bench/serve_load.py --clients 1,8 --seconds 20 --endpoint stream
    python bench/serve_load.py --clients 1,8 --max-batch 1     # the baseline: one request at a time
    python bench/serve_load.py --url http://127.0.0.1:8000 --api-key KEY   # a server you started
    python bench/serve_load.py --bundles 2 --clients 1,8 --seconds 8    # one bundle, then two of one base (issue 39)

With `--bundles N` (N >= 2) it first serves models/deploy alone, then N bundles of its base from one server
(models/deploy and N-1 copies of it with random prefixes of other lengths and another prompt template, made in a
temporary folder), the clients' requests alternating between them (`model`); for each server, after its load, its
memory: the PSS of the server and its scheduler's process together (PSS divides shared pages among the processes that
map them, so the weights the two share through shared memory count once).

Each client sends one request after another (prompts from data/raw/dev.json, in turn) until the time is up;
requests still running then are waited for. Only 127.0.0.1 is a target. Endpoints: `seed` (POST /), `openai`
(/v1/chat/completions) and `stream` (the same with stream: true; also time to first token). A 503 (more clients
than the server's --max-pending) is counted as busy, not as an error, and its client waits the Retry-After it was
given before asking again. Exits 1 if any request failed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow"))

from ptune.serve.process import ApiProcess  # noqa: E402

FALLBACK_PROMPTS = ["类型#上衣*颜色#白色*风格#简约*衣样式#衬衫", "类型#裤*材质#牛仔布*风格#休闲"]


def prompts(path: Path) -> list[str]:
    if path.is_file():
        return [json.loads(line)["content"] for line in path.read_text(encoding="utf-8").splitlines() if line]
    return FALLBACK_PROMPTS


def one_request(
    url: str, endpoint: str, prompt: str, model: str, headers: dict, max_new: int | None
) -> tuple[float, float | None, int | None]:
    """Returns (latency s, time to first text s or None, completion tokens or None); raises on any failure."""
    if endpoint == "seed":
        body, path = {"prompt": prompt, "model": model}, "/"
        if max_new:
            body["max_new_tokens"] = max_new
    else:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "stream": endpoint == "stream",
            "stream_options": {"include_usage": True},
        }
        if endpoint != "stream":
            del body["stream_options"]
        if max_new:
            body["max_tokens"] = max_new
        path = "/v1/chat/completions"
    req = urllib.request.Request(
        url + path,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json", **headers},
    )
    t0 = time.perf_counter()
    first = tokens = None
    with urllib.request.urlopen(req, timeout=600) as resp:
        if endpoint != "stream":
            answer = json.loads(resp.read())
            if endpoint == "seed" and not isinstance(answer.get("response"), str):
                raise ValueError(f"no response in {answer}")
            if endpoint == "openai":
                tokens = answer["usage"]["completion_tokens"]
        else:
            done = False
            for raw in resp:
                line = raw.decode().strip()
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise ValueError(chunk["error"])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    first = time.perf_counter() - t0
            if not done:
                raise ValueError("the stream ended without [DONE]")
    return time.perf_counter() - t0, first, tokens


def load(
    url: str,
    endpoint: str,
    clients: int,
    seconds: float,
    models: list[str],
    headers: dict,
    texts: list[str],
    max_new: int | None,
) -> dict:
    results, errors, busy, lock = [], [], [], threading.Lock()
    counter = itertools.count()
    deadline = time.perf_counter() + seconds

    def client() -> None:
        while time.perf_counter() < deadline:
            i = next(counter)
            prompt = texts[i % len(texts)]
            try:  # the served models in turn
                result = one_request(url, endpoint, prompt, models[i % len(models)], headers, max_new)
            except urllib.error.HTTPError as exc:
                if exc.code != 503:
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                # Busy (more requests than --max-pending): not an error; wait as the server says, as a client should.
                with lock:
                    busy.append(1)
                wait = float(exc.headers.get("Retry-After") or 1)
                time.sleep(max(0.0, min(wait, deadline - time.perf_counter())))
                continue
            except (OSError, ValueError, KeyError) as exc:
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
                continue
            with lock:
                results.append(result)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(r[0] for r in results)
    firsts = sorted(r[1] for r in results if r[1] is not None)
    tokens = [r[2] for r in results if r[2] is not None]

    def pct(values: list[float], q: float) -> float:
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")

    return {
        "clients": clients,
        "endpoint": endpoint,
        "requests": len(results),
        "errors": len(errors),
        "busy": len(busy),
        "wall_s": wall,
        "requests_per_s": len(results) / wall,
        "p50_s": statistics.median(lat) if lat else None,
        "p95_s": pct(lat, 0.95),
        "max_s": lat[-1] if lat else None,
        "ttft_p50_s": statistics.median(firsts) if firsts else None,
        "tokens_per_s": sum(tokens) / wall if tokens else None,
        "first_errors": errors[:3],
    }


def pss_mib(pid: int) -> float:
    """PSS of a process and its descendants (the scheduler's process), MiB: shared pages divided among their mappers."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return total / 1024


def second_bundles(source: Path, count: int, folder: Path) -> list[str]:
    """`count` copies of the bundle in `source`, each with a random prefix of another length and another prompt
    template, the same base: `NAME=PATH` for --bundle."""
    import shutil

    import torch

    from ptune.model.prefix_encoder import PrefixConfig, PrefixEncoder

    config = json.loads((source / "prefix" / "prefix_config.json").read_text(encoding="utf-8"))
    out = []
    for i in range(count):
        dest = folder / f"task{i + 2}"
        shutil.copytree(source, dest)
        torch.manual_seed(i)
        encoder = PrefixEncoder(PrefixConfig(**{**config, "pre_seq_len": config["pre_seq_len"] + 5 * (i + 1)}))
        shutil.rmtree(dest / "prefix")
        encoder.save(dest / "prefix")
        manifest = json.loads((dest / "bundle.json").read_text(encoding="utf-8"))
        manifest["prompt"] = {**manifest["prompt"], "template": "问题：{content}\n回答：", "history_template": ""}
        (dest / "bundle.json").write_text(json.dumps(manifest, ensure_ascii=False), encoding="utf-8")
        out.append(f"task{i + 2}={dest}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server (loopback only); default: start one on --bundle")
    parser.add_argument("--bundle", default="models/deploy")
    parser.add_argument("--api-key")
    parser.add_argument("--clients", default="8", help="comma-separated client counts, run one after another")
    parser.add_argument("--seconds", type=float, default=20, help="per client count (default: %(default)s)")
    parser.add_argument("--endpoint", choices=("seed", "openai", "stream"), default="openai")
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--prompts", default="data/raw/dev.json")
    parser.add_argument(
        "--max-batch", type=int, help="the started server's --max-batch (1: one request at a time, the baseline)"
    )
    parser.add_argument(
        "--bundles",
        type=int,
        default=1,
        help="N >= 2: the bundle alone, then N bundles of its base from one server, requests alternating (issue 39)",
    )
    args = parser.parse_args()
    if args.bundles < 1:
        parser.error(f"--bundles {args.bundles}: must be 1 or more")
    if args.bundles > 1 and args.url:
        parser.error("--bundles starts its own servers; leave out --url")
    if args.bundles > 1:
        import tempfile

        failed = 0
        with tempfile.TemporaryDirectory() as tmp:
            more = second_bundles(Path(args.bundle), args.bundles - 1, Path(tmp))
            for served in ([f"ptune={args.bundle}"], [f"ptune={args.bundle}", *more]):
                failed += run_server(args, served)
        return 1 if failed else 0
    return run_server(args, [args.bundle]) if not args.url else run_server(args, [])


def run_server(args, bundles: list[str]) -> int:
    """The load levels against one server: `bundles` (each `[NAME=]PATH`) started here, or none: --url's."""
    levels = [int(c) for c in args.clients.split(",")]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    texts = prompts(Path(args.prompts))
    server = None
    if args.url:
        host = urllib.parse.urlparse(args.url).hostname
        if host not in ("127.0.0.1", "localhost", "::1"):
            sys.exit(f"--url {args.url}: only a server on this machine (127.0.0.1) may be loaded")
        url = args.url.rstrip("/")
    else:
        batch = ["--max-batch", str(args.max_batch)] if args.max_batch else []
        flags = [f for b in bundles for f in ("--bundle", b)]
        server = ApiProcess([*flags, *batch])
        server.start()
        url = server.url
        print(f"started `ptune serve api {' '.join(flags + batch)}` on {url} in {server.load_s:.1f} s")
    failed = 0
    try:
        req = urllib.request.Request(url + "/v1/models", headers=headers)
        with urllib.request.urlopen(req, timeout=30) as resp:
            models = [m["id"] for m in json.loads(resp.read())["data"]]
        for model in models:  # warm-up, each
            one_request(url, args.endpoint, texts[0], model, headers, args.max_new_tokens)
        print(f"models: {', '.join(models)} (requests alternate between them)")
        print(
            "| clients | endpoint | requests | errors | requests/s | p50 s | p95 s | max s | first text p50 s "
            "| tokens/s | busy (503) |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for clients in levels:
            r = load(url, args.endpoint, clients, args.seconds, models, headers, texts, args.max_new_tokens)
            failed += r["errors"]

            def f(v):
                return "–" if v is None else f"{v:.3f}"

            tps = "–" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.1f}"
            print(
                f"| {clients} | {args.endpoint} | {r['requests']} | {r['errors']} | {r['requests_per_s']:.2f} "
                f"| {f(r['p50_s'])} | {f(r['p95_s'])} | {f(r['max_s'])} | {f(r['ttft_p50_s'])} | {tps} | {r['busy']} |",
                flush=True,
            )
            for e in r["first_errors"]:
                print(f"  error: {e}")
        if server is not None:
            print(
                f"server memory after the load: PSS {pss_mib(server._proc.pid):.0f} MiB (server + scheduler's process)"
            )
    finally:
        if server is not None:
            server.stop()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
