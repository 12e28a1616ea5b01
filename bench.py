"""Benchmarks: measured, printed, and written as JSON. Nothing here is a test; nothing is asserted.

    python bench.py towers --image-tower L2 --text-tower Large --image-size 289 --batch 1

`towers`: compile time and steady-state time of both towers' forward + backward (training mode:
BatchNorm batch statistics, stochastic depth), the part of ALIGN's step that grows with model size.
"""

import argparse
import dataclasses
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp

import bert
import efficientnet as en


def towers(args):
    img_cfg = dataclasses.replace(en.CONFIGS[args.image_tower], dtype=args.dtype, remat=args.remat)
    txt_cfg = dataclasses.replace(bert.CONFIGS[args.text_tower], dtype=args.dtype, remat=args.remat,
                                  vocab_size=args.vocab_size)
    B, S, L = args.batch, args.image_size, txt_cfg.max_len

    t0 = time.perf_counter()
    params = {"image": jax.jit(en.init, static_argnums=1)(jax.random.key(0), img_cfg),
              "text": jax.jit(bert.init, static_argnums=1)(jax.random.key(1), txt_cfg)}
    (img_params, bn_state), txt_params = params["image"], params["text"]
    jax.block_until_ready(txt_params)
    init_s = time.perf_counter() - t0
    print(f"initialised {args.image_tower} + BERT-{args.text_tower} in {init_s:.1f} s", flush=True)

    images = jax.random.uniform(jax.random.key(2), (B, S, S, 3), minval=-1, maxval=1)
    ids = jax.random.randint(jax.random.key(3), (B, L), 0, txt_cfg.vocab_size)
    mask = jnp.ones((B, L), jnp.int32)

    def loss(p, bn_state, images, ids, mask, rng):
        f_BD, bn_state = en.apply(p["image"], bn_state, images, img_cfg, train=True, rng=rng)
        cls_BD = bert.apply(p["text"], ids, mask, txt_cfg)[:, 0].astype(jnp.float32)
        return jnp.mean(f_BD ** 2) + jnp.mean(cls_BD ** 2), bn_state

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    p = {"image": img_params, "text": txt_params}
    t0 = time.perf_counter()
    lowered = step.lower(p, bn_state, images, ids, mask, jax.random.key(4))
    trace_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    print(f"traced in {trace_s:.1f} s, compiled in {compile_s:.1f} s", flush=True)

    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(p, bn_state, images, ids, mask, jax.random.key(5 + i)))
        print(f"step {i}: {time.perf_counter() - t0:.2f} s{' (warm-up)' if i < args.warmup else ''}", flush=True)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    n_params = sum(x.size for x in jax.tree.leaves(p))
    return {"measure": "towers", "image_tower": args.image_tower, "text_tower": args.text_tower,
            "image_size": S, "batch": B, "text_len": L, "dtype": args.dtype, "remat": args.remat,
            "params": n_params, "init_s": round(init_s, 2), "trace_s": round(trace_s, 2),
            "compile_s": round(compile_s, 2), "step_s_median": round(statistics.median(times), 3),
            "step_s_all": [round(t, 3) for t in times], "device": str(jax.devices()[0].device_kind),
            "devices": jax.device_count(), "machine": f"{platform.machine()}, {jax.local_device_count()} local device(s)"}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="measure", required=True)
    t = sub.add_parser("towers", help="compile and step time of both towers' forward + backward")
    t.add_argument("--image-tower", default="L2", choices=list(en.CONFIGS))
    t.add_argument("--text-tower", default="Large", choices=list(bert.CONFIGS))
    t.add_argument("--image-size", type=int, default=289, help="ALIGN Sec. 5: 289x289 for every variant")
    t.add_argument("--batch", type=int, default=1)
    t.add_argument("--vocab-size", type=int, default=100_000)
    t.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    t.add_argument("--remat", action="store_true")
    t.add_argument("--warmup", type=int, default=1)
    t.add_argument("--steps", type=int, default=3)
    t.add_argument("--json", default=None, help="also write the result to this file")
    args = ap.parse_args()
    result = towers(args)
    for k, v in result.items():
        print(f"{k:>15}: {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
