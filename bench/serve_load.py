"""Load on the HTTP API: N concurrent clients for a bounded time; requests/s, latency percentiles, errors.

    python bench/serve_load.py                          # serves models/deploy on a free loopback port itself
    python bench/serve_load.py --clients 1,8 --seconds 20 --endpoint stream
    python bench/serve_load.py --clients 1,8 --max-batch 1     # the baseline: one request at a time
    python bench/serve_load.py --url http://127.0.0.1:8000 --api-key KEY   # a server you started

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
        body, path = {"prompt": prompt}, "/"
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
    model: str,
    headers: dict,
    texts: list[str],
    max_new: int | None,
) -> dict:
    results, errors, busy, lock = [], [], [], threading.Lock()
    counter = itertools.count()
    deadline = time.perf_counter() + seconds

    def client() -> None:
        while time.perf_counter() < deadline:
            prompt = texts[next(counter) % len(texts)]
            try:
                result = one_request(url, endpoint, prompt, model, headers, max_new)
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
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    texts = prompts(Path(args.prompts))
    server = None
    if args.url:
        host = urllib.parse.urlparse(args.url).hostname
        if host not in ("127.0.0.1", "localhost", "::1"):
            parser.error(f"--url {args.url}: only a server on this machine (127.0.0.1) may be loaded")
        url = args.url.rstrip("/")
    else:
        batch = ["--max-batch", str(args.max_batch)] if args.max_batch else []
        server = ApiProcess(["--bundle", args.bundle, *batch])
        server.start()
        url = server.url
        print(f"started `ptune serve api --bundle {args.bundle} {' '.join(batch)}` on {url} in {server.load_s:.1f} s")
    failed = 0
    try:
        req = urllib.request.Request(url + "/v1/models", headers=headers)
        with urllib.request.urlopen(req, timeout=30) as resp:
            model = json.loads(resp.read())["data"][0]["id"]
        one_request(url, args.endpoint, texts[0], model, headers, args.max_new_tokens)  # warm-up
        print(
            "| clients | endpoint | requests | errors | requests/s | p50 s | p95 s | max s | first text p50 s "
            "| tokens/s | busy (503) |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for clients in levels:
            r = load(url, args.endpoint, clients, args.seconds, model, headers, texts, args.max_new_tokens)
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
    finally:
        if server is not None:
            server.stop()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
