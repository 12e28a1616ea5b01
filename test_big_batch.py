"""The paper's global batch on few devices (README, "The paper's batch on 8 GPUs"): exact micro-batching
and the optimizer state sharded over the devices, each against the plain data-parallel step on more
devices, which test_align.py and test_train_parity.py prove against one device, HF and a float64 LAMB.

Simulated CPU devices (conftest.py makes 8).
"""
import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

import align
import memory
from test_align import _relative_error
import bert
import efficientnet as en
import step
import test_train
import train

# Stochastic depth on (drop_connect 0.2), so that the test sees each micro-batch's random draws.
# tiny's first 4 image stages, as test_train.py's runs: the last one has a second, scanned block.
CFG = dataclasses.replace(align.SIZES["tiny"], image=dataclasses.replace(en.CONFIGS["tiny"], drop_connect=0.2,
                                                                         stages=en.CONFIGS["tiny"].stages[:4]),
                          text=dataclasses.replace(bert.CONFIGS["Tiny"], vocab_size=50, max_len=8))
RECIPE = train.RECIPES["tiny"]


def _batch(n, size=32, length=8):
    pixels = jax.random.uniform(jax.random.key(1), (n, size, size, 3), minval=-1.0, maxval=1.0)
    ids = jax.random.randint(jax.random.key(2), (n, length), 1, 50)
    mask = (jnp.arange(length)[None, :] < jax.random.randint(jax.random.key(3), (n, 1), 3, length + 1)).astype(jnp.int32)
    return pixels, ids, mask


def _gradients(devices, micro_batch, cfg=CFG):
    """step.batch_gradients on `devices` simulated devices, as the step calls it: a function of the rng
    giving (grads, state, metrics) on a fixed batch."""
    mesh = Mesh(np.array(jax.devices()[:devices]), ("data",))
    fn = jax.jit(jax.shard_map(
        functools.partial(step.batch_gradients, cfg=cfg, recipe=RECIPE, micro_batch=micro_batch),
        mesh=mesh, in_specs=(P(), P(), P("data"), P("data"), P("data"), P()), out_specs=(P(), P(), P())))
    params, state = align.init(jax.random.key(0), cfg)
    batch = _batch(16)
    return lambda seed: jax.device_get(fn(params, state, *batch, jax.random.key(seed)))


def test_micro_batches_equal_more_devices(monkeypatch):
    """2 devices x 2 micro-batches of 4 pairs against 4 devices x 4 pairs: the same loss, gradients and
    BatchNorm update, stochastic depth included (its draws are folded by the global micro-batch index
    d x K + k as by the device index; another rng changes the gradients, so the draws are compared).

    In float64, so that equal means equal: every float32 of the code becomes float64 while the programs
    are traced. In float32 the gradients differ by 1.2e-6 (relative, all leaves as one vector; 5e-5 with
    all of tiny's stages, whose last 1x1 maps BatchNorm normalises over 4 numbers); in float64 by 7e-16
    (1.6e-15 with all stages). (1 device x 4 micro-batches: the same.)
    """
    monkeypatch.setattr(jnp, "float32", jnp.float64)
    cfg = dataclasses.replace(CFG, image=dataclasses.replace(CFG.image, dtype="float64", depthwise="conv"),
                              text=dataclasses.replace(CFG.text, dtype="float64"))
    with jax.enable_x64(True):
        four_devices = _gradients(4, None, cfg)
        grads_ref, state_ref, m_ref = four_devices(7)
        grads_other_draws = four_devices(8)[0]
        grads, state, m = _gradients(2, 4, cfg)(7)
    assert jax.tree.leaves(grads)[0].dtype == np.float64
    for name in m_ref:
        np.testing.assert_allclose(m[name], m_ref[name], rtol=1e-12, err_msg=name)
    assert _relative_error(grads, grads_ref) < 1e-12
    assert _relative_error(state, state_ref) < 1e-12
    assert _relative_error(grads_other_draws, grads_ref) > 1e-3


TINY = test_train.TINY + ["--skip-final-eval"]  # test_train.py's runs: the same compiled steps


def _run(out, *flags):
    assert train.main(TINY + ["--out", str(out), *flags]) == 0
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return np.array([r["loss"] for r in rows]), align.load(str(out))[0]


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """4 steps of test_train.py's run, 8 devices x 2 pairs: the reference of the two tests below."""
    return _run(tmp_path_factory.mktemp("plain"), "--steps", "4")


def test_train_py_one_device_with_micro_batches_equals_eight_devices(tmp_path, plain_run):
    """train.py end to end: 4 steps of 16 pairs on 1 device x 8 micro-batches of 2 give the losses and
    weights of 8 devices x 2 pairs (float32: measured 1.6e-7 and 2e-7 relative; with all of tiny's stages,
    whose last maps are 1x1, BatchNorm over 2 pairs made it 3% by the third step)."""
    losses_ref, params_ref = plain_run
    losses, params = _run(tmp_path / "micro", "--steps", "4", "--devices", "1", "--micro-batch", "2")
    np.testing.assert_allclose(losses, losses_ref, rtol=1e-5)
    assert _relative_error(params, params_ref) < 1e-5


def test_sharded_optimizer_equals_replicated_and_resumes_either_way(tmp_path, plain_run):
    """--shard-optimizer on 8 devices: the losses and weights of the replicated run, 4 steps; a run
    checkpointed replicated resumes sharded, and one checkpointed sharded resumes replicated."""
    losses_ref, params_ref = plain_run
    losses, params = _run(tmp_path / "sharded", "--steps", "4", "--shard-optimizer")
    np.testing.assert_allclose(losses, losses_ref, rtol=1e-5)
    assert _relative_error(params, params_ref) < 1e-5
    for first, then in ((["--shard-optimizer"], []), ([], ["--shard-optimizer"])):
        out = tmp_path / f"resumed{len(first)}"
        _run(out, "--steps", "4", "--stop-after", "2", *first)
        losses, params = _run(out, "--steps", "4", *then)
        np.testing.assert_allclose(losses, losses_ref, rtol=1e-5)
        assert _relative_error(params, params_ref) < 1e-5
    # The moments really are split: each device holds an eighth of the largest.
    opt_shape = jax.eval_shape(lambda: train.make_optimizer(train.RECIPES["tiny"], None)[0].init(params))
    mesh = Mesh(np.array(jax.devices()), ("data",))
    split = [s for s in jax.tree.leaves(train.opt_shardings(opt_shape, mesh, True)) if s.spec != P()]
    assert len(split) > len(jax.tree.leaves(opt_shape)) // 2
    assert memory._nbytes(opt_shape, train.opt_shardings(opt_shape, mesh, True)) < memory._nbytes(opt_shape) / 7


def test_micro_batch_errors_are_one_line(tmp_path, capsys):
    assert train.main(TINY + ["--out", str(tmp_path), "--micro-batch", "3"]) == 2
    assert "--micro-batch 3 must divide the 2 pairs per device" in capsys.readouterr().err
    assert train.main(TINY + ["--out", str(tmp_path), "--micro-batch", "1", "--bn-across-devices"]) == 2
    assert "--micro-batch with --bn-across-devices is not offered" in capsys.readouterr().err
