"""train.py's checkpoints, and the collectives between processes that writing one needs.

`OUT/ckpt_<step>/`: a model directory of `align.save` (weights, BatchNorm state, config, vocab), plus
the optimizer state (`optimizer.safetensors`), `train_state.json` (step, every process's data position,
counters) and, when kept, the moving average of the weights (`ema/`). Written under a temporary name
and renamed into place, so a kill never leaves a half-written one; the last `keep` are kept.
"""
import json
import os
import shutil
import time

import jax
import numpy as np

import align
import weights


class Mismatch(ValueError):
    """A checkpoint that does not hold the model or optimizer asked for (train.py: one line, exit 2)."""


def save(out, step, params, state, opt_state, cfg, vocab, train_state, keep, pause=False, teacher=None):
    """OUT/ckpt_<step>: written as OUT/.tmp_ckpt_<step> and renamed, so it is whole or absent. The moving
    average of the weights (`teacher`), when kept, is the model directory OUT/ckpt_<step>/ema.

    `pause` is for tests: stop half-way through the write, to be killed there.
    """
    final = os.path.join(out, f"ckpt_{step:09d}")
    tmp = os.path.join(out, f".tmp_ckpt_{step:09d}")
    for stale in (d for d in os.listdir(out) if d.startswith(".tmp_ckpt_")):  # left by a killed run
        shutil.rmtree(os.path.join(out, stale), ignore_errors=True)
    align.save(tmp, jax.device_get(params), jax.device_get(state), cfg, vocab_path=vocab)
    weights.write_safetensors(os.path.join(tmp, "optimizer.safetensors"), weights.tree_to_flat(jax.device_get(opt_state)))
    if teacher is not None:
        align.save(os.path.join(tmp, "ema"), *jax.device_get((teacher["params"], teacher["state"])), cfg, vocab_path=vocab)
    if pause:
        time.sleep(3600)
    with open(os.path.join(tmp, "train_state.json"), "w") as f:
        json.dump(train_state, f)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in align.checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def gather_data_states(state, size=1 << 16):
    """Every process's loader position, as a list indexed by process (each reads its own shards)."""
    if jax.process_count() == 1:
        return [state]
    from jax.experimental import multihost_utils
    blob = json.dumps(state).encode()
    if len(blob) > size:
        raise RuntimeError(f"data loader state is {len(blob)} bytes, more than {size}")
    rows = multihost_utils.process_allgather(np.frombuffer(blob.ljust(size), np.uint8))
    return [json.loads(bytes(row).rstrip()) for row in np.asarray(rows)]


def to_host(tree):
    """Numpy copies of global arrays, whole on every process; a collective where a leaf is split across
    processes (`--shard-optimizer` on several hosts), which every process must then call."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if x.is_fully_replicated
                        else np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)


def any_process(flag: bool) -> bool:
    """True on every process if `flag` is true on any (a collective: every process must call it)."""
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def load(path, cfg, optimizer):
    """(params, state, optimizer state, train_state.json) of a checkpoint, refused unless it holds `cfg`'s
    model (any model when cfg is None)."""
    params, state, saved_cfg = align.load(path)
    if cfg is not None and saved_cfg != cfg:
        raise Mismatch(f"{path} holds a {saved_cfg.name} model ({saved_cfg.image.name} + BERT-{saved_cfg.text.name}, "
                         f"{saved_cfg.embed_dim}-d), not the one asked for; use a new --out or the same --size")
    opt_template = jax.eval_shape(optimizer.init, params)
    try:
        opt_state = weights.flat_to_tree(weights.read_safetensors(os.path.join(path, "optimizer.safetensors")),
                                         opt_template)
    except (KeyError, ValueError) as e:
        raise Mismatch(f"{path}: its optimizer state does not fit this optimizer ({str(e).splitlines()[0][:120]}); "
                         f"it was written with another --optimizer or an older train.py: use a new --out, "
                         f"with --init {path} to start from its weights")
    with open(os.path.join(path, "train_state.json")) as f:
        return params, state, opt_state, json.load(f)
