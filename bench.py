"""Benchmarks: measured, printed as a table and written as JSON. Nothing here is a test; nothing is asserted.

    python bench.py step --size B7 --batch 2 --dtype float32    # the whole training step
    python bench.py versus-torch --size B7 --batch 2            # our towers against HF's PyTorch ones
    python bench.py data                                        # the input pipeline on 500x375 JPEG shards
    python bench.py retrieval --n 1000 10000                    # blocked Recall@K, N images x 5N captions
    python bench.py towers --size L2 --batch 1                  # both towers' forward + backward alone
    python bench.py learn                                       # python train.py's run, ours and HF's, scored
    python bench.py gpu                                         # on one H100/H200, 7 min: bench_gpu.py

`step`: train.py's jitted data-parallel step (both towers, the global-batch loss, the gradient pmean, LAMB)
  on one `data` mesh over every device: compile time, the median of synchronised steps after warm-up,
  images/s and MFU. The split times, in the same rounds as the step, each part alone on the step's own
  buffers: the image tower and the text tower forward + backward (per device, no collective), the loss
  (all-gather, logits, softmax, forward + backward) on precomputed embeddings, and the LAMB update;
  "other" is the step minus those four (the gradient and BatchNorm pmeans, the non-finite guard, and
  whatever the fused step gains or loses).
`versus-torch`: the same towers built in HF `transformers` (AlignVisionModel, BertModel) with the same
  config, batch and dtype, eager and torch.compile'd, channels_last, forward + backward, in alternating
  rounds in this process. PyTorch is a benchmark-only dependency; no module of the project imports it.
`data`: data.make_loader's training pipeline (tar read, JPEG decode, resize, crop, flip, tokenize) on
  generated photo-like JPEGs (pipeline_throughput, moved here from data.py; `python data.py bench` forwards here).
`retrieval`: metrics.retrieval_recalls (both directions, blocked) with its peak memory.
`towers`: compile and step time of both towers' forward + backward, without loss or optimizer.
`learn`: `python train.py`'s run (tiny, its recipe, synthetic data; `--steps` etc. as train.py's) twice from
  the same initial weights on the same batches: train.make_step + make_optimizer, and HF's AlignModel
  (align.to_hf) under torch.optim.AdamW with the same schedule, betas, eps and weight-decay mask, dropout off,
  our BatchNorm momentum, our temperature parametrisation and 2x HF's loss (test_train_parity.py proves 20
  such steps equal). Each is timed (ours: compile apart) and scored in evaluation mode on the 1000 held-out
  pairs as evaluate.heldout_evaluation does: retrieval R@1/5/10 both ways, zero-shot accuracy per attribute.
  Left different: torch's running variance is the unbiased one (x n/(n-1), n = batch x H x W per channel);
  on several devices our BatchNorm statistics are per device (train.py's default), HF's over the batch.

FLOPs are XLA's cost analysis of the computation traced with every `lax.scan` unrolled: on the compiled
step XLA counts a scan body once (the test shows it), which would undercount our scanned blocks and
layers by their number. They are per device, counted without remat, elementwise ops included.

At ~740 lines this file is past the ~700 where a file should ask whether it holds two concerns. It holds one,
measuring: six measures that share one table printer, one timer and train.py's configs.
"""

import argparse
import dataclasses
import functools
import io
import json
import os
import platform
import statistics
import tarfile
import tempfile
import time
import tracemalloc

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image, ImageDraw

import align
import bert
import data
import efficientnet as en
import evaluate
import host
import memory
import metrics
import synthetic
import train
import wordpiece

# Dense bfloat16 peak TFLOP/s per JAX device (vendor datasheets, without sparsity). A TPU v3 device is one
# core (half a chip); v4 and v5p devices are whole (megacore) chips. Checked in order: the first substring
# of the device kind that matches wins.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0),
               ("TPU v3", 61.5), ("TPU v4", 275.0), ("TPU v5 lite", 197.0), ("TPU v5e", 197.0),
               ("TPU v5", 459.0), ("TPU v6 lite", 918.0))


def peak_tflops(device_kind, override=None):
    """The device's peak for MFU: --peak-tflops if given, else the table; None (MFU n/a) on CPUs."""
    if override:
        return override
    return next((tf for name, tf in PEAK_TFLOPS if name.lower() in device_kind.lower()), None)


def machine():
    d = jax.devices()[0]
    return {"device": d.device_kind, "devices": jax.device_count(), "platform": d.platform,
            "cpu": f"{platform.machine()}, {os.cpu_count()} cores", "load_avg_1min": round(os.getloadavg()[0], 2),
            "jax": jax.__version__, "date": time.strftime("%Y-%m-%d")}


def model_flops(fn, *args):
    """XLA's FLOP count of fn(*args) with every scan unrolled (jax.disable_jit makes scan a Python loop)."""
    avals = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args)
    with jax.disable_jit():
        closed = jax.make_jaxpr(fn)(*avals)
    lowered = jax.jit(jax.extend.core.jaxpr_as_fun(closed)).lower(*jax.tree.leaves(avals))
    return lowered.cost_analysis()["flops"]


def print_table(rows, columns, markdown=False):
    """columns: (header, key, format) triples; a missing or None value prints as n/a."""
    cell = lambda r, k, f: "n/a" if r.get(k) is None else (f.format(r[k]) if f else str(r[k]))
    table = [[h for h, _, _ in columns]] + [[cell(r, k, f) for _, k, f in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    if markdown:
        table.insert(1, ["-" * w for w in widths])
    for line in table:
        cells = [c.rjust(w) for c, w in zip(line, widths)]
        print("| " + " | ".join(cells) + " |" if markdown else "  ".join(cells), flush=True)


def configs(args):
    """(align.Config, train.Recipe) as train.py resolves --size and its overrides."""
    argv = ["--size", args.size]
    if args.dtype is None and jax.default_backend() == "cpu":
        args.dtype = "float32"  # the recipes' bfloat16 is for accelerators; CPUs emulate it slowly
    for flag in ("image_tower", "text_tower", "dtype", "image_size"):
        if getattr(args, flag) is not None:
            argv += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    cfg, recipe = train.resolve(train.parse_args(argv + ["--remat"] * args.remat))
    # tiny trains on the synthetic data's vocabulary (train.py); the paper's sizes on 100k words (Sec. 4.1).
    vocab = args.vocab_size or (len(wordpiece.Tokenizer(synthetic.synthetic_vocab()).vocab) if args.size == "tiny" else 100_000)
    return dataclasses.replace(cfg, image=dataclasses.replace(cfg.image, depthwise=args.depthwise),
                               text=dataclasses.replace(cfg.text, vocab_size=vocab)), recipe


def describe(cfg, recipe):
    return f"EfficientNet-{cfg.image.name} + BERT-{cfg.text.name}, {recipe.image_size}x{recipe.image_size}, {cfg.image.dtype}"


def fake_batch(key, batch, image_size, text_cfg):
    """Pixels in [-1, 1] and full-length captions: padding is masked, not skipped, so length 64 costs the same."""
    k1, k2 = jax.random.split(key)
    return (jax.random.uniform(k1, (batch, image_size, image_size, 3), minval=-1, maxval=1),
            jax.random.randint(k2, (batch, text_cfg.max_len), 1, text_cfg.vocab_size), jnp.ones((batch, text_cfg.max_len), jnp.int32))


def timed_rounds(fns, warmup, steps):
    """Median seconds of each fn() (which returns arrays), run in alternating rounds so load drift hits all alike."""
    times = {name: [] for name in fns}
    for i in range(warmup + steps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}, times


# ----------------------------------------------------------------------------------------------------
# step: the whole training step, and its parts


def step_parts(cfg, recipe, optimizer, mesh):
    """Each part of the step alone, jitted over the mesh, without collectives except the loss's all-gather."""
    # check_vma=False: the gradients of replicated parameters stay per device (with it, JAX would psum them).
    per_device = lambda f, in_specs: jax.jit(jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=P(), check_vma=False))

    def image(p, state, pixels, rng):
        def f(p):
            f_BE, new_state = align.image_features(p, state, pixels, cfg, train=True, rng=rng)
            return jnp.mean(f_BE ** 2), new_state
        return jax.value_and_grad(f, has_aux=True)(p)

    def text(p, ids, mask):
        return jax.value_and_grad(lambda p: jnp.mean(align.text_features(p, ids, mask, cfg) ** 2))(p)

    def loss(raw, img_BE, txt_BE):
        return align.contrastive_loss(align.l2_normalise(img_BE), align.l2_normalise(txt_BE),
                                      align.temperature({"temperature": raw}, cfg), recipe.label_smoothing, "data")

    def update(params, opt_state, grads):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    d = P("data")
    return {"image": (image, per_device(image, (P(), P(), d, P()))),
            "text": (text, per_device(text, (P(), d, d))),
            "loss": (loss, jax.jit(jax.shard_map(jax.value_and_grad(loss, argnums=(0, 1, 2)), mesh=mesh,
                                                 in_specs=(P(), d, d), out_specs=(P(), (P(), d, d))))),
            "update": (update, jax.jit(update, donate_argnums=(0, 1)))}


def without_remat(cfg):
    return dataclasses.replace(cfg, image=dataclasses.replace(cfg.image, remat=False),
                               text=dataclasses.replace(cfg.text, remat=False))


def step_flops(cfg, recipe, optimizer, params, state, opt_state, pixels, ids, mask, rng):
    """Per-device model FLOPs of a step on one device's batch: loss, gradient and update, without remat.
    Arrays or jax.ShapeDtypeStruct alike (nothing is computed)."""
    plain = without_remat(cfg)

    def flops_step(params, state, opt_state, pixels, ids, mask, rng):
        grads, (_, new_state) = jax.grad(align.train_loss, has_aux=True)(
            params, state, pixels, ids, mask, plain, rng, label_smoothing=recipe.label_smoothing)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_state, opt_state

    return model_flops(flops_step, params, state, opt_state, pixels, ids, mask, rng)


def one_step(args, cfg, recipe, model, batch):
    """One row of `step`: a per-device batch. The step donates the model's buffers: `live` holds the latest."""
    mesh, optimizer, live = model["mesh"], model["optimizer"], model["live"]
    n_dev, shard = mesh.size, NamedSharding(mesh, P("data"))
    params, state, opt_state = live["params"], live["state"], live["opt"]
    pixels, ids, mask = jax.device_put(fake_batch(jax.random.key(1), batch * n_dev, recipe.image_size, cfg.text), shard)
    t0 = time.perf_counter()
    lowered = train.make_step(cfg, recipe, optimizer, mesh, bn_across=False).lower(
        params, state, opt_state, pixels, ids, mask, jax.random.key(2))
    trace_s = time.perf_counter() - t0
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0 - trace_s
    print(f"  traced in {trace_s:.1f} s, compiled in {compile_s:.1f} s", flush=True)

    plain = without_remat(cfg)
    take = lambda prefix: {k: v for k, v in live["params"].items() if k.startswith(prefix)}
    local, rng = (pixels[:batch], ids[:batch], mask[:batch]), jax.random.key(0)
    t0 = time.perf_counter()
    unrolled = step_parts(plain, recipe, optimizer, mesh)
    flops = {"step": step_flops(cfg, recipe, optimizer, params, state, opt_state, *local, rng),
             "image": model_flops(unrolled["image"][0], take("image"), state, local[0], rng),
             "text": model_flops(unrolled["text"][0], take("text"), *local[1:])}
    print(f"  counted FLOPs in {time.perf_counter() - t0:.1f} s", flush=True)

    def run_step():
        live["i"] += 1
        live["params"], live["state"], live["opt"], logged = compiled(
            live["params"], live["state"], live["opt"], pixels, ids, mask, jax.random.key(live["i"]))
        return live["params"], logged

    def run_update():
        live["params"], live["opt"] = parts["update"][1](live["params"], live["opt"], grads)
        return live["params"]

    parts = step_parts(cfg, recipe, optimizer, mesh)
    grads = jax.device_put(jax.tree.map(lambda x: jnp.full_like(x, 1e-3), params), NamedSharding(mesh, P()))
    img_emb, txt_emb = (jax.device_put(jax.random.normal(k, (batch * n_dev, cfg.embed_dim)), shard)
                        for k in jax.random.split(jax.random.key(3)))
    fns = {"step": run_step,
           "image": lambda: parts["image"][1](take("image"), live["state"], pixels, rng),
           "text": lambda: parts["text"][1](take("text"), ids, mask),
           "loss": lambda: parts["loss"][1](live["params"]["temperature"], img_emb, txt_emb),
           "update": run_update}
    med, times = timed_rounds({"step": run_step} if args.no_split else fns, args.warmup, args.steps)
    s, peak = med["step"], peak_tflops(jax.devices()[0].device_kind, args.peak_tflops)
    mem = compiled.memory_analysis()
    row = {"batch": batch, "global_batch": batch * n_dev, "trace_s": trace_s, "compile_s": compile_s,
           "step_ms": 1e3 * s, "images_per_s": batch * n_dev / s, "gflops_per_device": flops["step"] / 1e9,
           "tflops_per_s": flops["step"] / s / 1e12, "peak_tflops": peak,
           "mfu": flops["step"] / s / (peak * 1e12) if peak else None,
           "xla_memory_gib": memory.step_memory(mem)["total"] / 2**30 if mem else None,
           "step_ms_all": [1e3 * t for t in times["step"]]}
    device_stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in device_stats:
        row["device_peak_gib"] = device_stats["peak_bytes_in_use"] / 2**30
    if not args.no_split:
        med["other"] = s - sum(med[k] for k in ("image", "text", "loss", "update"))
        row.update({f"{k}_ms": 1e3 * med[k] for k in ("image", "text", "loss", "update", "other")})
        row.update({f"{k}_pct": 100 * med[k] / s for k in ("image", "text", "loss", "update", "other")})
        row.update({f"{k}_tflops_per_s": flops[k] / med[k] / 1e12 for k in ("image", "text")})
    return row


def step(args):
    cfg, recipe = configs(args)
    print(f"step: {describe(cfg, recipe)}, remat {args.remat}, depthwise {args.depthwise}, "
          f"vocab {cfg.text.vocab_size}, {jax.device_count()} x {jax.devices()[0].device_kind}", flush=True)
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    rep = NamedSharding(mesh, P())
    t0 = time.perf_counter()
    params, state = jax.device_put(jax.jit(align.init, static_argnums=1)(jax.random.key(0), cfg), rep)
    optimizer, _ = train.make_optimizer(recipe, params)
    model = {"mesh": mesh, "optimizer": optimizer,
             "live": {"params": params, "state": state, "opt": jax.device_put(optimizer.init(params), rep), "i": 0}}
    jax.block_until_ready(model["live"]["opt"])
    init_s = time.perf_counter() - t0
    print(f"  initialised in {init_s:.1f} s", flush=True)
    rows = []
    for b in args.batch:
        print(f"per-device batch {b}:", flush=True)
        try:
            rows.append(one_step(args, cfg, recipe, model, b))
        except Exception as e:  # the largest batch that fits is found by trying
            if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
                raise
            rows.append({"batch": b, "error": "out of memory"})
            print(f"  out of memory at per-device batch {b}", flush=True)
            break
    print_table(rows, [("batch/dev", "batch", None), ("compile s", "compile_s", "{:.1f}"), ("step ms", "step_ms", "{:.0f}"),
                       ("images/s", "images_per_s", "{:.1f}"), ("GFLOP/dev", "gflops_per_device", "{:.1f}"),
                       ("TFLOP/s", "tflops_per_s", "{:.3f}"), ("MFU", "mfu", "{:.1%}"),
                       ("image %", "image_pct", "{:.0f}"), ("text %", "text_pct", "{:.0f}"),
                       ("loss %", "loss_pct", "{:.2f}"), ("update %", "update_pct", "{:.0f}"),
                       ("other %", "other_pct", "{:.0f}"), ("XLA mem GiB", "xla_memory_gib", "{:.1f}")])
    return {"measure": "step", "model": describe(cfg, recipe), "size": args.size, "image_tower": cfg.image.name,
            "text_tower": cfg.text.name, "image_size": recipe.image_size, "dtype": cfg.image.dtype, "remat": args.remat,
            "depthwise": args.depthwise, "vocab_size": cfg.text.vocab_size, "init_s": init_s, **machine(), "rows": rows}


# ----------------------------------------------------------------------------------------------------
# towers and versus-torch: both towers' forward + backward, no loss, no optimizer


def jax_towers(cfg, which="both"):
    """Jitted forward + backward of the towers in training mode, on a stand-in loss of their outputs.

    Gradients only for the towers that run (`which`), as PyTorch's: the other's would be zeros to fill.
    """
    towers = [t for t in ("image", "text") if which in (t, "both")]

    def loss(p_run, p, bn_state, pixels, ids, mask, rng):
        p = {**p, **p_run}
        total = 0.0
        if "image" in towers:
            f_BD, bn_state = en.apply(p["image"], bn_state, pixels, cfg.image, train=True, rng=rng)
            total += jnp.mean(f_BD ** 2)
        if "text" in towers:
            total += jnp.mean(bert.apply(p["text"], ids, mask, cfg.text)[:, 0].astype(jnp.float32) ** 2)
        return total, bn_state
    step = jax.value_and_grad(loss, has_aux=True)
    return jax.jit(lambda p, *rest: step({t: p[t] for t in towers}, p, *rest))


def towers(args):
    cfg, recipe = configs(args)
    B, S = args.batch, recipe.image_size
    t0 = time.perf_counter()
    p, bn_state = jax.jit(align.init, static_argnums=1)(jax.random.key(0), cfg)
    jax.block_until_ready(p)
    init_s = time.perf_counter() - t0
    print(f"towers: {describe(cfg, recipe)}, batch {B}: initialised in {init_s:.1f} s", flush=True)
    batch = fake_batch(jax.random.key(2), B, S, cfg.text)
    t0 = time.perf_counter()
    lowered = jax_towers(cfg).lower(p, bn_state, *batch, jax.random.key(4))
    trace_s = time.perf_counter() - t0
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0 - trace_s
    print(f"  traced in {trace_s:.1f} s, compiled in {compile_s:.1f} s", flush=True)
    rng = iter(jax.random.split(jax.random.key(5), args.warmup + args.steps))
    med, times = timed_rounds({"towers": lambda: compiled(p, bn_state, *batch, next(rng))}, args.warmup, args.steps)
    row = {"batch": B, "params": sum(x.size for x in jax.tree.leaves(p)), "init_s": init_s, "trace_s": trace_s,
           "compile_s": compile_s, "fwd_bwd_s": med["towers"], "fwd_bwd_s_all": times["towers"]}
    print_table([row], [("batch", "batch", None), ("compile s", "compile_s", "{:.1f}"), ("fwd+bwd s", "fwd_bwd_s", "{:.2f}")])
    return {"measure": "towers", "model": describe(cfg, recipe), "remat": args.remat, "depthwise": args.depthwise,
            **machine(), "rows": [row]}


def hf_configs(cfg, image_size):
    """Keyword arguments of HF's AlignVisionConfig and BertConfig (or AlignTextConfig) for our towers' shapes."""
    i, t = cfg.image, cfg.text
    vision = dict(width_coefficient=i.width, depth_coefficient=i.depth, depth_divisor=i.divisor, image_size=image_size,
                  kernel_sizes=[s.kernel for s in i.stages], strides=[s.stride for s in i.stages],
                  expand_ratios=[s.expand for s in i.stages], in_channels=[s.in_channels for s in i.stages],
                  out_channels=[s.out_channels for s in i.stages], num_block_repeats=[s.repeats for s in i.stages],
                  squeeze_expansion_ratio=i.se_ratio, batch_norm_eps=i.bn_eps, drop_connect_rate=i.drop_connect,
                  hidden_act="swish", pooling_type="mean")
    text = dict(vocab_size=t.vocab_size, hidden_size=t.width, num_hidden_layers=t.layers, num_attention_heads=t.heads,
                intermediate_size=t.ff_width, hidden_act="gelu", max_position_embeddings=t.max_len,
                type_vocab_size=t.type_vocab_size, layer_norm_eps=t.ln_eps, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0)  # ours has no dropout
    return vision, text


def hf_towers(cfg, image_size, transformers):
    """HF's AlignVisionModel (EfficientNet without the head conv, mean-pooled: ours) and BertModel, same shapes."""
    vision, text = hf_configs(cfg, image_size)
    return (transformers.AlignVisionModel(transformers.AlignVisionConfig(**vision)),
            transformers.BertModel(transformers.BertConfig(**text), add_pooling_layer=False))  # ours has no pooler


def versus_torch(args):
    try:
        import torch
        import transformers
    except ImportError as e:
        print(f"versus-torch skipped: {e} (pip install torch==2.13.0 transformers)")
        return None
    cfg, recipe = configs(args)
    B, S = args.batch, recipe.image_size
    bf16 = cfg.image.dtype == "bfloat16"
    dev = "cuda" if torch.cuda.is_available() and jax.default_backend() == "gpu" else "cpu"
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    print(f"versus-torch: {describe(cfg, recipe)}, {args.tower} tower(s), batch {B}, torch {torch.__version__} on {dev} "
          f"({torch.get_num_threads()} threads), jax on {jax.devices()[0].device_kind}", flush=True)

    p, bn_state = jax.jit(align.init, static_argnums=1)(jax.random.key(0), cfg)
    batch = fake_batch(jax.random.key(1), B, S, cfg.text)
    ours = jax_towers(cfg, args.tower)
    t0 = time.perf_counter()
    jax.block_until_ready(ours(p, bn_state, *batch, jax.random.key(2)))
    compile_s = {"jax": time.perf_counter() - t0}

    vision, text = hf_towers(cfg, S, transformers)
    vision = vision.to(dev, memory_format=torch.channels_last).train()  # channels_last: NHWC, as ours
    text = text.to(dev).train()
    x = torch.from_numpy(np.array(batch[0])).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last).to(dev)
    ids, mask = (torch.from_numpy(np.array(a)).long().to(dev) for a in batch[1:])

    def torch_step(v, t):
        def run():
            for m in (vision, text):
                m.zero_grad(set_to_none=True)
            loss = 0.0
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
                if args.tower != "text":
                    loss = loss + v(pixel_values=x).pooler_output.float().pow(2).mean()
                if args.tower != "image":
                    loss = loss + t(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0].float().pow(2).mean()
            loss.backward()
            sync()
            return loss
        return run

    fns = {"jax": lambda: ours(p, bn_state, *batch, jax.random.key(3)), "torch eager": torch_step(vision, text)}
    failed = {}
    if not args.no_compile:
        compiled = torch_step(torch.compile(vision), torch.compile(text))
        t0 = time.perf_counter()
        try:
            compiled()
            compile_s["torch.compile"] = time.perf_counter() - t0
            fns["torch.compile"] = compiled
        except Exception as e:  # e.g. no C++ compiler for inductor's CPU kernels
            failed["torch.compile"] = f"failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:160]}"
            print(f"  torch.compile {failed['torch.compile']}", flush=True)
    med, times = timed_rounds(fns, args.warmup, args.steps)
    rows = [{"impl": name, "first_call_s": compile_s.get(name), "fwd_bwd_ms": 1e3 * med[name],
             "images_per_s": B / med[name], "torch_over_jax": med[name] / med["jax"],
             "all_ms": [1e3 * t for t in times[name]]} for name in fns]
    rows += [{"impl": name, "note": why} for name, why in failed.items()]
    print_table(rows, [("", "impl", None), ("first call s", "first_call_s", "{:.1f}"), ("fwd+bwd ms", "fwd_bwd_ms", "{:.0f}"),
                       ("images/s", "images_per_s", "{:.1f}"), ("time / jax's", "torch_over_jax", "{:.2f}")]
                + [("", "note", None)] * bool(failed))
    return {"measure": "versus-torch", "model": describe(cfg, recipe), "tower": args.tower, "batch": B, "depthwise": args.depthwise,
            "torch": torch.__version__, "transformers": transformers.__version__, "torch_threads": torch.get_num_threads(),
            "torch_device": dev, **machine(), "rows": rows}


# ----------------------------------------------------------------------------------------------------
# data and retrieval


def _photo_like_jpeg(rng: np.random.Generator, size=(500, 375)) -> bytes:
    """A JPEG with a photo's statistics (smooth regions, edges, sensor noise), like a web image."""
    img = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(8):
        x, y = rng.integers(0, size[0]), rng.integers(0, size[1])
        draw.ellipse((x, y, x + rng.integers(20, 120), y + rng.integers(20, 120)), fill=tuple(rng.integers(0, 256, 3)))
    pixels = np.asarray(img, np.int16) + rng.integers(-12, 13, (size[1], size[0], 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of processes, from /proc (Linux): per-core rates that other load cannot skew."""
    total = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def pipeline_throughput(workers=(0, 1, 2), batches=32, image_size=data.CROP, batch=64, shards=1, distinct=64):
    """Images/s of the training pipeline (tar read, decode, resize, random crop, flip, tokenize).

    Writes temporary webdataset shards of `distinct` photo-like 500x375 JPEGs (repeated to fill
    `batches` + 4 batches over `shards` shards), then for each worker count times `batches` batches after
    the first. Returns ({"jpeg_kb", "cores", "load"}, one row per worker count with images/s in wall-clock
    time and per CPU-second of every process involved). `python bench.py data`.
    """
    rng = np.random.default_rng(0)
    jpegs = [_photo_like_jpeg(rng) for _ in range(distinct)]
    tokenizer = wordpiece.Tokenizer(synthetic.synthetic_vocab())
    per_shard = -(-max(distinct, (batches + 4) * batch) // shards)
    info = {"jpeg_kb": float(np.mean([len(j) for j in jpegs])) / 1e3, "cores": os.cpu_count(),
            "load": os.getloadavg()[0]}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for s in range(shards):
            with tarfile.open(os.path.join(tmp, f"{s:05d}.tar"), "w") as tar:
                for i in range(per_shard):
                    data._add_member(tar, f"{s:05d}{i:06d}.jpg", jpegs[(s * per_shard + i) % distinct])
                    data._add_member(tar, f"{s:05d}{i:06d}.txt", b"a photo of a large red circle on the left")
        pattern = os.path.join(tmp, f"{{00000..{shards - 1:05d}}}.tar")
        for w in workers:
            with data.make_loader(pattern, tokenizer=tokenizer, global_batch=batch, image_size=image_size, workers=w) as loader:
                next(loader)  # starts the workers
                pids = [os.getpid()] + list(loader._pool._processes if loader._pool else [])
                start, cpu = time.perf_counter(), _cpu_seconds(pids)
                for _ in range(batches):
                    next(loader)
                wall, cpu = time.perf_counter() - start, _cpu_seconds(pids) - cpu
            n = batches * batch
            rows.append({"workers": w, "images": n, "images_per_s_total": n / wall, "images_per_s_per_core": n / cpu,
                         "cores_busy": cpu / wall})
    return info, rows


def data_pipeline(args):
    info, rows = pipeline_throughput(args.workers, args.batches, args.image_size, args.batch, args.shards,
                                     distinct=args.images)
    print(f"data: {args.shards} shards of 500x375 JPEGs ({args.images} distinct, {info['jpeg_kb']:.0f} KB) "
          f"-> {args.image_size}x{args.image_size}, batch {args.batch}, {info['cores']} cores, load {info['load']:.1f}")
    print_table(rows, [("workers", "workers", None), ("images/s total", "images_per_s_total", "{:.0f}"),
                       ("images/s per core", "images_per_s_per_core", "{:.0f}"), ("cores busy", "cores_busy", "{:.1f}")])
    return {"measure": "data", "jpeg_kb": info["jpeg_kb"], "image_size": args.image_size,
            "batch": args.batch, **machine(), "rows": rows}


def retrieval(args):
    rows = []
    for n in args.n:
        rng = np.random.default_rng(0)
        img = rng.standard_normal((n, args.dim), dtype=np.float32)
        txt = np.repeat(img, 5, axis=0) + 2 * rng.standard_normal((5 * n, args.dim), dtype=np.float32)
        img /= np.linalg.norm(img, axis=1, keepdims=True)
        txt /= np.linalg.norm(txt, axis=1, keepdims=True)
        tracemalloc.start()  # numpy reports its buffers to tracemalloc: this is the peak above the inputs
        t0 = time.perf_counter()
        r = metrics.retrieval_recalls(img, txt, np.repeat(np.arange(n), 5), block=args.block)
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        # Two directions, each two passes over all N x 5N similarities (metrics.positive_rank_stats).
        rows.append({"images": n, "captions": 5 * n, "seconds": seconds, "mpairs_per_s": 5 * n * n / seconds / 1e6,
                     "gflops_per_s": 4 * 2 * args.dim * 5 * n * n / seconds / 1e9, "peak_mib": peak / 2**20,
                     "inputs_mib": (img.nbytes + txt.nbytes) / 2**20, "dense_matrix_mib": 5 * n * n * 4 / 2**20,
                     "i2t_R@1": r["i2t"]["R@1"], "t2i_R@1": r["t2i"]["R@1"]})
        print(f"  N={n}: {seconds:.1f} s", flush=True)
    print_table(rows, [("images", "images", None), ("captions", "captions", None), ("seconds", "seconds", "{:.2f}"),
                       ("M pairs/s", "mpairs_per_s", "{:.1f}"), ("GFLOP/s", "gflops_per_s", "{:.0f}"),
                       ("peak MiB", "peak_mib", "{:.0f}"), ("inputs MiB", "inputs_mib", "{:.0f}"),
                       ("N x 5N float32 MiB", "dense_matrix_mib", "{:.0f}")])
    return {"measure": "retrieval", "dim": args.dim, "block": args.block, **machine(), "rows": rows}


# ----------------------------------------------------------------------------------------------------
# learn: python train.py's run, ours against HF's AlignModel trained by torch.optim.AdamW


def heldout_scores(embed_images, embed_texts, eval_batches, tokenizer, max_len):
    """evaluate.heldout_evaluation's numbers for any model: held-out retrieval R@1/5/10 both ways and zero-shot
    accuracy per attribute (evaluate.attribute_accuracy). embed_*: numpy in, L2-normalised numpy [B, E] out."""
    img_NE = np.concatenate([embed_images(b["pixels"])[b["valid"]] for b in eval_batches])
    txt_NE = np.concatenate([embed_texts(b["ids"], b["mask"])[b["valid"]] for b in eval_batches])
    r = metrics.retrieval_recalls(img_NE, txt_NE, np.arange(len(img_NE)))
    row = {f"{d}_R@{k}": r[d][f"R@{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)}
    attributes = evaluate.attribute_accuracy(embed_texts, tokenizer, max_len, img_NE)
    return {**row, **{a: t["accuracy"] for a, t in attributes.items()}}


def hf_align(params, state, cfg, image_size, path, torch, transformers):
    """HF's AlignModel from our weights (align.to_hf), set to train as train.py does (test_train_parity.py)."""
    align.to_hf(params, state, cfg, path, image_size=image_size)
    config = transformers.AlignConfig.from_pretrained(path)
    config.text_config.hidden_dropout_prob = config.text_config.attention_probs_dropout_prob = 0.0  # ours has none
    model = transformers.AlignModel.from_pretrained(path, config=config).train()
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    for m in model.modules():  # HF passes TF's momentum (weight of the old average) as torch's (of the new batch)
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 1 - cfg.image.bn_momentum

    class LearnedTemperature(torch.nn.Module):  # align.learned_temperature and its inverse
        def forward(self, raw):
            return align.MIN_TEMPERATURE + torch.exp(raw)

        def right_inverse(self, temperature):
            return torch.log(temperature - align.MIN_TEMPERATURE)

    if not cfg.learn_temperature:
        model.temperature.requires_grad_(False)
        return model
    # HF learns T itself, we learn raw with T = 1/1024 + exp(raw): an Adam step of about lr (3e-3) moves T =
    # 0.07 by 4% in HF's form, by 0.3% in ours. The same parametrisation gives both optimisers one problem.
    torch.nn.utils.parametrize.register_parametrization(model, "temperature", LearnedTemperature())
    with torch.no_grad():
        model.parametrizations.temperature.original.fill_(float(params["temperature"]))
    return model


def learn(args):
    try:
        import torch
        import transformers
    except ImportError as e:
        print(f"learn skipped: {e} (pip install torch==2.13.0 transformers)")
        return None
    flags = ("steps", "seed", "batch_size", "lr", "warmup_steps", "image_size")
    targs = train.parse_args([f"--{k.replace('_', '-')}={getattr(args, k)}" for k in flags if getattr(args, k) is not None])
    cfg, recipe = train.resolve(targs)
    if recipe.optimizer != "adamw":
        raise SystemExit(f"learn: the PyTorch side runs torch.optim.AdamW, not {recipe.optimizer}")
    tokenizer = wordpiece.Tokenizer(synthetic.synthetic_vocab())
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, vocab_size=len(tokenizer.vocab)))  # as train.train
    torch.set_num_threads(args.torch_threads)
    print(f"learn: {describe(cfg, recipe)}, batch {recipe.batch_size}, {recipe.steps} steps, AdamW lr {recipe.lr}, "
          f"seed {targs.seed}; jax on {jax.device_count()} x {jax.devices()[0].device_kind}, "
          f"torch {torch.__version__} ({args.torch_threads} threads)", flush=True)
    S, L, t0 = recipe.image_size, cfg.text.max_len, time.perf_counter()
    loader = data.make_loader("synthetic", tokenizer=tokenizer, global_batch=recipe.batch_size, image_size=S, train=True,
                              seed=targs.seed, max_len=L, workers=args.workers, uint8=True)  # as train.py's
    batches = [next(loader) for _ in range(recipe.steps)]  # made once, outside both timings, fed to both
    loader.close()
    eval_batches = list(data.make_loader("synthetic", tokenizer=tokenizer, global_batch=64, image_size=S, train=False, max_len=L))
    score = functools.partial(heldout_scores, eval_batches=eval_batches, tokenizer=tokenizer, max_len=L)
    print(f"  batches made in {time.perf_counter() - t0:.0f} s", flush=True)

    # Ours: train.py's step and optimizer on one `data` mesh over every device.
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    rep, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    params, state = jax.jit(align.init, static_argnums=1, out_shardings=rep)(jax.random.key(targs.seed), cfg)
    params0, state0 = jax.device_get((params, state))  # the step donates the device buffers
    optimizer, lr_schedule = train.make_optimizer(recipe, params)
    opt_state = jax.jit(optimizer.init, out_shardings=rep)(params)
    t0 = time.perf_counter()
    step = train.make_step(cfg, recipe, optimizer, mesh, bn_across=False).lower(
        *train.step_shapes(mesh, params, state, opt_state, recipe.batch_size, S, L)).compile()
    ours, logged, rng = {"run": "ours (JAX)", "compile_s": time.perf_counter() - t0}, [], jax.random.key(targs.seed + 1)
    t0 = time.perf_counter()
    for k, b in enumerate(batches):
        params, state, opt_state, m = step(params, state, opt_state, *(jax.device_put(b[x], split) for x in
                                                                       ("pixels", "ids", "mask")), jax.random.fold_in(rng, k))
        logged.append(m)
    jax.block_until_ready(params)
    ours["train_s"], logged, t0 = time.perf_counter() - t0, jax.device_get(logged), time.perf_counter()
    curves = {"ours": ([float(m["loss"]) for m in logged], [float(m["temperature"]) for m in logged])}
    embed_i, embed_t = jax.jit(align.embed_images, static_argnames="cfg"), jax.jit(align.embed_texts, static_argnames="cfg")
    ours.update(score(lambda x: np.asarray(embed_i(params, state, x, cfg=cfg)),
                      lambda ids, mask: np.asarray(embed_t(params, ids, mask, cfg=cfg))), eval_s=time.perf_counter() - t0)

    # HF's: torch.optim.AdamW with make_optimizer's schedule, betas, eps and weight-decay mask (none on biases,
    # BatchNorm, LayerNorm and the temperature).
    with tempfile.TemporaryDirectory() as tmp:
        model = hf_align(params0, state0, cfg, S, tmp, torch, transformers)
    groups = {True: [], False: []}
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad and not module_name.startswith("text_model.pooler"):  # unused by AlignModel
                norm = isinstance(module, (torch.nn.BatchNorm2d, torch.nn.LayerNorm))
                groups[not (norm or name == "bias" or p.ndim == 0)].append(p)
    opt = torch.optim.AdamW([{"params": groups[True], "weight_decay": recipe.weight_decay},
                             {"params": groups[False], "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.999), eps=1e-6)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: float(lr_schedule(k)) / recipe.lr)
    theirs, losses, temps, t0 = {"run": "PyTorch (HF AlignModel)"}, [], [], time.perf_counter()
    for b in batches:
        out = model(input_ids=torch.from_numpy(b["ids"]).long(), attention_mask=torch.from_numpy(b["mask"]),
                    pixel_values=torch.from_numpy(data.model_pixels(b["pixels"]).transpose(0, 3, 1, 2)),  # NHWC -> NCHW
                    return_loss=True)
        loss = 2 * out.loss  # ours is L_i2t + L_t2i, HF's align_loss their mean: Adam's eps makes the scale matter
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
        losses.append(loss.item())
        temps.append(model.temperature.item())
    theirs["train_s"], curves["torch"], t0 = time.perf_counter() - t0, (losses, temps), time.perf_counter()
    unit = lambda out: (out.pooler_output / out.pooler_output.norm(dim=-1, keepdim=True)).numpy()
    with torch.no_grad():
        model.eval()  # BatchNorm's running statistics
        theirs.update(score(lambda x: unit(model.get_image_features(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2)))),
                            lambda ids, mask: unit(model.get_text_features(input_ids=torch.from_numpy(ids).long(),
                                                                            attention_mask=torch.from_numpy(mask)))),
                      eval_s=time.perf_counter() - t0)

    w = min(recipe.log_every, recipe.steps)  # loss and temperature, means over the w steps up to each row's
    curve = [{"step": k + w, **{f"{n}_{q}": float(np.mean(curves[n][i][k:k + w]))
                                for n in curves for i, q in enumerate(("loss", "T"))}} for k in range(0, recipe.steps - w + 1, w)]
    rows = [dict(r, steps=recipe.steps, ms_per_step=1e3 * r["train_s"] / recipe.steps, loss=curve[-1][f"{n}_loss"],
                 T=curves[n][1][-1]) for r, n in ((ours, "ours"), (theirs, "torch"))]
    print_table(rows, [("", "run", None), ("steps", "steps", None), ("compile s", "compile_s", "{:.0f}"),
                       ("train s", "train_s", "{:.0f}"), ("ms/step", "ms_per_step", "{:.0f}"), ("eval s", "eval_s", "{:.0f}"),
                       ("loss", "loss", "{:.2f}"), ("T", "T", "{:.4f}")]
                + [(f"{d} R@{k}", f"{d}_R@{k}", "{:.1f}") for d in ("i2t", "t2i") for k in (1, 5, 10)]
                + [(a, a, "{:.1f}") for a in synthetic.SYN_ATTRIBUTES], markdown=True)
    print()
    print_table(curve, [("step", "step", None), ("loss, ours", "ours_loss", "{:.3f}"), ("loss, PyTorch", "torch_loss", "{:.3f}"),
                        ("T, ours", "ours_T", "{:.4f}"), ("T, PyTorch", "torch_T", "{:.4f}")], markdown=True)
    return {"measure": "learn", "model": describe(cfg, recipe), "recipe": dataclasses.asdict(recipe), "seed": targs.seed,
            "torch": torch.__version__, "transformers": transformers.__version__, "torch_threads": args.torch_threads,
            **machine(), "rows": rows, "curve": curve, "losses": {n: c[0] for n, c in curves.items()},
            "temperatures": {n: c[1] for n, c in curves.items()}}


# ----------------------------------------------------------------------------------------------------
# gpu: one prepared run for a lent H100/H200 (bench_gpu.py)


def gpu(args):
    import bench_gpu  # imported here: it imports this module for its timer, table and FLOP count
    return bench_gpu.main(args)


# ----------------------------------------------------------------------------------------------------
# Command line


def parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="measure", required=True)

    def command(name, fn, help):
        p = sub.add_parser(name, help=help)
        p.set_defaults(fn=fn)
        p.add_argument("--json", help="also write the result to this file")
        return p

    def model_flags(p, batch, several, size="tiny"):
        p.add_argument("--size", default=size, choices=list(align.SIZES))
        p.add_argument("--image-tower", choices=list(en.CONFIGS), help="override the size's")
        p.add_argument("--text-tower", choices=list(bert.CONFIGS), help="override the size's")
        p.add_argument("--batch", type=int, nargs="+" if several else None, default=[batch] if several else batch,
                       help="per device" + "; several: one row each, up to the first that runs out of memory" * several)
        p.add_argument("--image-size", type=int, help="default: the size's recipe (289; tiny 32)")
        p.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: the size's recipe (float32 on CPU)")
        p.add_argument("--remat", action="store_true")
        p.add_argument("--depthwise", default="auto", choices=["auto", "conv", "shift"],
                       help="efficientnet.Config.depthwise: auto is shift on CPU, conv elsewhere")
        p.add_argument("--vocab-size", type=int, help="default: 100000 (Sec. 4.1); tiny: the synthetic vocabulary")
        p.add_argument("--warmup", type=int, default=2)
        p.add_argument("--steps", type=int, default=10, help="timed rounds; the median is reported")

    p = command("step", step, "the whole training step: compile, step time, images/s, MFU, split")
    model_flags(p, 16, True)
    p.add_argument("--peak-tflops", type=float, help="the device's peak for MFU (default: detected; none on CPU)")
    p.add_argument("--no-split", action="store_true", help="time the whole step only")

    p = command("versus-torch", versus_torch, "our towers against HF transformers' in PyTorch, forward + backward")
    model_flags(p, 2, False)
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--tower", default="both", choices=["both", "image", "text"])

    p = command("data", data_pipeline, "input pipeline images/s on 500x375 JPEG shards")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--images", type=int, default=512, help="distinct JPEGs, repeated to fill the shards")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=24, help="timed batches per setting (the stream cycles)")
    p.add_argument("--image-size", type=int, default=289)
    p.add_argument("--workers", type=int, nargs="+", default=[0, os.cpu_count() or 1])

    p = command("retrieval", retrieval, "blocked Recall@K over N images x 5N captions, with peak memory")
    p.add_argument("--n", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--dim", type=int, default=640, help="embedding width (B7's 640)")
    p.add_argument("--block", type=int, default=4096)

    p = command("towers", towers, "compile and step time of both towers' forward + backward, nothing else")
    model_flags(p, 1, False, size="L2")

    p = command("gpu", gpu, "one prepared run for a lent H100/H200 under a time budget (bench_gpu.py)")
    p.add_argument("--out", default="bench_gpu.json", help="the JSON, rewritten after every section")
    p.add_argument("--budget-s", type=float, default=420, help="every section, compile and kill included")
    p.add_argument("--tiny", action="store_true", help="every section at a tiny size (automatic on CPU)")
    p.add_argument("--sizes", nargs="+", default=["B7", "L2"], choices=list(align.SIZES), help="the step's and torch's")
    p.add_argument("--embed-size", default="B7", choices=list(align.SIZES), help="bfloat16 vs float32 embeddings")
    for flag, why in (("max-batch", "the search's cap (default 512; tiny 2)"), ("start-batch", "without a memory "
                      "limit the search doubles from here (default 8; tiny 2)"), ("dw-batch", "depthwise (default 32)"),
                      ("torch-batch", "when the step section found none (default 16)")):
        p.add_argument("--" + flag, type=int, help=why)
    p.add_argument("--memory-limit-gib", type=float, help="default: the device's (JAX's bytes_limit)")
    p.add_argument("--peak-tflops", type=float, help="the device's peak for MFU (default: detected)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="timed rounds; the median is reported")
    p.add_argument("--torch-compile-min-s", type=float, default=150, help="torch.compile only with this much left")
    p.add_argument("--cache-dir", default="/tmp/bench_gpu_jax_cache", help="JAX's compilation cache (not with --tiny)")
    for hidden in ("--section", "--partial", "--results"):  # the parent's orders to a section's process
        p.add_argument(hidden, help=argparse.SUPPRESS)
    p.add_argument("--section-budget-s", type=float, help=argparse.SUPPRESS)

    p = command("learn", learn, "python train.py's run, ours and HF's AlignModel in PyTorch from the same start: held-out scores")
    for flag, kind in (("steps", int), ("seed", int), ("batch-size", int), ("lr", float), ("warmup-steps", int),
                       ("image-size", int)):
        p.add_argument("--" + flag, type=kind, help="as train.py's (default: the tiny recipe's)")
    p.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1,
                   help="default: every core; 1 on a loaded machine, where torch's spinning threads cost 4-13x")
    p.add_argument("--workers", type=int, default=max(0, (os.cpu_count() or 1) - 1), help="data decoding processes")
    return ap


def main(argv=None):
    host.keep_freed_memory()  # before JAX starts its CPU client (host.py); PyTorch's in versus-torch gains too
    args = parser().parse_args(argv)
    result = args.fn(args)
    if result and args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
