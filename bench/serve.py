"""dalle-jax-serve under load, beside calling `TextToImage` directly, in the same run:
`python bench/serve.py --workdir runs/demo/dalle [--clients 1,4,16] [--requests 3] [--candidates 1]`.

One process loads the run once. The peer calls the loaded `TextToImage` directly, one request after another (one
prompt, one image, its own seed), as a script without the server would. Then the server (the same loaded model,
with uvicorn on a free local port in a thread) takes the same requests from 1, 4 and 16 clients at once, each a
thread with its own HTTP connection sending `--requests` requests one after another. Both are compiled before they
are timed (the server at each batch size it pads to). Figures: requests per second and latency percentiles (ms); `ratio` is the server's requests per second
over the direct calls'. On the CPU, other processes sharing the cores move every figure: compare only figures of
one run. The final line is one JSON object.
"""
import argparse
import concurrent.futures
import json
import os
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import uvicorn  # noqa: E402

from dalle_jax.inference.text_to_image import TextToImage  # noqa: E402
from dalle_jax.serve import validation  # noqa: E402
from dalle_jax.serve.app import create_app  # noqa: E402

PROMPTS = ["a small red circle in the top left", "a green triangle above a purple circle", "a blue square",
           "a yellow circle below a red square"]


def summary(latencies: list[float], seconds: float) -> dict:
    ms = np.asarray(latencies) * 1000
    return dict(requests=len(latencies), seconds=round(seconds, 3), requests_per_second=round(len(latencies) / seconds, 3),
                p50_ms=round(float(np.percentile(ms, 50)), 1), p90_ms=round(float(np.percentile(ms, 90)), 1),
                p99_ms=round(float(np.percentile(ms, 99)), 1))


def direct(pipe: TextToImage, count: int, settings: dict) -> dict:
    pipe(PROMPTS[0], 1, seed=0, **settings)  # compiles the one-image batch
    latencies, started = [], time.perf_counter()
    for n in range(count):
        begun = time.perf_counter()
        pipe(PROMPTS[n % len(PROMPTS)], 1, seed=n, **settings)
        latencies.append(time.perf_counter() - begun)
    return summary(latencies, time.perf_counter() - started)


def served(url: str, clients: int, requests: int, settings: dict) -> dict:
    def client(c: int) -> list[float]:
        times = []
        with httpx.Client(timeout=600) as http:
            for n in range(requests):
                body = dict(prompts=[PROMPTS[(c + n) % len(PROMPTS)]], num_images=1, seed=c * requests + n, **settings)
                begun = time.perf_counter()
                reply = http.post(f"{url}/api/samples", json=body)
                reply.raise_for_status()
                times.append(time.perf_counter() - begun)
        return times

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        latencies = [t for times in pool.map(client, range(clients)) for t in times]
    return summary(latencies, time.perf_counter() - started)


def start_server(pipe: TextToImage, max_wait_ms: float, max_queued: int) -> tuple[uvicorn.Server, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(pipe, limits=validation.Limits(), max_wait_s=max_wait_ms / 1000, max_queued_images=max_queued)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            if httpx.get(f"{url}/health").json()["compiled"]:
                return server, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/demo/dalle", help="a trained seq2seq run (make demo's)")
    parser.add_argument("--clients", default="1,4,16", help="comma-separated numbers of concurrent clients")
    parser.add_argument("--requests", type=int, default=3, help="requests per client, one image each")
    parser.add_argument("--candidates", type=int, default=1, help="draws per image (the run's reranker picks)")
    parser.add_argument("--batch_size", type=int, default=16, help="draws per sampler call")
    parser.add_argument("--max_wait_ms", type=float, default=50)
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    settings = dict(candidates=args.candidates)
    pipe = TextToImage.from_workdir(args.workdir, batch_size=args.batch_size)
    server, url = start_server(pipe, args.max_wait_ms, max(clients) * 16)
    # One request of each batch size the server pads to compiles each before the timing.
    size = 1
    while size <= args.batch_size // args.candidates:
        httpx.post(f"{url}/api/samples", json=dict(prompts=[PROMPTS[0]], num_images=size, **settings),
                   timeout=600).raise_for_status()
        size *= 2
    rows = []
    for count in clients:
        peer = direct(pipe, count * args.requests, settings)
        serve = served(url, count, args.requests, settings)
        rows.append(dict(clients=count, serve=serve, direct=peer,
                         ratio=round(serve["requests_per_second"] / peer["requests_per_second"], 3)))
        print(f"{count:>3} clients: serve {serve['requests_per_second']:7.2f} req/s (p50 {serve['p50_ms']:7.0f} ms, "
              f"p90 {serve['p90_ms']:7.0f}, p99 {serve['p99_ms']:7.0f}) | direct {peer['requests_per_second']:7.2f} "
              f"req/s (p50 {peer['p50_ms']:7.0f} ms) | ratio {rows[-1]['ratio']:.2f}", flush=True)
    server.should_exit = True
    print(json.dumps(dict(bench="serve", workdir=args.workdir, step=pipe.seq2seq.step, batch_size=args.batch_size,
                          max_wait_ms=args.max_wait_ms, candidates=args.candidates, cpus=os.cpu_count(),
                          load_average=[round(x, 2) for x in os.getloadavg()], rows=rows,
                          note="CPU shared with other processes; compare figures of one run only")))


if __name__ == "__main__":
    main()
