"""Times the seq2seq (DalleBart) train step: `python bench/seq2seq_step.py [--configs shapes,mini-width] [--steps 5]`.

For each config it prints the compile time, the median step time, image tokens/s, the model FLOPs of a step
(analytic, `dalle_bart.train_flops_per_example`), the compiler's FLOP count (XLA counts the body of a scanned
layer stack once, so with scan_layers it sees one encoder and one decoder layer), and the MFU: model FLOPs/s over
the float32 matmul peak (`throughput.matmul_peak_flops`) measured in this process. The peak is sampled before
every timed call and its median used, so that on a shared machine it sees the same load the steps do.

Options: `--parts` also times the forward pass (loss) and the gradients without the optimizer update;
`--xla_option KEY=VALUE` compiles the measured programs with an XLA option (`xla_cpu_experimental_ynn_fusion_type=`
turns XLA:CPU's YNNPACK kernels off); `--set FIELD=VALUE` changes a field of every measured config
(`--set model.scan_layers=False`). The final line is one JSON object.

Configs: `shapes` is configs/shapes_dalle.py as shipped; `mini-width` is DALL·E mini's width (d_model 1024, 16
heads, GLU 2730, 64 text and 256 image tokens, 16,384 codes, 50,264 text ids) with 2 + 2 layers, batch 8, float32
compute, no remat, on one device. Batches are random tokens; captions have random lengths, padded.
"""
import argparse
import ast
import functools
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dalle_jax.configs import dalle_mini, shapes_dalle  # noqa: E402
from dalle_jax import parallel  # noqa: E402
from dalle_jax.data import text as text_lib  # noqa: E402
from dalle_jax.models import dalle_bart  # noqa: E402
from dalle_jax.trainers import seq2seq_step  # noqa: E402
from dalle_jax.training import throughput  # noqa: E402


def mini_width_config():
    config = dalle_mini.get_config()
    model = config.model
    model.d_model, model.heads, model.ffn_dim = 1024, 16, 2730
    model.encoder_layers = model.decoder_layers = 2
    model.text_length, model.image_length, model.image_vocab_size = 64, 256, 16384
    config.text.vocab_size = 50264  # model.text_vocab_size follows it
    model.dtype, model.remat = "float32", "none"
    config.data.batch_size = 8
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 1, 1
    return config


CONFIGS = {"shapes": shapes_dalle.get_config, "mini-width": mini_width_config}


def override(config, assignment: str) -> None:
    """`a.b=value` (a Python literal, or a bare string) sets config.a.b."""
    path, _, text = assignment.partition("=")
    *parents, field = path.split(".")
    node = config
    for parent in parents:
        node = node[parent]
    try:
        node[field] = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        node[field] = text


def random_batch(config, rng: np.random.Generator) -> dict:
    """`<s>` + random ids + `</s>`, then padding, at random caption lengths; random image codes."""
    b, lt, li = config.data.batch_size, config.model.text_length, config.model.image_length
    text = np.full((b, lt), text_lib.PAD_ID, np.int32)
    for row, length in enumerate(rng.integers(text_lib.MIN_MAX_LENGTH, lt + 1, b)):
        text[row, 0], text[row, length - 1] = text_lib.BOS_ID, text_lib.EOS_ID
        text[row, 1:length - 1] = rng.integers(4, config.model.text_vocab_size, length - 2)
    codes = rng.integers(0, config.model.image_vocab_size, (b, li), dtype=np.int32)
    return dict(text_ids=text, codes=codes)


def timed(compiled, args, steps: int, carry_state: bool, peaks: list) -> float:
    """Median seconds of `steps` calls after one warm-up call; a train step's new state feeds the next call. A
    sample of the matmul peak is appended to `peaks` before each timed call."""
    times = []
    for i in range(steps + 1):
        if i:
            peaks.append(throughput.matmul_peak_flops(repeats=3))
        start = time.perf_counter()
        out = compiled(*args)
        jax.block_until_ready(out)
        if i:
            times.append(time.perf_counter() - start)
        if carry_state:
            args = (out[0],) + args[1:]
    return statistics.median(times)


def compile_timed(fn, options, *args):
    start = time.perf_counter()
    compiled = fn.lower(*args).compile(compiler_options=options)
    return compiled, time.perf_counter() - start


def measure(name: str, config, steps: int, parts: bool, options: dict | None) -> dict:
    mesh = parallel.make_mesh(config.mesh)
    setup, state, shardings = seq2seq_step.create(config, mesh)
    batch_sh, replicated = parallel.batch_sharding(mesh), parallel.replicated(mesh)
    batch = parallel.global_batch(random_batch(config, np.random.default_rng(0)), mesh)
    step_fn = jax.jit(functools.partial(seq2seq_step.train_step, setup), in_shardings=(shardings, batch_sh),
                      out_shardings=(shardings, replicated), donate_argnums=0)
    compiled, compile_s = compile_timed(step_fn, options, state, batch)
    xla_flops = (compiled.cost_analysis() or {}).get("flops", float("nan"))
    peaks = []
    step_s = timed(compiled, (state, batch), steps, carry_state=True, peaks=peaks)
    peak = statistics.median(peaks)

    b, li = config.data.batch_size, config.model.image_length
    model_flops = dalle_bart.train_flops_per_example(config.model) * b
    result = dict(config=name, batch_size=b, devices=mesh.size, matmul_peak_gflop_per_s=peak / 1e9,
                  compile_s=compile_s, step_s=step_s,
                  tokens_per_s=b * li / step_s, model_gflop_per_step=model_flops / 1e9,
                  xla_gflop_per_step=xla_flops / 1e9, model_gflop_per_s=model_flops / step_s / 1e9,
                  mfu=throughput.mfu(model_flops, 1 / step_s, peak, mesh.size))
    if parts:
        result.update(_parts(setup, shardings, config, mesh, batch, steps, model_flops, options))
    return result


def _parts(setup, shardings, config, mesh, batch, steps: int, model_flops: float, options) -> dict:
    """Seconds of the forward pass (a third of the model FLOPs) and of the gradients (all of them) alone."""
    _, state, _ = seq2seq_step.create(config, mesh)
    batch_sh = parallel.batch_sharding(mesh)
    key = jax.random.key(0)

    def forward(params, batch):
        with setup.activation_sharding():
            return seq2seq_step._loss(setup, params, batch["text_ids"], batch["codes"], key, deterministic=False)[0]

    def grads(params, batch):
        with setup.activation_sharding():
            return seq2seq_step.gradients(setup, params, batch["text_ids"], batch["codes"], key)

    out = {}
    for part, fn, share in (("forward", forward, 1 / 3), ("gradients", grads, 1.0)):
        jitted = jax.jit(fn, in_shardings=(shardings["params"], batch_sh))
        compiled, _ = compile_timed(jitted, options, state["params"], batch)
        peaks = []
        seconds = timed(compiled, (state["params"], batch), steps, carry_state=False, peaks=peaks)
        out[f"{part}_s"] = seconds
        out[f"{part}_mfu"] = throughput.mfu(model_flops * share, 1 / seconds, statistics.median(peaks), mesh.size)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="shapes,mini-width", help=f"comma-separated, from {sorted(CONFIGS)}")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per config (after one warm-up step)")
    parser.add_argument("--parts", action="store_true", help="also time the forward pass and the gradients alone")
    parser.add_argument("--xla_option", action="append", default=[], metavar="KEY=VALUE",
                        help="an XLA compiler option for the measured programs (repeatable)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a config field for every measured config, e.g. model.scan_layers=False (repeatable)")
    args = parser.parse_args()
    options = dict(option.split("=", 1) for option in args.xla_option) or None
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"--configs names {unknown}; choose from {sorted(CONFIGS)}")
    if args.steps < 1:
        parser.error(f"--steps={args.steps} must be at least 1")

    results = []
    for name in names:
        config = CONFIGS[name]()
        for assignment in args.set:
            override(config, assignment)
        r = measure(name, config, args.steps, args.parts, options)
        results.append(r)
        print(f"{name}: f32 matmul peak measured here {r['matmul_peak_gflop_per_s']:.1f} GFLOP/s; batch "
              f"{r['batch_size']}, step {r['step_s'] * 1e3:.1f} ms (median of {args.steps}), "
              f"{r['tokens_per_s']:.0f} image tokens/s, model {r['model_gflop_per_step']:.1f} GFLOP/step, "
              f"XLA {r['xla_gflop_per_step']:.1f} GFLOP/step, {r['model_gflop_per_s']:.1f} GFLOP/s, "
              f"MFU {r['mfu']:.1%}, compile {r['compile_s']:.1f} s")
        if args.parts:
            # Each part is timed on its own, under its own share of a shared machine's load: compare MFUs.
            print(f"  forward {r['forward_s'] * 1e3:.1f} ms (MFU {r['forward_mfu']:.1%}), forward + backward "
                  f"{r['gradients_s'] * 1e3:.1f} ms (MFU {r['gradients_mfu']:.1%})")
    print(json.dumps(dict(benchmark="seq2seq_step", steps=args.steps, xla_options=options, overrides=args.set,
                          platform=jax.devices()[0].platform, machine=f"{platform.machine()} x{os.cpu_count()}",
                          results=results)))


if __name__ == "__main__":
    main()
