"""`python bench.py gpu`: one prepared run for a lent H100/H200 (issue 17), under a global time budget.

    python bench.py gpu                      # on one H100/H200: ~7 min (--budget-s 420), writes bench_gpu.json
    python bench.py gpu --tiny               # every section at a made-up tiny size (automatic on CPU): ~1 min

Four sections, each in its own process with its own share of the budget (a share left unused passes to the
next), so that a compile that runs long is killed at its share and the next section still runs:

correctness  the tiny model's training loss, gradients and BatchNorm statistics on the device against the
             CPU's (jax.devices('cpu'), same process, same inputs, float32 at "highest" matmul precision;
             also at the default precision, where GPUs may use TF32), and the bfloat16 embeddings of B7 +
             BERT-Base against the float32 ones (evaluation mode, 289 px): pass/fail against stated tolerances.
step         train.make_step for B7 + BERT-Base and L2 + BERT-Large at 289 px in bfloat16, remat off and on,
             at the largest per-device batch that fits (the search is below): compile time, median step time
             after warm-up (block_until_ready), images/s, XLA's memory plan; MFU from bench.step_flops.
depthwise    B7's depthwise convolutions (every stage's shapes at 289 px, bfloat16) forward + backward in
             each form: XLA's grouped conv (efficientnet's "conv"), the shifted multiply-adds with their
             hand-written backward pass ("shift"), and three more (IMPLS). Milliseconds per shape, and per
             B7 step (each shape times the number of blocks that have it).
torch        HF transformers' AlignModel of the same sizes (bench.hf_configs, as versus-torch; bf16 autocast,
             channels_last): both towers, the projection and HF's loss forward + backward (our step less the
             optimizer), at the largest batch the step section fitted; torch.compile if time is left.

Beside them one CPU-only process counts the step's model FLOPs (bench.step_flops at batch 1 and 2: the
count is linear in the batch, the update being the constant part), which takes tens of seconds of tracing
and so runs while the device compiles.

The batch search. A compile is the expensive part (tens of seconds per batch on a GPU), so the search
predicts rather than doubles: memory(b) = fixed + b x per_sample, with `fixed` the parameters, optimizer
state and their gradient, and per_sample first from the residuals that autodiff saves (traced, not
compiled: jax.eval_shape of jax.vjp), then from XLA's memory plan of each compiled batch. It tries the
batch that fills 92% of the device, then bisects between the largest that fitted and the smallest that did
not (`next_batch`), until they are within 12.5% or the budget is spent. A batch "does not fit" when XLA's
plan exceeds the device or compiling or running it raises an out-of-memory error; either is recorded, not
raised. Without a memory limit (CPU) it doubles from --start-batch.

The JSON (--out): {"measure": "gpu", "flags", "budget_s", "tiny", "date", "total_s", "machine",
"peak_tflops", "sections": {name: {"status": "ok" | "error" | "timeout" | "skipped", "seconds", "budget_s",
"error" or "skipped" (why), and the section's results}}}:
  correctness  "checks": [{check, rel_diff, max_abs_diff, tolerance, pass}]
  step         "rows": [{model, size, remat, batch, fits, compile_s, step_ms, images_per_s, gflops_per_device,
               tflops_per_s, mfu, xla_memory_gib, predicted_memory_gib, note}], "largest": {model: batch},
               "searches": [{model, tried: {batch: fits}, stopped}]
  depthwise    "shapes": [{shape, blocks, ms: {impl: ms}, rel_diff_vs_conv, compile_s}], "totals": [{impl, ms_per_step}]
  torch        "rows": [{model, impl, batch, fwd_bwd_ms, images_per_s, jax_step_images_per_s}]
  flops        "counts": {size: {fixed, per_sample}} (FLOPs per device: fixed + batch x per_sample)
It is rewritten after every section, and each section's process writes its partial results after every
row, so a run stopped at any point leaves what it had.
"""

import dataclasses
import functools
import json
import math
import os
import signal
import subprocess
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import align
import backprop
import bench
import efficientnet as en
import memory
import train

SECTIONS = ("correctness", "step", "depthwise", "torch")
SHARES = {"correctness": 0.18, "step": 0.50, "depthwise": 0.12, "torch": 0.20}  # of what is left, renormalised
MEMORY_TARGET = 0.92  # of the device's memory: headroom for fragmentation and library workspaces

# Tolerances of the correctness checks. Float32 device against CPU differs only in summation order (far under
# 1e-3 relative, METHOD.md); TF32 rounds operands to 10 bits. bfloat16 embeddings: unit vectors, so the
# distance is sqrt(2 (1 - cos)); B7 at 96 px on CPU gave 0.03 (image) and 0.01 (text).
TOLERANCES = {"loss": 1e-5, "grads": 1e-3, "bn_state": 1e-4, "loss_default": 1e-2, "grads_default": 5e-2,
              "embedding": 0.1}


# ----------------------------------------------------------------------------------------------------
# Models and small helpers


def model_config(size, tiny, dtype=None, remat=False):
    """(align.Config, train.Recipe) as train.py resolves --size: 289 px, 100k words, bfloat16.

    tiny: not even align.SIZES['tiny'], whose training step takes 15-60 s to compile on a 2-core CPU, but
    its first three EfficientNet stages and one BERT layer at 16 px, in float32 unless `dtype` says (CPUs
    emulate bfloat16, and XLA:CPU takes half as long again to compile it).
    """
    dtype = dtype or ("float32" if tiny else "bfloat16")
    argv = ["--size", "tiny" if tiny else size, "--dtype", dtype] + ["--remat"] * remat
    cfg, recipe = train.resolve(train.parse_args(argv + ["--image-size", "16"] * tiny))
    if tiny:
        cfg = dataclasses.replace(cfg, image=dataclasses.replace(cfg.image, stages=en.B0_STAGES[:3]),
                                  text=dataclasses.replace(cfg.text, layers=1, vocab_size=64, max_len=8))
        cfg = dataclasses.replace(cfg, embed_dim=cfg.image.features)
    return cfg, recipe


def is_out_of_memory(e):
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower() or type(e).__name__ == "OutOfMemoryError"


def first_line(e):
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"


def nbytes(tree):
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))  # PRNG keys' dtypes too


def save(path, rec):
    """Atomically, so that a process killed mid-write leaves the previous version."""
    with open(path + ".tmp", "w") as f:
        json.dump(rec, f, indent=1, default=str)
    os.replace(path + ".tmp", path)


def rel_diff(ref, got):
    """(|got - ref| / |ref| over all leaves together, max |got - ref|), in float64."""
    ref = [np.asarray(x, np.float64) for x in jax.tree.leaves(ref)]
    got = [np.asarray(x, np.float64) for x in jax.tree.leaves(got)]
    num = math.sqrt(sum(np.sum((g - r) ** 2) for r, g in zip(ref, got)))
    den = math.sqrt(sum(np.sum(r ** 2) for r in ref))
    return num / max(den, 1e-30), max(float(np.max(np.abs(g - r), initial=0.0)) for r, g in zip(ref, got))


def check(name, ref, got, tolerance, **info):
    rel, max_abs = rel_diff(ref, got)
    ok = bool(np.isfinite(rel) and rel <= tolerance)
    print(f"  {'pass' if ok else 'FAIL'}: {name}: relative {rel:.2e} (tolerance {tolerance:g}), max |diff| {max_abs:.2e}",
          flush=True)
    return {"check": name, "rel_diff": rel, "max_abs_diff": max_abs, "tolerance": tolerance, "pass": ok, **info}


# ----------------------------------------------------------------------------------------------------
# correctness: the device against the CPU, bfloat16 against float32


def section_correctness(args, rec, left):
    dev, cpu = jax.devices()[0], jax.devices("cpu")[0]
    limit = memory_limit(dev, None)
    rec["machine"] = {**bench.machine(), "memory_limit_gib": limit and limit / 2**30}
    save(args.partial, rec)
    checks = rec.setdefault("checks", [])
    cfg, recipe = model_config("tiny", args.tiny, dtype="float32")
    B, S, L = 8, recipe.image_size, cfg.text.max_len
    params, state = jax.device_get(align.init(jax.random.key(0), cfg))
    pixels, ids, mask = jax.device_get(bench.fake_batch(jax.random.key(1), B, S, cfg.text))
    mask = np.where(np.arange(L) < np.arange(B)[:, None] % L + 2, 1, 0).astype(mask.dtype)  # padding that differs per row
    rng = jax.random.key(2)

    @jax.jit
    def loss_and_grads(params, state, pixels, ids, mask, rng):
        (loss, (_, new_state)), grads = jax.value_and_grad(align.train_loss, has_aux=True)(
            params, state, pixels, ids, mask, cfg, rng, label_smoothing=recipe.label_smoothing)
        return loss, grads, new_state

    def on(device, precision):
        with jax.default_matmul_precision(precision):
            return jax.device_get(loss_and_grads(*jax.device_put((params, state, pixels, ids, mask, rng), device)))

    print(f"correctness: {bench.describe(cfg, recipe)} step on {dev.device_kind} against the CPU", flush=True)
    ref = on(cpu, "highest")
    got = on(dev, "highest")
    where = f"{dev.platform} vs cpu, float32, highest precision"
    checks.append(check(f"step loss ({where})", ref[0], got[0], TOLERANCES["loss"]))
    leaf_rel = [(jax.tree_util.keystr(path), rel_diff(r, g)[0]) for (path, r), g in
                zip(jax.tree_util.tree_leaves_with_path(ref[1]), jax.tree.leaves(got[1]))]
    worst = max(leaf_rel, key=lambda t: t[1])
    checks.append(check(f"step gradients ({where})", ref[1], got[1], TOLERANCES["grads"],
                        worst_leaf=worst[0], worst_leaf_rel_diff=worst[1]))
    checks.append(check(f"BatchNorm statistics ({where})", ref[2], got[2], TOLERANCES["bn_state"]))
    if dev.platform == "cpu":
        rec["default_precision"] = "not checked: the device is the CPU"
    else:
        got = on(dev, "default")
        where = f"{dev.platform} at default precision (TF32 allowed) vs cpu"
        checks.append(check(f"step loss ({where})", ref[0], got[0], TOLERANCES["loss_default"]))
        checks.append(check(f"step gradients ({where})", ref[1], got[1], TOLERANCES["grads_default"]))
    save(args.partial, rec)

    # bfloat16 against float32 embeddings. Evaluation mode: in training mode BatchNorm's batch statistics make
    # random-noise images' features differences of near-equal numbers (1 - cos up to 0.3 in bfloat16 at B7).
    size = "tiny" if args.tiny else args.embed_size
    if left() < (5 if args.tiny else 25):  # two compiles of B7's forward pass
        rec["embeddings"] = f"skipped: {left():.0f} s left"
        return
    cfg, recipe = model_config(size, args.tiny, dtype="float32")
    B, S = 8, recipe.image_size
    print(f"correctness: {bench.describe(cfg, recipe)} embeddings, bfloat16 against float32, batch {B}", flush=True)
    params, state = align.init(jax.random.key(3), cfg)
    pixels, ids, mask = bench.fake_batch(jax.random.key(4), B, S, cfg.text)
    embed = jax.jit(lambda params, state, pixels, ids, mask, cfg: (  # one program for both towers: one compile
        align.embed_images(params, state, pixels, cfg), align.embed_texts(params, ids, mask, cfg)), static_argnums=5)
    emb = {}
    for dtype in ("float32", "bfloat16"):
        c = dataclasses.replace(cfg, image=dataclasses.replace(cfg.image, dtype=dtype),
                                text=dataclasses.replace(cfg.text, dtype=dtype))
        with jax.default_matmul_precision("highest"):  # the float32 reference without TF32
            emb[dtype] = jax.device_get(embed(params, state, pixels, ids, mask, c))
    for k, tower in enumerate(("image", "text")):
        a, b = emb["float32"][k], emb["bfloat16"][k]
        distance = float(np.max(np.linalg.norm(a - b, axis=-1)))
        ok = bool(np.isfinite(distance) and distance <= TOLERANCES["embedding"])
        checks.append({"check": f"{tower} embeddings, bfloat16 vs float32 ({cfg.image.name if k == 0 else cfg.text.name}, "
                                f"{S} px, evaluation mode)", "rel_diff": distance, "max_abs_diff": float(np.max(np.abs(a - b))),
                       "min_cosine": float(np.min(np.sum(a * b, axis=-1))), "tolerance": TOLERANCES["embedding"], "pass": ok})
        print(f"  {'pass' if ok else 'FAIL'}: {checks[-1]['check']}: max |e16 - e32| {distance:.3f} "
              f"(tolerance {TOLERANCES['embedding']})", flush=True)


# ----------------------------------------------------------------------------------------------------
# step: the largest batch that fits, remat off and on


def next_batch(tried, predicted, cap, start):
    """The next per-device batch to try, or None when done.

    tried: {batch: fits}. predicted: the batch the memory model says fills the device (None: no model).
    Stops when the largest batch that fits (lo) and the smallest that does not (hi) are within 12.5%, when lo
    is the cap, or when the model sees under 12.5% more room above lo. Batches from 16 up are multiples of 8.
    """
    lo = max((b for b, ok in tried.items() if ok), default=0)
    hi = min((b for b, ok in tried.items() if not ok), default=cap + 1)
    if lo >= cap or hi - lo <= max(1, lo // 8):
        return None
    if predicted is None:  # double, then bisect
        b = (lo + hi) // 2 if hi <= cap else min(2 * lo if lo else start, cap)
    else:
        if lo and hi > cap and predicted < lo * 9 / 8:
            return None
        b = min(predicted, cap)
        b = b if lo < b < hi else (lo + hi) // 2
    if b >= 16 and b - b % 8 > lo:
        b -= b % 8
    return b if lo < b < hi else None


def memory_limit(device, override_gib):
    if override_gib:
        return override_gib * 2**30
    return (device.memory_stats() or {}).get("bytes_limit")


def residual_bytes(cfg, recipe, batch):
    """Bytes that autodiff saves for the backward pass of the loss at this batch: traced, nothing compiled."""
    def residuals(params, state, pixels, ids, mask, rng):
        return jax.vjp(lambda p: align.train_loss(p, state, pixels, ids, mask, cfg, rng), params, has_aux=True)[1]
    shapes = jax.eval_shape(lambda: (*align.init(jax.random.key(0), cfg),
                                     *bench.fake_batch(jax.random.key(1), batch, recipe.image_size, cfg.text), jax.random.key(2)))
    return nbytes(jax.eval_shape(residuals, *shapes))


class Search:
    """One (model, remat) configuration's batch search and its memory model (module docstring)."""

    def __init__(self, size, remat, args, limit):
        self.size, self.remat, self.limit, self.tried, self.done = size, remat, limit, {}, False
        self.cfg, self.recipe = model_config(size, args.tiny, remat=remat)
        self.name = f"{self.cfg.image.name} + BERT-{self.cfg.text.name}, remat {'on' if remat else 'off'}"
        self.fixed = self.per_sample = self.stopped = None
        self.plans = {}  # batch: XLA's planned bytes

    def start_model(self, params, opt_state):
        """fixed: parameters, BatchNorm state, optimizer state, and the gradient and update (two parameter copies)."""
        r1, r2 = (residual_bytes(self.cfg, self.recipe, b) for b in (1, 2))
        self.fixed = nbytes(opt_state) + 3 * nbytes(params) + max(2 * r1 - r2, 0)
        self.per_sample = 1.2 * (r2 - r1)  # XLA adds temporaries to what autodiff saves

    def learn(self, batch, total_bytes):
        """XLA's memory plans replace the traced estimate: the line through the two largest batches compiled, or
        with one, the slope that keeps `fixed` (XLA shares buffers that the estimate counts twice: B1 at 64 px
        planned 0.88 GiB at batch 14 and 1.12 at 24, the line's fixed part 0.54 GiB against 0.66 estimated)."""
        if self.per_sample is None or not total_bytes:
            return
        self.plans[batch] = total_bytes
        (b1, t1), (b2, t2) = ([(0, self.fixed)] + sorted(self.plans.items()))[-2:]
        self.per_sample = max((t2 - t1) / (b2 - b1), 1.0)
        self.fixed = t2 - self.per_sample * b2

    def predicted(self):
        if self.per_sample is None:
            return None
        return max(int((MEMORY_TARGET * self.limit - self.fixed) // self.per_sample), 1)


def attempt(search, batch, model, args, mesh):
    """Compile and time the step at one per-device batch; an out-of-memory anywhere makes fits False."""
    cfg, recipe = search.cfg, search.recipe
    row = {"model": search.name, "size": search.size, "remat": search.remat, "batch": batch}
    print(f"step: {search.name}, batch {batch}", flush=True)
    live, batch_arrays, total = [], (), None
    try:
        params, state = model["init"](jax.random.key(0))  # fresh each time: a failed step may have consumed them
        live = [params, state, model["opt_init"](params)]
        batch_arrays = jax.device_put(bench.fake_batch(jax.random.key(1), batch, recipe.image_size, cfg.text),
                                      NamedSharding(mesh, P("data")))
        t0 = time.perf_counter()
        compiled = train.make_step(cfg, recipe, model["optimizer"], mesh, bn_across=False).lower(
            *live, *batch_arrays, jax.random.key(2)).compile()
        row["compile_s"] = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        total = memory.step_memory(mem)["total"] if mem else None
        row["xla_memory_gib"] = total and total / 2**30
        if search.per_sample is not None:
            row["predicted_memory_gib"] = (search.fixed + batch * search.per_sample) / 2**30
        if search.limit and total and total > search.limit:
            row.update(fits=False, note=f"XLA's plan needs {total / 2**30:.1f} GiB of {search.limit / 2**30:.1f}")
            return row, total
        calls = iter(range(1 << 30))

        def run_step():
            out = compiled(*live, *batch_arrays, jax.random.fold_in(jax.random.key(3), next(calls)))
            live[:] = out[:3]  # the step donates its inputs: carry its outputs on
            return out

        med, times = bench.timed_rounds({"step": run_step}, args.warmup, args.steps)
        s = med["step"]
        row.update(fits=True, step_ms=1e3 * s, images_per_s=batch / s, step_ms_all=[1e3 * t for t in times["step"]],
                   loss=float(run_step()[3]["loss"]))
        print(f"  compiled in {row['compile_s']:.1f} s, step {1e3 * s:.1f} ms, {batch / s:.1f} images/s", flush=True)
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        row.update(fits=False, note="out of memory: " + first_line(e))
        print(f"  out of memory at batch {batch}", flush=True)
    finally:
        for x in jax.tree.leaves((live, batch_arrays)):
            if not x.is_deleted():
                x.delete()
    return row, total


def section_step(args, rec, left):
    dev = jax.devices()[0]
    mesh = jax.sharding.Mesh(np.array([dev]), ("data",))  # one device: the batch per device is the batch
    limit = memory_limit(dev, args.memory_limit_gib)
    sizes = ["tiny"] if args.tiny else args.sizes
    cap = args.max_batch or (2 if args.tiny else 512)
    start = args.start_batch or (2 if args.tiny else 8)
    rec.update(device=dev.device_kind, memory_limit_gib=limit and limit / 2**30, max_batch=cap, rows=[], largest={},
               dtype=model_config(sizes[0], args.tiny)[0].image.dtype)
    models, searches = {}, [Search(size, remat, args, limit) for remat in (False, True) for size in sizes]
    compile_s = {}  # the longest compile seen per size: a later attempt needs about as long
    while not all(s.done for s in searches):
        for search in searches:
            if search.done:
                continue
            if search.size not in models:  # remat changes no parameter: one initialisation for both
                cfg, recipe = model_config(search.size, args.tiny)
                optimizer, _ = train.make_optimizer(recipe, None)
                models[search.size] = {"init": functools.partial(align.init, cfg=cfg), "optimizer": optimizer,
                                       "opt_init": jax.jit(optimizer.init)}
            model = models[search.size]
            if limit and not search.tried and search.per_sample is None:
                params = jax.eval_shape(model["init"], jax.random.key(0))[0]
                try:
                    search.start_model(params, jax.eval_shape(model["opt_init"], params))
                except Exception as e:  # then it doubles from --start-batch, as without a limit
                    search.fixed = search.per_sample = None
                    rec.setdefault("memory_model_errors", {})[search.name] = first_line(e)
            b = next_batch(search.tried, search.predicted(), cap, start)
            if b is None or left() < 1.2 * compile_s.get(search.size, 0) + 5:
                search.done = True
                search.stopped = (("converged" if any(search.tried.values()) else "nothing fits") if b is None
                                  else f"budget: {left():.0f} s left")
                continue
            try:
                row, total = attempt(search, b, model, args, mesh)
            except Exception as e:  # not memory: this configuration cannot run; record it and go on
                row, total = {"model": search.name, "size": search.size, "remat": search.remat, "batch": b,
                              "fits": None, "error": first_line(e)}, None
                search.done, search.stopped = True, "error"
                traceback.print_exc()
            compile_s[search.size] = max(compile_s.get(search.size, 0), row.get("compile_s", 0))
            if row["fits"] is not None:
                search.tried[b] = row["fits"]
                search.learn(b, total)
            rec["rows"].append(row)
            fitted = [r for r in rec["rows"] if r["model"] == search.name and r["fits"]]
            if fitted:
                rec["largest"][search.name] = max(r["batch"] for r in fitted)
            save(args.partial, rec)
    rec["searches"] = [{"model": s.name, "tried": s.tried, "stopped": s.stopped} for s in searches]


def section_flops(args, rec, left):
    """Per-device model FLOPs of the step at batch 1 and 2 (CPU only): flops(b) = fixed + b x per_sample."""
    for size in (["tiny"] if args.tiny else args.sizes):
        cfg, recipe = model_config(size, args.tiny)
        t0 = time.perf_counter()
        params, state = jax.eval_shape(lambda: align.init(jax.random.key(0), cfg))
        optimizer, _ = train.make_optimizer(recipe, None)
        opt_state = jax.eval_shape(optimizer.init, params)
        f1, f2 = (bench.step_flops(cfg, recipe, optimizer, params, state, opt_state,
                                   *jax.eval_shape(lambda: bench.fake_batch(jax.random.key(1), b, recipe.image_size, cfg.text)),
                                   jax.eval_shape(lambda: jax.random.key(0))) for b in (1, 2))
        rec.setdefault("counts", {})[size] = {"fixed": 2 * f1 - f2, "per_sample": f2 - f1, "seconds": time.perf_counter() - t0}
        print(f"flops: {bench.describe(cfg, recipe)}: {(f2 - f1) / 1e9:.1f} GFLOP per pair, "
              f"{(2 * f1 - f2) / 1e9:.1f} per step ({time.perf_counter() - t0:.0f} s)", flush=True)
        save(args.partial, rec)


# ----------------------------------------------------------------------------------------------------
# depthwise: the forms of B7's depthwise convolutions, forward + backward


def _same_pads(n, kernel, stride):
    """TF "SAME" padding of one spatial axis, as efficientnet._depthwise computes it."""
    total = max((-(-n // stride) - 1) * stride + kernel - n, 0)
    return total // 2, total - total // 2


def _shift_autodiff(x_BHWC, w_KK1C, stride):
    """The shifted multiply-adds (backprop.taps_sum) with autodiff's backward instead of the hand-written one."""
    K, (_, H, W, _) = w_KK1C.shape[0], x_BHWC.shape
    pads = [(0, 0, 0), (*_same_pads(H, K, stride), 0), (*_same_pads(W, K, stride), 0), (0, 0, 0)]
    return backprop.taps_sum(jax.lax.pad(x_BHWC, jnp.zeros((), x_BHWC.dtype), pads), w_KK1C[:, :, 0, :].astype(x_BHWC.dtype), stride)


def _conv_nchw(x_BHWC, w_KK1C, stride):
    """XLA's grouped conv with channels before space (cuDNN's depthwise kernels are written for both layouts)."""
    y = jax.lax.conv_general_dilated(x_BHWC.transpose(0, 3, 1, 2), w_KK1C.astype(x_BHWC.dtype), (stride, stride), "SAME",
                                     dimension_numbers=("NCHW", "HWIO", "NCHW"), feature_group_count=x_BHWC.shape[-1])
    return y.transpose(0, 2, 3, 1)


def _conv_f32(x_BHWC, w_KK1C, stride):
    """XLA's grouped conv in float32 between casts: a depthwise conv is memory-bound, if bfloat16 has no fast kernel."""
    return en._depthwise(x_BHWC.astype(jnp.float32), w_KK1C, stride, "SAME", "conv").astype(x_BHWC.dtype)


IMPLS = {"conv": lambda x, w, s: en._depthwise(x, w, s, "SAME", "conv"),
         "shift": lambda x, w, s: en._depthwise(x, w, s, "SAME", "shift"),
         "shift, autodiff": _shift_autodiff, "conv, NCHW": _conv_nchw, "conv, float32": _conv_f32}


def depthwise_shapes(cfg, image_size):
    """Every distinct depthwise conv of the tower: (H, D, K, stride, number of blocks), heaviest first."""
    H = -(-image_size // 2)  # after the stride-2 stem, "SAME"
    shapes = {}
    for stage in cfg.blocks():
        for b in stage:
            key = (H, b.in_channels * b.expand, b.kernel, b.stride)
            shapes[key] = shapes.get(key, 0) + 1
            H = -(-H // b.stride)
    return sorted(((*k, n) for k, n in shapes.items()), key=lambda s: -s[0] ** 2 * s[1] * s[2] ** 2 * s[4])


def section_depthwise(args, rec, left):
    cfg, recipe = model_config("tiny" if args.tiny else "B7", args.tiny)
    B = args.dw_batch or (2 if args.tiny else 32)
    rec.update(model=cfg.image.name, image_size=recipe.image_size, batch=B, dtype="bfloat16", shapes=[])
    print(f"depthwise: EfficientNet-{cfg.image.name} at {recipe.image_size} px, batch {B}, bfloat16", flush=True)
    shapes, longest = depthwise_shapes(cfg.image, recipe.image_size), 0.0
    for H, D, K, stride, count in shapes[:1] if args.tiny else shapes:  # tiny: the code path, not the numbers
        if left() < max(1.5 * longest, 2 if args.tiny else 8):  # a shape takes about as long as the last ones
            rec["stopped"] = f"budget: {left():.0f} s left"
            break
        started = time.perf_counter()
        k1, k2, k3 = jax.random.split(jax.random.key(H * D + K), 3)
        x = jax.random.normal(k1, (B, H, H, D), jnp.bfloat16)
        w = jax.random.normal(k2, (K, K, 1, D), jnp.float32) / K
        g = jax.random.normal(k3, (B, -(-H // stride), -(-H // stride), D), jnp.bfloat16)
        shape = {"shape": f"{H}x{H}x{D}, {K}x{K}, stride {stride}", "blocks": count, "ms": {}, "compile_s": {},
                 "rel_diff_vs_conv": {}, "errors": {}}
        fns, outs = {}, {}
        for name, impl in IMPLS.items():
            @jax.jit
            def f(x, w, g, impl=impl):
                y, vjp = jax.vjp(lambda x, w: impl(x, w, stride), x, w)
                return y, *vjp(g)  # y, dx, dw
            try:
                t0 = time.perf_counter()
                outs[name] = jax.block_until_ready(f(x, w, g))
                shape["compile_s"][name] = time.perf_counter() - t0
                fns[name] = functools.partial(f, x, w, g)
            except Exception as e:
                shape["errors"][name] = first_line(e)
        if "conv" in outs:
            for name, out in outs.items():
                shape["rel_diff_vs_conv"][name] = max(rel_diff(r.astype(jnp.float32), o.astype(jnp.float32))[0]
                                                      for r, o in zip(outs["conv"], out))
        del outs
        med, _ = bench.timed_rounds(fns, args.warmup, args.steps)
        shape["ms"] = {name: 1e3 * t for name, t in med.items()}
        rec["shapes"].append(shape)
        longest = max(longest, time.perf_counter() - started)
        print(f"  {shape['shape']} (x{count}): " + ", ".join(f"{n} {t:.2f} ms" for n, t in shape["ms"].items()), flush=True)
        save(args.partial, rec)
    rec["totals"] = [{"impl": name, "ms_per_step": sum(s["blocks"] * s["ms"][name] for s in rec["shapes"])}
                     for name in IMPLS if all(name in s["ms"] for s in rec["shapes"])]


# ----------------------------------------------------------------------------------------------------
# torch: HF's AlignModel of the same sizes


def section_torch(args, rec, left):
    try:
        import torch
        import transformers
    except ImportError as e:
        rec["skipped"] = f"torch or transformers not importable: {e}"
        return
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and not args.tiny:
        rec["skipped"] = "torch has no CUDA device"
        return
    rec.update(torch=torch.__version__, transformers=transformers.__version__, torch_device=dev, rows=[])
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    if dev == "cpu":  # on a shared CPU torch's spinning OpenMP threads cost 4-30x (BENCHMARKS.md, versus-torch)
        torch.set_num_threads(1)
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its algorithms (in the warm-up), as XLA does
    done = {}
    if args.results and os.path.exists(args.results):
        with open(args.results) as f:
            done = json.load(f).get("sections", {}).get("step", {})
    for size in (["tiny"] if args.tiny else args.sizes):
        cfg, recipe = model_config(size, args.tiny)
        S, L = recipe.image_size, cfg.text.max_len
        ours = [r for r in done.get("rows", []) if r.get("size") == size and not r["remat"] and r.get("fits")]
        B = max((r["batch"] for r in ours), default=args.torch_batch or (2 if args.tiny else 16))
        vision, text = bench.hf_configs(cfg, S)
        with torch.device(dev):  # built where it runs: L2's 480M parameters are slow to initialise on a CPU
            model = transformers.AlignModel(transformers.AlignConfig(text_config=text, vision_config=vision,
                                                                     projection_dim=cfg.embed_dim))
        model = model.to(memory_format=torch.channels_last).train()  # channels_last: NHWC, as ours
        for impl in ("eager", "torch.compile"):
            if impl == "torch.compile" and (dev == "cpu" or left() < args.torch_compile_min_s):
                rec.setdefault("skipped_compile", f"{size}: {'on CPU' if dev == 'cpu' else f'{left():.0f} s left'}")
                continue
            run = model if impl == "eager" else torch.compile(model)
            while B >= 1:
                row = {"model": bench.describe(cfg, recipe), "size": size, "impl": impl, "batch": B}
                print(f"torch: HF AlignModel, {row['model']}, {impl}, batch {B} on {dev}", flush=True)
                x = torch.rand(B, 3, S, S, device=dev).mul(2).sub(1).contiguous(memory_format=torch.channels_last)
                ids = torch.randint(1, cfg.text.vocab_size, (B, L), device=dev)
                mask = torch.ones_like(ids)

                def step():  # both towers, the projection and HF's contrastive loss: our step less the optimizer
                    model.zero_grad(set_to_none=True)
                    with torch.autocast(dev, dtype=torch.bfloat16):
                        loss = run(input_ids=ids, attention_mask=mask, pixel_values=x, return_loss=True).loss
                    loss.backward()
                    sync()
                    return loss
                try:
                    t0 = time.perf_counter()
                    step()
                    row["first_call_s"] = time.perf_counter() - t0
                    med, times = bench.timed_rounds({impl: step}, args.warmup, args.steps)
                except Exception as e:  # out of memory: half the batch; anything else: this model, this impl fail
                    oom = is_out_of_memory(e)
                    rec["rows"].append({**row, "fits": False if oom else None, ("note" if oom else "error"): first_line(e)})
                    save(args.partial, rec)
                    del x, ids, mask
                    if dev == "cuda":
                        torch.cuda.empty_cache()
                    if not oom:
                        traceback.print_exc()
                        break
                    B //= 2
                    continue
                s = med[impl]
                jax_step = [r for r in ours if r["batch"] == B]
                row.update(fits=True, fwd_bwd_ms=1e3 * s, images_per_s=B / s, all_ms=[1e3 * t for t in times[impl]],
                           jax_step_images_per_s=jax_step[0]["images_per_s"] if jax_step else None)
                rec["rows"].append(row)
                print(f"  {1e3 * s:.1f} ms, {B / s:.1f} images/s", flush=True)
                save(args.partial, rec)
                break
        model = run = None  # freed before the next size is built
        if dev == "cuda":
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------
# The parent: one process per section, under the global deadline


def run_section(args):
    """In a child process: one section, its results saved to --partial after every row."""
    t0 = time.perf_counter()
    left = lambda: args.section_budget_s - (time.perf_counter() - t0) - 3  # 3 s to write before the kill
    # The torch section never touches JAX's devices (JAX would claim the GPU), the FLOP count runs on the CPU.
    if args.section in ("correctness", "step", "depthwise"):
        args.tiny = args.tiny or jax.default_backend() == "cpu"
    if args.cache_dir and not args.tiny:  # a rerun on the same machine reuses the compiled programs
        jax.config.update("jax_compilation_cache_dir", args.cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    rec = {"tiny": args.tiny}
    save(args.partial, rec)
    t_start = time.perf_counter()
    fn = {"correctness": section_correctness, "step": section_step, "depthwise": section_depthwise,
          "torch": section_torch, "flops": section_flops}[args.section]
    try:
        fn(args, rec, left)
    except Exception as e:
        traceback.print_exc()
        rec["error"] = first_line(e)
        raise SystemExit(1)
    finally:
        rec["own_seconds"] = time.perf_counter() - t_start  # the FLOP count's process is reaped only at the end
        save(args.partial, rec)


def child_command(args, section, partial, budget_s):
    argv = [sys.executable, os.path.abspath(bench.__file__), "gpu", "--section", section, "--partial", partial,
            "--section-budget-s", f"{budget_s:.0f}", "--results", args.out, "--warmup", str(args.warmup),
            "--steps", str(args.steps), "--sizes", *args.sizes, "--embed-size", args.embed_size,
            "--torch-compile-min-s", str(args.torch_compile_min_s), "--cache-dir", args.cache_dir]
    for flag in ("max_batch", "start_batch", "dw_batch", "torch_batch", "memory_limit_gib"):
        if getattr(args, flag):
            argv += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    return argv + ["--tiny"] * bool(args.tiny)


def start_child(args, section, budget_s, env=None):
    partial = f"{args.out}.{section}.partial.json"
    if os.path.exists(partial):
        os.remove(partial)
    # Its own process group, so that a kill at the deadline also ends what it started (torch.compile's workers).
    proc = subprocess.Popen(child_command(args, section, partial, budget_s), env={**os.environ, **(env or {})},
                            start_new_session=True)
    return proc, partial


def finish_child(proc, partial, timeout_s, budget_s, t0):
    """Wait up to timeout_s, kill past it; the section's record: its partial results, status, seconds."""
    status = "ok"
    try:
        rc = proc.wait(timeout=max(timeout_s, 0))
    except subprocess.TimeoutExpired:
        rc, status = None, "timeout"
    finally:  # past its time, or the parent interrupted (the child's own session does not see Ctrl-C)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    rec = {}
    if os.path.exists(partial):
        with open(partial) as f:
            rec = json.load(f)
        os.remove(partial)
    if os.path.exists(partial + ".tmp"):  # killed while writing: the version before stands
        os.remove(partial + ".tmp")
    if status == "timeout":
        rec["error"] = f"stopped at its budget of {budget_s:.0f} s; the results are those it had"
    elif rc != 0:
        status = "error"
        rec.setdefault("error", f"exited with status {rc}")
    elif "skipped" in rec:
        status = "skipped"
    return {"status": status, "seconds": time.perf_counter() - t0, "budget_s": budget_s, **rec}


def merge_flops(result):
    """MFU of each step row from the FLOP count: flops(b) = fixed + b x per_sample, per device."""
    step, flops, peak = result["sections"].get("step", {}), result["sections"].get("flops", {}), result["peak_tflops"]
    for row in step.get("rows", []):
        count = flops.get("counts", {}).get(row.get("size"))
        if count and row.get("step_ms"):
            f = count["fixed"] + row["batch"] * count["per_sample"]
            row.update(gflops_per_device=f / 1e9, tflops_per_s=f / row["step_ms"] / 1e9,
                       mfu=f / (row["step_ms"] / 1e3) / (peak * 1e12) if peak else None)


def print_tables(result):
    s = result["sections"]
    print(f"\n## bench.py gpu: {result['machine'].get('device', '?')}, {result['total_s']:.0f} s of {result['budget_s']} s"
          f"{' (tiny)' if result['tiny'] else ''}; MFU against {result['peak_tflops'] or 'n/a'} TFLOP/s (dense bf16)\n")
    print_rows = functools.partial(bench.print_table, markdown=True)
    print_rows([{"section": k, **v, "note": v.get("error") or v.get("skipped") or v.get("stopped") or ""} for k, v in s.items()],
               [("section", "section", None), ("status", "status", None), ("seconds", "seconds", "{:.0f}"),
                ("budget s", "budget_s", "{:.0f}"), ("note", "note", None)])
    if s.get("correctness", {}).get("checks"):
        print()
        print_rows(s["correctness"]["checks"], [("check", "check", None), ("relative diff", "rel_diff", "{:.2e}"),
                                                ("max abs diff", "max_abs_diff", "{:.2e}"), ("tolerance", "tolerance", "{:g}"),
                                                ("pass", "pass", None)])
    if s.get("step", {}).get("rows"):
        print()
        print_rows(s["step"]["rows"], [("model", "model", None), ("batch", "batch", None), ("fits", "fits", None),
                                       ("compile s", "compile_s", "{:.0f}"), ("step ms", "step_ms", "{:.1f}"),
                                       ("images/s", "images_per_s", "{:.1f}"), ("TFLOP/s", "tflops_per_s", "{:.1f}"),
                                       ("MFU", "mfu", "{:.1%}"), ("XLA GiB", "xla_memory_gib", "{:.1f}"),
                                       ("note", "note", None), ("error", "error", None)])
    if s.get("depthwise", {}).get("shapes"):
        d = s["depthwise"]
        print(f"\ndepthwise, EfficientNet-{d['model']} at {d['image_size']} px, batch {d['batch']}, bf16, "
              "forward + backward, ms:\n")
        impls = list(IMPLS)
        rows = [{"shape": x["shape"], "blocks": x["blocks"], **x["ms"]} for x in d["shapes"]]
        rows += [{"shape": "per step (x blocks)", **{t["impl"]: t["ms_per_step"] for t in d.get("totals", [])}}]
        print_rows(rows, [("shape", "shape", None), ("blocks", "blocks", None)] + [(n, n, "{:.2f}") for n in impls])
    if s.get("torch", {}).get("rows"):
        print()
        print_rows(s["torch"]["rows"], [("model", "model", None), ("impl", "impl", None), ("batch", "batch", None),
                                        ("fwd+bwd ms", "fwd_bwd_ms", "{:.1f}"), ("images/s", "images_per_s", "{:.1f}"),
                                        ("JAX step images/s", "jax_step_images_per_s", "{:.1f}"), ("note", "note", None),
                                        ("error", "error", None)])


def main(args):
    """The parent: runs each section in a child process, each under its share of what is left of --budget-s."""
    if args.section:
        return run_section(args)
    t0 = time.perf_counter()
    deadline = t0 + args.budget_s - 5  # 5 s to merge, write and print
    result = {"measure": "gpu", "flags": {k: v for k, v in vars(args).items() if k != "fn"}, "budget_s": args.budget_s, "tiny": args.tiny, "date": time.strftime("%Y-%m-%d %H:%M"),
              "machine": {}, "peak_tflops": None, "sections": {}}
    flops = None
    try:
        for i, name in enumerate(SECTIONS):
            if i == 1:  # the FLOP count needs no device, only --tiny (known now): on the CPU beside the rest
                flops = (start_child(args, "flops", max(deadline - time.perf_counter(), 1), {"JAX_PLATFORMS": "cpu"}),
                         time.perf_counter(), deadline - time.perf_counter())
            left = deadline - time.perf_counter()
            budget = left * SHARES[name] / sum(SHARES[n] for n in SECTIONS[i:])
            if budget < (5 if args.tiny else 20):
                result["sections"][name] = {"status": "skipped", "skipped": f"budget: {left:.0f} s left", "seconds": 0}
                continue
            # The step section takes nearly all the device's memory; the others keep JAX's default (75%), and
            # the torch section's process claims none for JAX (it never uses JAX's devices).
            env = {"step": {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95"},
                   "torch": {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}}.get(name)
            started = time.perf_counter()
            proc, partial = start_child(args, name, budget, env)
            result["sections"][name] = finish_child(proc, partial, budget + 2, budget, started)
            if name == "correctness":
                result["machine"] = result["sections"][name].get("machine", {})
                result["tiny"] = args.tiny = bool(args.tiny or result["sections"][name].get("tiny"))
            save(args.out, result)
    finally:
        if flops:  # waited for up to the deadline, or at once if the parent was interrupted
            (proc, partial), started, budget = flops
            interrupted = sys.exc_info()[0] is not None
            result["sections"]["flops"] = finish_child(proc, partial, 0 if interrupted else deadline - time.perf_counter(),
                                                       budget, started)
    result["total_s"] = time.perf_counter() - t0
    device = result["machine"].get("device") or result["sections"].get("step", {}).get("device")
    result["peak_tflops"] = bench.peak_tflops(device, args.peak_tflops) if device else args.peak_tflops
    merge_flops(result)
    save(args.out, result)
    print_tables(result)
    print(f"\nwrote {args.out}", flush=True)
    return result
