"""`python train.py --memory-report`: one device's memory for a training step, as XLA plans it, compiled
and never run (README, "Memory per device"); and the byte counts bench.py and bench_gpu.py read from a
compiled step.

    python train.py --size L2 --remat --memory-report          # one row of the README's table
    python train.py --size L2 --remat --shard-optimizer --micro-batch 8 --memory-report

The program is train.py's own (`train.step_for`), for the same flags; only its shapes are made
(jax.eval_shape), so an L2 step is planned on a laptop.
"""
import dataclasses
import math
import sys
import time

import jax

import align
import train
import wordpiece


def _nbytes(tree, shardings=None):
    """Bytes of one device's copy of `tree`: all of it, or its slices under `shardings`."""
    if shardings is None:
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
    return sum(jax.tree.leaves(jax.tree.map(lambda x, s: math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize,
                                            tree, shardings)))


def _human(n):
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def step_memory(m):
    """Bytes of a compiled step from XLA's `memory_analysis()`: arguments, outputs, temporaries, total.

    Donated parameters and state are updated in place: those outputs share the arguments' buffers.
    """
    outputs = m.output_size_in_bytes - m.alias_size_in_bytes
    return {"arguments": m.argument_size_in_bytes, "outputs": outputs, "temporaries": m.temp_size_in_bytes,
            "total": m.argument_size_in_bytes + outputs + m.temp_size_in_bytes}


MEMORY_COLUMNS = ["size", "towers", "image", "pairs/device", "dtype", "optimizer", "remat", "parameters",
                  "optimizer state", "BN state", "arguments", "outputs", "temporaries", "total", "compile",
                  "devices", "micro-batch", "optimizer split"]


def memory_report(args):
    """One row of the README's memory table: one device's share of a training step, compiled, never run.

    Sec. 5 trains on 1024 TPUv3 cores (16 GiB each) with 16 pairs per core: that is the default here
    (`--batch-size` is the global batch, 16 x this process's devices unless given). No parameter is
    allocated: their shapes come from jax.eval_shape, and the memory from XLA's analysis of the
    compiled step (arguments: parameters, optimizer and BatchNorm state, the batch; outputs alias the
    donated arguments; temporaries: activations kept for the backward pass and workspace).
    """
    cfg, recipe = train.resolve(args)
    mesh = train.data_mesh(args)
    n_dev = mesh.size
    batch = args.batch_size or 16 * n_dev
    train.check_batch(args, batch, n_dev)
    # The word-embedding table is sized by the vocabulary: --vocab's, else the paper's 100k (Sec. 4.1).
    # Everything else is the program `train` would compile here (on CPU, depthwise convolutions as
    # shifted multiply-adds: efficientnet.Config.depthwise), but with the blocks' and layers' loops as
    # scans, as accelerators run them (CPU unrolls them for speed: efficientnet.Config.block_loop,
    # bert.Config.layer_loop), so that L2's plan still compiles in minutes.
    vocab_size = len(wordpiece.Tokenizer(args.vocab).vocab) if args.vocab else cfg.text.vocab_size
    cfg = dataclasses.replace(cfg, image=dataclasses.replace(cfg.image, block_loop="scan"),
                              text=dataclasses.replace(cfg.text, vocab_size=vocab_size, layer_loop="scan"))
    params, state = jax.eval_shape(lambda: align.init(jax.random.key(0), cfg))
    optimizer, _ = train.make_optimizer(recipe, params)
    opt_state = jax.eval_shape(optimizer.init, params)
    S = recipe.image_size
    t0 = time.perf_counter()
    compiled = train.step_for(args, cfg, recipe, optimizer, mesh, params, state, opt_state, batch)
    seconds = time.perf_counter() - t0
    m = compiled.memory_analysis()
    if m is None:
        raise train.UsageError(f"XLA gives no memory analysis on this backend ({jax.default_backend()})")
    row = {"size": cfg.name, "towers": f"{cfg.image.name} + BERT-{cfg.text.name}", "image": S,
           "pairs/device": batch // n_dev, "dtype": recipe.dtype, "optimizer": recipe.optimizer,
           "remat": "yes" if args.remat else "no", "parameters": _nbytes(params),
           "optimizer state": _nbytes(opt_state, train.opt_shardings(opt_state, mesh, args.shard_optimizer)),
           "BN state": _nbytes(state), **step_memory(m), "compile": f"{seconds:.0f} s",
           "devices": n_dev, "micro-batch": args.micro_batch or batch // n_dev, "optimizer split": "yes" if args.shard_optimizer else "no"}
    print("| " + " | ".join(MEMORY_COLUMNS) + " |", file=sys.stderr)
    print("| " + " | ".join(_human(v) if isinstance(v, int) and k not in ("image", "pairs/device", "devices", "micro-batch") else str(v)
                            for k, v in row.items()) + " |")
    return 0
