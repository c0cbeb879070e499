"""Image-token sampling speed on the CPU, dalle_jax beside min-dalle in the same run:
`python bench/sampling.py [--tokens 256] [--images 1,4] [--repeats 1] [--scan-layers false|true|both]`.

Both run DALL·E mini's architecture (configs/dalle_mini.py) with random float32 weights and classifier-free
guidance (2 rows per image through the decoder, cond_scale 10), top-k 256 as min-dalle's default. A run's time
covers the text encoder and the whole token loop. dalle_jax's decoding kernels are stored transposed once when its
model is set up (`sampling.with_row_products`, as `TextToImage` does on the CPU) and it is compiled beforehand;
min-dalle is warmed up by a 2-token run. Runs of the two alternate; figures are medians over `--repeats`. torch gets as many threads as XLA (one per core) and, unless OMP_WAIT_POLICY is set,
OpenMP threads that sleep rather than spin at barriers.

The bound is memory bandwidth: each decoding step reads the decoder's weights, the cross-attention keys/values
and the causal part of the self-attention cache, so a step cannot take less than those bytes over the read
bandwidth measured here. `--tokens N` decodes N < 256 tokens for a quick run (dalle_jax is then built with
image_length N, so its cache is N long; min-dalle's stays 256). Needs min-dalle: `pip install min-dalle`.
The final line is one JSON object.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# OpenMP threads that spin at barriers (libgomp's default) slow torch 5-10x when other processes share the cores,
# as on a shared CI machine; sleeping ones cost it little when it has them to itself. Read when torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from bench.min_dalle_peer import IMAGE_LENGTH, MinDallePeer  # noqa: E402
from dalle_jax.configs import dalle_mini  # noqa: E402
from dalle_jax.inference import sampling
from dalle_jax.data import text as text_lib  # noqa: E402
from dalle_jax.models.dalle_bart import DalleBart  # noqa: E402

COND_SCALE = 10.0
TOP_K = 256  # min-dalle's default; its sampler always truncates
TARGETS = {1: 4.0, 4: 3.0}  # wanted dalle_jax / min-dalle tokens/s, by images per run
F32 = 4


def read_bandwidth(mib: int = 512, repeats: int = 7) -> dict:
    """Bytes/s of a sum over a large float32 array, by numpy (one thread), jax and torch (their thread pools); the
    fastest of `repeats` sums, as what the machine can do (others' work only ever slows a run down)."""
    a = np.ones(mib * 2 ** 20 // F32, np.float32)
    j, t, jsum = jnp.asarray(a), torch.from_numpy(a), jax.jit(jnp.sum)
    readers = dict(numpy=a.sum, jax=lambda: jsum(j).block_until_ready(), torch=t.sum)
    return {name: a.nbytes / fastest_seconds(fn, repeats) for name, fn in readers.items()}


def fastest_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def step_bytes(cfg, rows: int, tokens: int) -> dict:
    """Bytes one decoding step reads at the least, averaged over a loop of `tokens` steps (float32):
    weights = layers * (6 d^2 + 3 d f + 2 (5 d + f)) + d (codebook + 1) + 2 d  (4 self- and 2 cross-attention
      projections, the GLU, the layer norms; the output head; the final norm)
    cross_kv = layers * rows * 2 * text_length * d  (keys and values projected once per prompt)
    self_kv = layers * rows * 2 * d * (tokens + 1) / 2  (position t reads the cache of positions 0..t)."""
    d, f, layers = cfg.d_model, cfg.ffn_dim, cfg.decoder_layers
    weights = layers * (6 * d * d + 3 * d * f + 2 * (5 * d + f)) + d * (cfg.image_vocab_size + 1) + 2 * d
    cross_kv = layers * rows * 2 * cfg.text_length * d
    self_kv = layers * rows * 2 * d * (tokens + 1) / 2
    parts = dict(weights=weights * F32, cross_kv=cross_kv * F32, self_kv=self_kv * F32)
    return dict(parts, total=sum(parts.values()))


def prompt_ids(text_length: int) -> tuple[np.ndarray, np.ndarray]:
    """A 16-token caption and the empty caption, `<pad>`-padded BART ids."""
    ids = np.full((text_length,), text_lib.PAD_ID, np.int32)
    ids[:16] = [text_lib.BOS_ID, *range(100, 114), text_lib.EOS_ID]
    empty = np.full((text_length,), text_lib.PAD_ID, np.int32)
    empty[:2] = (text_lib.BOS_ID, text_lib.EOS_ID)
    return ids, empty


class DalleJaxRunner:
    """DalleBart with random weights and `sample_image_tokens` for a fixed number of images."""

    def __init__(self, cfg, images: int):
        make = lambda: DalleBart(cfg, rngs=nnx.Rngs(params=0, dropout=1))  # noqa: E731
        self.graphdef, _ = nnx.split(nnx.eval_shape(make))
        self.state = jax.jit(lambda: nnx.split(make())[1])()
        self.graphdef, self.state = sampling.with_row_products(self.graphdef, self.state)
        ids, self.empty = prompt_ids(cfg.text_length)
        self.ids, self.images = np.tile(ids, (images, 1)), images
        self.settings = sampling.SamplingSettings(cond_scale=COND_SCALE, top_k=TOP_K)

    def compile(self) -> float:
        """Compiles the sampler for these shapes without running it; returns the seconds taken. Lowers the jitted
        loop behind `sample_image_tokens` with the arguments it would pass, so that the first timed call finds the
        executable compiled; where sampling's internals no longer fit, a whole call (compile + run) does it."""
        start = time.perf_counter()
        try:
            args = (self.graphdef, self.state, self.ids, np.broadcast_to(self.empty, self.ids.shape),
                    np.zeros(self.images, np.uint32), np.arange(self.images, dtype=np.uint32),
                    sampling._knobs(self.settings))
            sampling._sample.lower(*args, guided=True, top_k=self.settings.top_k, mesh=None, rules=None,
                                   with_scores=False).compile()
        except (AttributeError, TypeError):
            self.run()
        return time.perf_counter() - start

    def run(self) -> tuple[np.ndarray, float]:
        start = time.perf_counter()
        tokens = sampling.sample_image_tokens(self.graphdef, self.state, self.ids, self.empty, 0,
                                              np.arange(self.images), self.settings)
        tokens = np.asarray(jax.block_until_ready(tokens))
        return tokens, time.perf_counter() - start


def check_tokens(name: str, tokens: np.ndarray, images: int, length: int, vocab: int) -> None:
    if tokens.shape != (images, length) or tokens.min() < 0 or tokens.max() >= vocab:
        raise RuntimeError(f"{name} sampled {tokens.shape} tokens in [{tokens.min()}, {tokens.max()}]; expected "
                           f"({images}, {length}) codebook indices below {vocab}.")


def measure(cfg, peer: MinDallePeer, images: int, tokens: int, repeats: int, scans: list[bool]) -> dict:
    runners = {}
    for scan in scans:
        variant = cfg.copy_and_resolve_references()
        variant.scan_layers = scan
        runner = DalleJaxRunner(variant, images)
        runners[f"dalle_jax_scan_{str(scan).lower()}"] = (runner, runner.compile())
    ids, empty = prompt_ids(cfg.text_length)
    peer.sample(ids, empty, images, tokens=2)
    times = {name: [] for name in [*runners, "min_dalle"]}
    for r in range(repeats):
        order = list(times) if r % 2 == 0 else list(reversed(times))
        for name in order:
            if name == "min_dalle":
                out, seconds = peer.sample(ids, empty, images, tokens=tokens, cond_scale=COND_SCALE, top_k=TOP_K)
                check_tokens(name, out, images, tokens, cfg.image_vocab_size)
            else:
                out, seconds = runners[name][0].run()
                check_tokens(name, out, images, tokens, cfg.image_vocab_size)
            times[name].append(seconds)
    result = {}
    for name, ts in times.items():
        seconds = statistics.median(ts)
        result[name] = dict(seconds=seconds, tokens_per_s=images * tokens / seconds, s_per_step=seconds / tokens,
                            runs=ts)
        if name in runners:
            result[name]["compile_s"] = runners[name][1]
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=IMAGE_LENGTH, help="image tokens to decode (at most 256)")
    parser.add_argument("--images", default="1,4", help="comma-separated images per run")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each implementation per setting")
    parser.add_argument("--scan-layers", default="false", choices=("false", "true", "both"),
                        help="dalle_jax's layer stack: unrolled, scanned, or both measured")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch threads (XLA's CPU client uses one per core)")
    args = parser.parse_args()
    if not 1 <= args.tokens <= IMAGE_LENGTH:
        parser.error(f"--tokens must be in [1, {IMAGE_LENGTH}].")
    image_counts = [int(n) for n in args.images.split(",")]
    scans = {"false": [False], "true": [True], "both": [False, True]}[args.scan_layers]

    cfg = dalle_mini.get_config().model.copy_and_resolve_references()
    cfg.dtype, cfg.param_dtype, cfg.remat, cfg.image_length = "float32", "float32", "none", args.tokens
    peer = MinDallePeer(d_model=cfg.d_model, layers=cfg.decoder_layers, heads=cfg.heads, ffn_dim=cfg.ffn_dim,
                        text_vocab_size=cfg.text_vocab_size, text_length=cfg.text_length,
                        image_vocab_size=cfg.image_vocab_size, threads=args.threads)
    bandwidths = read_bandwidth()
    bandwidth = max(bandwidths.values())
    print("read bandwidth: " + ", ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in bandwidths.items())
          + f"; the bound uses {bandwidth / 1e9:.1f} GB/s")

    results = []
    for images in image_counts:
        start = time.perf_counter()
        timings = measure(cfg, peer, images, args.tokens, args.repeats, scans)
        need = step_bytes(cfg, 2 * images, args.tokens)
        bound_s = need["total"] / bandwidth
        best = max((k for k in timings if k.startswith("dalle_jax")), key=lambda k: timings[k]["tokens_per_s"])
        ratio = timings[best]["tokens_per_s"] / timings["min_dalle"]["tokens_per_s"]
        target = TARGETS.get(images)
        for name, t in timings.items():
            t["fraction_of_bound"] = bound_s / t["s_per_step"]
            extra = f", compile {t['compile_s']:.1f} s" if "compile_s" in t else ""
            print(f"{images} image(s) {name}: {t['tokens_per_s']:.2f} tokens/s, {t['s_per_step'] * 1e3:.0f} ms/step "
                  f"= {t['fraction_of_bound']:.0%} of the bandwidth bound{extra}")
        verdict = "no target"
        if target is not None:
            verdict = f"target >= {target:g}x " + ("met" if ratio >= target else "MISSED")
        mb = {k: v / 1e6 for k, v in need.items()}
        print(f"{images} image(s): bound {bound_s * 1e3:.0f} ms/step ({mb['total']:.0f} MB: weights "
              f"{mb['weights']:.0f}, cross K/V {mb['cross_kv']:.1f}, cache {mb['self_kv']:.1f}) "
              f"= {images / bound_s:.1f} tokens/s; {best} / min_dalle = {ratio:.2f}x, {verdict} "
              f"[{time.perf_counter() - start:.0f} s]")
        results.append(dict(images=images, bytes_per_step=need, bound_s_per_step=bound_s,
                            bound_tokens_per_s=images / bound_s, timings=timings, dalle_jax=best,
                            ratio=ratio, target=target, target_met=None if target is None else ratio >= target))
    print(json.dumps(dict(
        benchmark="sampling", tokens=args.tokens, cond_scale=COND_SCALE, top_k=TOP_K, repeats=args.repeats,
        read_bandwidth_bytes_per_s=bandwidths, bound_bandwidth_bytes_per_s=bandwidth,
        torch_threads=torch.get_num_threads(), omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
        torch_version=torch.__version__, jax_version=jax.__version__,
        platform=jax.devices()[0].platform, machine=f"{platform.machine()} x{os.cpu_count()}",
        load_average=os.getloadavg(), results=results)))


if __name__ == "__main__":
    main()
