"""Tests: properties of the towers, and parity with HF's PyTorch models given the same weights.

Run with `python -m pytest -q`. conftest.py gives JAX 8 simulated CPU devices for the sharding tests.
The parity tests need torch and transformers (test-only references) and skip cleanly without them.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import backprop
import bert
import efficientnet as en
import weights

P = jax.sharding.PartitionSpec
# Configs are frozen dataclasses, so jit can treat them as static; eager dispatch of every op is slow.
en_apply = jax.jit(en.apply, static_argnames=("cfg", "train", "bn_axis_name"))
bert_apply = jax.jit(bert.apply, static_argnames=("cfg",))


def _images(key, B, size):
    return jax.random.uniform(jax.random.key(key), (B, size, size, 3), minval=-1.0, maxval=1.0)


def _relative_error(tree_a, tree_b):
    """|a - b| / |b| over all leaves as one vector. Entry-wise tolerances do not suit gradients: some
    entries are mathematically zero (a training-mode BatchNorm cancels them) and hold only rounding."""
    a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree_a)]).astype(np.float64)
    b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree_b)]).astype(np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _randomise_bn(params, state, seed=0):
    """Non-trivial BatchNorm affine parameters and running statistics (fresh ones hide layout bugs)."""
    rng = np.random.default_rng(seed)

    def bn(tree_p, tree_s):
        if isinstance(tree_s, dict) and "mean" in tree_s:
            shape = tree_s["mean"].shape
            return ({"scale": rng.uniform(0.5, 1.5, shape).astype(np.float32),
                     "bias": rng.normal(0, 0.1, shape).astype(np.float32)},
                    {"mean": rng.normal(0, 0.1, shape).astype(np.float32),
                     "var": rng.uniform(0.5, 2.0, shape).astype(np.float32)})
        if isinstance(tree_s, dict):
            out = {k: bn(tree_p[k], tree_s[k]) for k in tree_s}
            return ({**tree_p, **{k: v[0] for k, v in out.items()}}, {k: v[1] for k, v in out.items()})
        pairs = [bn(a, b) for a, b in zip(tree_p, tree_s)]
        return [a for a, _ in pairs], [b for _, b in pairs]

    return bn(params, state)


# ----------------------------------------------------------------------------------------------------
# EfficientNet


@pytest.mark.parametrize("name,published_total", [("B0", 5_288_548), ("B7", 66_347_960), ("L2", 480_309_308)])
def test_efficientnet_param_counts_equal_published_trunks(name, published_total):
    """Published totals (Tan & Le 2019; Xie et al. 2020) minus the head conv, its BatchNorm and the classifier."""
    cfg = en.CONFIGS[name]
    head = cfg.features * cfg.channels(1280) + 2 * cfg.channels(1280) + cfg.channels(1280) * 1000 + 1000
    assert weights.count_params(jax.eval_shape(lambda: en.init(jax.random.key(0), cfg))[0]) == published_total - head


def test_efficientnet_feature_widths_and_depths():
    widths = {n: en.CONFIGS[n].features for n in ["B0", "B1", "B2", "B3", "B4", "B5", "B6", "B7", "L2"]}
    assert widths == {"B0": 320, "B1": 320, "B2": 352, "B3": 384, "B4": 448, "B5": 512, "B6": 576,
                      "B7": 640, "L2": 1376}
    blocks = lambda n: sum(len(s) for s in en.CONFIGS[n].blocks())
    assert (blocks("B0"), blocks("B7"), blocks("L2")) == (16, 55, 88)
    # The output shape of L2 at ALIGN's 289x289, traced without allocating 467M parameters.
    cfg = en.CONFIGS["L2"]
    params, state = jax.eval_shape(lambda: en.init(jax.random.key(0), cfg))
    out, _ = jax.eval_shape(lambda p, s, x: en.apply(p, s, x, cfg), params, state,
                            jax.ShapeDtypeStruct((2, 289, 289, 3), jnp.float32))
    assert out.shape == (2, 1376) and out.dtype == jnp.float32


def test_efficientnet_init_gives_each_kernel_its_own_draw_at_its_own_scale():
    """`init` slices one normal draw into every kernel (efficientnet._draw): each gets the TF reference's
    std sqrt(2 / fan_out) (depthwise kernels as Keras shapes them), stacked copies of a block are different
    numbers, BatchNorm starts as identity."""
    cfg = en.CONFIGS["B0"]
    params, state = jax.tree.map(np.asarray, jax.jit(en.init, static_argnums=1)(jax.random.key(0), cfg))
    kernels = []
    for path, w in jax.tree_util.tree_leaves_with_path(params):
        name = jax.tree_util.keystr(path)
        if name.endswith("['scale']") or name.endswith("['bias']"):
            assert np.all(w == (1.0 if "bn" in name and name.endswith("['scale']") else 0.0)), name
            continue
        k = w.shape[-4] if w.ndim >= 4 else 1  # [R,] K, K, in, out  or  [R,] in, out
        # TF's conv_kernel_initializer: fan_out = K * K * output channels of the Keras kernel. A Keras
        # DepthwiseConv2D kernel is [K, K, D, 1]: one output per channel, so fan_out = K * K (0.47 for 3x3).
        std = np.sqrt(2.0 / (k * k * (1 if "depthwise" in name else w.shape[-1])))
        if w.size >= 2000:
            assert abs(float(np.std(w)) / std - 1) < 0.1, (name, float(np.std(w)), std)
        assert abs(float(np.mean(w))) < 4 * std / np.sqrt(w.size) + 1e-7, name
        if "rest" in name and len(w) > 1:
            assert not np.allclose(w[0], w[1]), name
        kernels.append(float(np.ravel(w)[0]))
    per_block = lambda b: 4 if b.expand == 1 else 5  # (expand,) depthwise, SE reduce, SE expand, project
    n = 1 + sum(per_block(blocks[0]) * min(len(blocks), 2) for blocks in cfg.blocks())  # stem; first, rest
    assert len(kernels) == n == 60 and len(set(kernels)) == n  # no two kernels share their numbers
    # The number itself, from TF's formula by hand: B0's second stage (3x3, 96 channels) at sqrt(2 / 9).
    dw = params["stages"][1]["first"]["depthwise_conv"]
    assert dw.shape == (3, 3, 1, 96) and abs(float(np.std(dw)) - 0.4714) < 0.02
    assert all(np.all(v == 0) or np.all(v == 1) for v in jax.tree.leaves(state))


def test_batchnorm_train_uses_batch_statistics_and_updates_running_averages():
    cfg = dataclasses.replace(en.CONFIGS["tiny"], drop_connect=0.0)
    params, state = en.init(jax.random.key(0), cfg)
    params, state = _randomise_bn(params, state)
    x = _images(1, 4, 32)
    f_train, new_state = en_apply(params, state, x, cfg, train=True)
    # Training normalises with the batch's statistics: the running averages cannot change the output.
    other = jax.tree.map(lambda a: np.asarray(a) * 3.0 + 1.0, state)  # numpy: eager jax compiles every op
    f_train2, _ = en_apply(params, other, x, cfg, train=True)
    np.testing.assert_allclose(f_train, f_train2, rtol=1e-5, atol=1e-6)
    # Evaluation uses the running averages, so it does depend on them, and returns them unchanged.
    f_eval, same = en_apply(params, state, x, cfg)
    f_eval2, _ = en_apply(params, other, x, cfg)
    assert not np.allclose(f_eval, f_eval2, atol=1e-3)
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: np.array_equal(a, b), same, state)))
    # The stem's running mean moves by (1 - momentum) toward the batch mean of the stem conv output.
    stem = en._conv(x, params["stem"]["conv"], 2, "SAME")
    batch_mean, batch_var = stem.mean((0, 1, 2)), stem.var((0, 1, 2))
    m = cfg.bn_momentum
    np.testing.assert_allclose(new_state["stem"]["bn"]["mean"],
                               m * state["stem"]["bn"]["mean"] + (1 - m) * batch_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new_state["stem"]["bn"]["var"],
                               m * state["stem"]["bn"]["var"] + (1 - m) * batch_var, rtol=1e-4, atol=1e-6)
    # Stacked (scanned) blocks update their own statistics too.
    rest_old, rest_new = state["stages"][3]["rest"], new_state["stages"][3]["rest"]
    assert not np.allclose(rest_old["project_bn"]["mean"], rest_new["project_bn"]["mean"])


def _sharded_tiny_apply(bn_axis_name, n_dev=8, per_dev=4):
    # 4 images of 48 px per device: the last stages are 2x2, so each BatchNorm channel averages at
    # least 16 values (at 1x1 and 2 images, a near-zero variance amplifies float32 rounding ~100x).
    cfg = dataclasses.replace(en.CONFIGS["tiny"], drop_connect=0.0)
    params, state = en.init(jax.random.key(0), cfg)
    params, state = _randomise_bn(params, state)
    x = _images(2, n_dev * per_dev, 48)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:n_dev]), ("data",))

    def step(p, s, x_local):
        f, s_new = en.apply(p, s, x_local, cfg, train=True, bn_axis_name=bn_axis_name)
        return f, jax.tree.map(lambda a: a[None], s_new)  # one copy of the statistics per device

    f, s_dev = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P("data")),
                                     out_specs=(P("data"), P("data"))))(params, state, x)
    return cfg, params, state, x, f, s_dev


def test_batchnorm_cross_device_mean_equals_single_device_global_batch():
    assert len(jax.devices()) >= 8, "conftest.py should give 8 simulated CPU devices"
    cfg, params, state, x, f, s_dev = _sharded_tiny_apply("data")
    f_ref, s_ref = en_apply(params, state, x, cfg, train=True)
    np.testing.assert_allclose(f, f_ref, rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(s_dev), jax.tree.leaves(s_ref)):
        np.testing.assert_allclose(a, np.broadcast_to(b, a.shape), rtol=1e-4, atol=1e-6)


def test_batchnorm_per_device_statistics_equal_each_shard_alone():
    cfg, params, state, x, f, s_dev = _sharded_tiny_apply(None)
    for d in [0, 5]:
        f_ref, s_ref = en_apply(params, state, x[4 * d:4 * d + 4], cfg, train=True)
        np.testing.assert_allclose(f[4 * d:4 * d + 4], f_ref, rtol=1e-4, atol=1e-5)
        for a, b in zip(jax.tree.leaves(s_dev), jax.tree.leaves(s_ref)):
            np.testing.assert_allclose(a[d], b, rtol=1e-4, atol=1e-6)
    # and the devices really disagree: these are not the global statistics
    stem_means = s_dev["stem"]["bn"]["mean"]
    assert not np.allclose(stem_means[0], stem_means[1])


@pytest.mark.parametrize("act", [None, jax.nn.silu, weights.HF_ACTIVATIONS["gelu"]])
def test_batchnorm_backward_by_hand_equals_autodiff_on_one_device_and_sharded(act):
    """`backprop.normalise_batch`'s hand-written gradient against autodiff of the same forward pass: on one
    device, and over 8 devices with the statistics averaged across them (the sharded gradients of x
    are each device's slice of the single-device ones; scale and bias get the global sum). With an
    activation after it, whose gradient the hand-written pass takes from x recomputed."""
    x = jax.random.normal(jax.random.key(0), (16, 5, 5, 6)) * 3.0 + 1.0
    scale, bias = jax.random.normal(jax.random.key(1), (6,)), jax.random.normal(jax.random.key(2), (6,))
    w = jax.random.normal(jax.random.key(3), x.shape)

    def grad(f):
        loss = lambda x, scale, bias: jnp.sum(jnp.sin(f(x, scale, bias, 1e-3, None, act)[0]) * w)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, scale, bias)

    g_hand, g_auto = grad(backprop.normalise_batch), grad(backprop.normalise_batch_plain)
    assert _relative_error(g_hand, g_auto) < 1e-5

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))

    def sharded(x, scale, bias, w_dev):
        f = lambda x, scale, bias: jnp.sum(jnp.sin(backprop.normalise_batch(x, scale, bias, 1e-3, "data", act)[0]) * w_dev)
        return jax.grad(f, argnums=(0, 1, 2))(x, scale, bias)

    g_x, g_scale, g_bias = jax.jit(jax.shard_map(sharded, mesh=mesh, in_specs=(P("data"), P(), P(), P("data")),
                                                 out_specs=(P("data"), P(), P())))(x, scale, bias, w)
    assert _relative_error((g_x, g_scale, g_bias), g_auto) < 1e-5


def test_stochastic_depth_only_in_training_and_per_sample():
    cfg = en.CONFIGS["tiny"]
    assert cfg.drop_connect == 0.2
    params, state = en.init(jax.random.key(0), cfg)
    x = _images(3, 4, 32)
    f1, _ = en_apply(params, state, x, cfg, train=False, rng=jax.random.key(1))
    f2, _ = en_apply(params, state, x, cfg, train=False, rng=jax.random.key(2))
    np.testing.assert_array_equal(f1, f2)
    t1, _ = en_apply(params, state, x, cfg, train=True, rng=jax.random.key(1))
    t2, _ = en_apply(params, state, x, cfg, train=True, rng=jax.random.key(2))
    assert not np.allclose(t1, t2)
    with pytest.raises(ValueError, match="rng"):
        en.apply(params, state, x, cfg, train=True)
    # A whole sample's branch is kept (scaled by 1/keep) or dropped, never single activations.
    h = jnp.ones((64, 3, 3, 5))
    out = np.asarray(en._drop_path(h, 0.25, jax.random.key(0)))
    per_sample = out.reshape(64, -1)
    assert np.all(np.isclose(per_sample, 0.0) | np.isclose(per_sample, 1 / 0.75))
    assert (per_sample.min(1) == per_sample.max(1)).all() and 0 < (per_sample[:, 0] == 0).sum() < 64


@pytest.mark.parametrize("K", [3, 5])
@pytest.mark.parametrize("stride,pad", [(1, "SAME"), (2, "SAME"), (2, "hf"), (2, "hf-square")])
@pytest.mark.parametrize("size", [9, 10])
@pytest.mark.parametrize("group_rows", [None, 1, 4])
def test_depthwise_shift_equals_grouped_conv(K, stride, pad, size, group_rows, monkeypatch):
    """The CPU path (shifted multiply-adds) against XLA's grouped convolution, values and gradients.
    The weight gradient (`backprop.tap_gradients`): at these sizes by default one tap at a time over the batch;
    in groups of 1 row; and of 4 rows, where a sample's last group overlaps the one before."""
    if group_rows is not None:
        monkeypatch.setattr(backprop, "GROUP_ROWS", group_rows)
        monkeypatch.setattr(backprop, "MIN_GROUP_ROWS", 1)
    padding = {"SAME": "SAME", "hf": ((K // 2 - 1, K // 2),) * 2, "hf-square": ((K // 2, K // 2),) * 2}[pad]
    x = _images(7, 2, size)[..., :1] * jnp.arange(1, 7) / 3.0
    w = jax.random.normal(jax.random.key(K), (K, K, 1, 6))
    np.testing.assert_allclose(en._depthwise(x, w, stride, padding, "shift"),
                               en._depthwise(x, w, stride, padding, "conv"), rtol=1e-5, atol=1e-5)
    loss = lambda impl: lambda x, w: jnp.sum(jnp.sin(en._depthwise(x, w, stride, padding, impl)))
    g_shift = jax.grad(loss("shift"), argnums=(0, 1))(x, w)
    g_conv = jax.grad(loss("conv"), argnums=(0, 1))(x, w)
    assert _relative_error(g_shift, g_conv) < 1e-5


@pytest.mark.parametrize("stride", [1, 2])
def test_depthwise_weight_gradient_in_groups_of_rows(stride):
    """The weight gradient's row groups at their real sizes: 40 rows (stride 1) are groups of 24 rows
    starting at 0 and 16 (overlapping), 20 rows (stride 2) one group; against XLA's grouped conv."""
    x = _images(8, 2, 40)[..., :1] * jnp.arange(1, 5) / 3.0
    w = jax.random.normal(jax.random.key(stride), (3, 3, 1, 4))
    loss = lambda impl: lambda w: jnp.sum(jnp.sin(en._depthwise(x, w, stride, "SAME", impl)))
    H_out = 40 // stride
    assert backprop.MIN_GROUP_ROWS <= H_out  # the groups' path, not lax.map's
    assert stride == 2 or backprop.GROUP_ROWS < H_out < 2 * backprop.GROUP_ROWS  # two groups, overlapping
    assert _relative_error(jax.grad(loss("shift"))(w), jax.grad(loss("conv"))(w)) < 1e-5


def test_depthwise_weight_gradient_in_groups_inside_shard_map(monkeypatch):
    """The weight gradient in groups of rows (`backprop.tap_gradients`, forced by small groups) inside shard_map:
    each device's sum over its own samples, which the parameter's psum adds up to the single-device one."""
    monkeypatch.setattr(backprop, "GROUP_ROWS", 4)
    monkeypatch.setattr(backprop, "MIN_GROUP_ROWS", 1)
    x, w = _images(7, 4, 9)[..., :1] * jnp.arange(1, 7) / 3.0, jax.random.normal(jax.random.key(3), (3, 3, 1, 6))
    loss = lambda x, w: jnp.sum(jnp.sin(en._depthwise(x, w, 1, "SAME", "shift")))
    g_one = jax.grad(loss, argnums=1)(x, w)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
    g_two = jax.jit(jax.shard_map(jax.grad(loss, argnums=1), mesh=mesh, in_specs=(P("data"), P()), out_specs=P()))(x, w)
    assert _relative_error(g_two, g_one) < 1e-5


def _assert_each_loop_agrees(grad, params, cfg, field, loss_ref, grads_ref, rtol, tol):
    """The model's loop (`field`: block_loop or layer_loop) as a scan and unrolled: the reference sums."""
    for loop in ("scan", "unroll"):
        loss, grads = grad(params, dataclasses.replace(cfg, **{field: loop}))
        np.testing.assert_allclose(loss, loss_ref, rtol=rtol)
        assert _relative_error(grads, grads_ref) < tol


def test_efficientnet_remat_scan_unroll_and_bfloat16_agree_with_float32():
    cfg = dataclasses.replace(en.CONFIGS["tiny"], drop_connect=0.0)
    params, state = en.init(jax.random.key(0), cfg)
    params, state = _randomise_bn(params, state)
    x = _images(4, 4, 48)

    def loss(p, cfg):
        f, _ = en.apply(p, state, x, cfg, train=True)
        return jnp.sum(jnp.sin(f))

    grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    l32, g32 = grad(params, cfg)
    l_r, g_r = grad(params, dataclasses.replace(cfg, remat=True))
    # Remat changes no maths, but XLA fuses the recomputed forward differently: float32 rounding in a
    # different order. The loss was 1.0035e-6 apart once BatchNorm got its own backward pass (whose
    # forward XLA now fuses apart from the reductions), so 1e-5 (a few tens of float32 ulps).
    # The gradients' relative error was below 1e-5 with XLA's default LLVM optimisation and 1.01e-5
    # with conftest's level 0 (other instruction selection, other rounding): 2e-5 allows both.
    np.testing.assert_allclose(l_r, l32, rtol=1e-5)
    assert _relative_error(g_r, g32) < 2e-5
    # The stages' loops as scans and unrolled (CPU's default): the same sums, fused apart as remat's.
    _assert_each_loop_agrees(grad, params, cfg, "block_loop", l32, g32, rtol=1e-5, tol=2e-5)
    with pytest.raises(ValueError, match="block_loop"):
        en_apply(params, state, x, dataclasses.replace(cfg, block_loop="loop"))
    # bfloat16 keeps 8 bits of mantissa: features within a few percent of their spread.
    cfg16 = dataclasses.replace(cfg, dtype="bfloat16")
    f32, _ = en_apply(params, state, x, cfg)
    f16, _ = en_apply(params, state, x, cfg16)
    assert f16.dtype == jnp.float32
    err = np.abs(np.asarray(f16) - np.asarray(f32)).max() / np.asarray(f32).std()
    assert err < 0.1, err
    assert jax.tree.leaves(jax.tree.map(lambda a: a.dtype, params)) == [jnp.float32] * len(jax.tree.leaves(params))


# ----------------------------------------------------------------------------------------------------
# BERT


@pytest.mark.parametrize("name,hf_total", [("Base", 109_482_240), ("Large", 335_141_888)])
def test_bert_param_counts_equal_published(name, hf_total):
    """HF BertModel totals (30522 vocab, 512 positions) minus the pooler, which ALIGN does not use."""
    cfg = dataclasses.replace(bert.CONFIGS[name], vocab_size=30522, max_len=512)
    ours = weights.count_params(jax.eval_shape(lambda: bert.init(jax.random.key(0), cfg)))
    assert ours == hf_total - (cfg.width * cfg.width + cfg.width)
    assert bert.CONFIGS["Large"].heads == 16 and bert.CONFIGS["Tiny"].heads == 2


def _tiny_bert():
    cfg = dataclasses.replace(bert.CONFIGS["Tiny"], vocab_size=50, max_len=16)
    params = bert.init(jax.random.key(0), cfg)
    ids = jax.random.randint(jax.random.key(1), (3, 12), 5, 50)
    mask = (jnp.arange(12)[None] < jnp.array([[12], [7], [3]])).astype(jnp.int32)
    return cfg, params, jnp.where(mask == 1, ids, 0), mask


def test_padding_cannot_change_cls():
    cfg, params, ids, mask = _tiny_bert()
    cls = bert_apply(params, ids, mask, cfg)[:, 0]
    perturbed = jnp.where(mask == 1, ids, (ids * 7 + 3) % 50)
    cls2 = bert_apply(params, perturbed, mask, cfg)[:, 0]
    np.testing.assert_array_equal(cls, cls2)
    # and through gradients: padded positions hold token ids used nowhere else (45..49), and the [CLS]
    # output has zero derivative w.r.t. their embedding rows, while real tokens' rows do get gradient
    padded = jnp.where(mask == 1, ids % 40 + 5, 45 + jnp.arange(ids.shape[1]) % 5)
    # (a random projection: the plain sum of a LayerNorm output is constant, its gradient zero everywhere)
    w_D = jax.random.normal(jax.random.key(9), (cfg.width,))
    g = jax.jit(jax.grad(lambda p: (bert.apply(p, padded, mask, cfg)[:, 0] @ w_D).sum()))(params)["embeddings"]["word"]
    assert np.abs(np.asarray(g[45:])).max() == 0.0
    assert np.abs(np.asarray(g[5:45])).max() > 0.0


def test_bert_remat_scan_unroll_and_bfloat16_agree_with_float32():
    cfg, params, ids, mask = _tiny_bert()
    loss = lambda p, c: jnp.sum(jnp.sin(bert.apply(p, ids, mask, c)[:, 0].astype(jnp.float32)))
    grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    l32, g32 = grad(params, cfg)
    l_r, g_r = grad(params, dataclasses.replace(cfg, remat=True))
    np.testing.assert_allclose(l_r, l32, rtol=1e-6)
    assert _relative_error(g_r, g32) < 1e-5
    # The layers' loop as one scanned layer and unrolled (CPU's default): the same sums.
    _assert_each_loop_agrees(grad, params, cfg, "layer_loop", l32, g32, rtol=1e-6, tol=1e-5)
    with pytest.raises(ValueError, match="layer_loop"):
        bert_apply(params, ids, mask, dataclasses.replace(cfg, layer_loop="loop"))
    h32 = bert_apply(params, ids, mask, cfg)
    h16 = bert_apply(params, ids, mask, dataclasses.replace(cfg, dtype="bfloat16"))
    assert h16.dtype == jnp.bfloat16
    err = np.abs(np.asarray(h16, np.float32) - np.asarray(h32)).max()
    assert err < 0.1, err  # LayerNorm outputs are O(1); bfloat16 has ~3 significant digits


def test_bert_rejects_too_long_sequences():
    cfg, params, ids, mask = _tiny_bert()
    long_ids = jnp.zeros((1, cfg.max_len + 1), jnp.int32)
    with pytest.raises(ValueError, match="max_len"):
        bert.apply(params, long_ids, jnp.ones_like(long_ids), cfg)


# ----------------------------------------------------------------------------------------------------
# Parity with HF transformers (PyTorch), same random weights


def _torch():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return torch, transformers


def _perturb_torch_norms(torch, model, calibrate=None, seed=0):
    """Non-trivial LayerNorm/BatchNorm parameters and BatchNorm running statistics, and conv weights
    at a 1/sqrt(fan_in) scale (HF initialises everything at std 0.02, which makes signals vanish).

    Running statistics unrelated to the activations shrink the input's signal ~8x per block, leaving
    features that are BatchNorm biases and a parity test that proves little. So with `calibrate`
    (an input batch, NCHW), the statistics are first set to that batch's by one training-mode pass,
    then perturbed.
    """
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            if isinstance(m, torch.nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / math.sqrt(fan_in))
        if calibrate is not None:
            for m in bns:
                m.momentum = 1.0  # running statistics := this batch's
            model.train()(calibrate)
        for m in bns:
            m.running_mean.add_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.mul_(torch.rand(m.running_var.shape, generator=g) * 0.5 + 0.75)
    return model.eval()


def test_bert_matches_hf_with_padded_batch(tmp_path):
    torch, transformers = _torch()
    hf_cfg = transformers.BertConfig(vocab_size=120, hidden_size=128, num_hidden_layers=3, num_attention_heads=2,
                                     intermediate_size=512, max_position_embeddings=24, type_vocab_size=2)
    model = _perturb_torch_norms(torch, transformers.BertModel(hf_cfg))
    ids = np.random.default_rng(0).integers(5, 120, (4, 20))
    mask = (np.arange(20)[None] < np.array([[20], [11], [5], [1]])).astype(np.int64)
    ids = np.where(mask == 1, ids, 0)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    model.save_pretrained(tmp_path)  # safetensors, read back with numpy
    params, cfg = bert.from_hf(str(tmp_path))
    assert (cfg.layers, cfg.width, cfg.heads, cfg.max_len) == (3, 128, 2, 24)
    ours = np.asarray(bert_apply(params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32), cfg))
    valid = mask == 1  # padded positions are not outputs anyone reads; HF and we agree on them anyway
    np.testing.assert_allclose(ours[valid], ref[valid], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)
    # The reverse mapping gives back HF's tensors, so an HF model can load what we write.
    sd = bert.to_hf_state_dict(params, cfg)
    for k, v in model.state_dict().items():
        if k in sd:
            np.testing.assert_array_equal(sd[k], v.numpy(), err_msg=k)
    assert set(sd) == {k for k in model.state_dict() if not k.startswith("pooler") and "position_ids" not in k
                       and "token_type_ids" not in k}


def _hf_efficientnet(torch, transformers, align, depthwise_padding=(), size=64):
    kw = dict(width_coefficient=0.25, depth_coefficient=0.5, depthwise_padding=list(depthwise_padding),
              hidden_dim=320, image_size=size)
    if align:
        model = transformers.AlignVisionModel(transformers.AlignVisionConfig(**kw))
    else:
        model = transformers.EfficientNetModel(transformers.EfficientNetConfig(**kw))
    calibrate = torch.rand((16, 3, size, size), generator=torch.Generator().manual_seed(1)) * 2 - 1
    return _perturb_torch_norms(torch, model, calibrate)


@pytest.mark.parametrize("size", [64, 65])
@pytest.mark.parametrize("align", [False, True], ids=["EfficientNetModel", "AlignVisionModel"])
def test_efficientnet_matches_hf_at_even_and_odd_sizes(size, align, tmp_path):
    torch, transformers = _torch()
    model = _hf_efficientnet(torch, transformers, align, (3,) if align else (), size)
    x = np.random.default_rng(size).uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
    with torch.no_grad():
        out = model(torch.tensor(x.transpose(0, 3, 1, 2)), output_hidden_states=True)
        last_block = out.hidden_states[-1] if not align else out.last_hidden_state
        ref = last_block.mean((2, 3)).numpy()
        if align:  # AlignVisionModel's pooler is this same global average
            np.testing.assert_allclose(out.pooler_output.reshape(2, -1).numpy(), ref, rtol=1e-5, atol=1e-6)
    model.save_pretrained(tmp_path)
    params, state, cfg = en.from_hf(str(tmp_path))
    assert cfg.padding == "hf" and cfg.features == 80
    ours, _ = en_apply(params, state, jnp.asarray(x), cfg)
    # 1e-4 of the features' scale: they reach ~50 after 10 blocks, and an entry-wise rtol would hold
    # small entries of the same vector to a tighter absolute bound than the large ones.
    assert np.abs(ours - ref).max() < 1e-4 * np.abs(ref).max(), np.abs(ours - ref).max() / np.abs(ref).max()
    # The features depend on the image, not just on BatchNorm biases: a comparison with meaning.
    assert np.abs(ref[0] - ref[1]).max() > 0.05 * np.abs(ref).max()
    # Our own "SAME" padding equals HF's at even sizes and differs at odd ones (that is why it is recorded).
    same, _ = en_apply(params, state, jnp.asarray(x), dataclasses.replace(cfg, padding="same"))
    same_err = np.abs(same - ref).max() / np.abs(ref).max()
    assert (same_err < 1e-4) == (size % 2 == 0 and not align), same_err
    # Round trip through HF names.
    sd = en.to_hf_state_dict(params, state, cfg)
    for k, v in model.state_dict().items():
        if k in sd and "num_batches_tracked" not in k:
            np.testing.assert_array_equal(sd[k], v.numpy(), err_msg=k)


# ----------------------------------------------------------------------------------------------------
# The ALIGN dual encoder (align.py); the loss itself is tested in test_loss.py

import align  # noqa: E402


def test_align_sizes_and_embeddings():
    assert {n: c.embed_dim for n, c in align.SIZES.items() if n != "tiny"} == {
        "L2": 1376, "B7": 640, "B5": 640, "B3": 640, "B1": 640}
    assert not align.SIZES["L2"].image_projection and not align.SIZES["B7"].image_projection
    assert align.SIZES["B5"].image_projection and align.SIZES["B1"].image_projection
    cfg = dataclasses.replace(align.SIZES["tiny"], text=dataclasses.replace(align.SIZES["tiny"].text, vocab_size=50))
    params, state = align.init(jax.random.key(0), cfg)
    assert float(align.temperature(params, cfg)) == pytest.approx(1.0, rel=1e-6)  # Sec. 5
    img = align.embed_images(params, state, _images(0, 3, 32), cfg)
    txt = align.embed_texts(params, jnp.ones((3, 8), jnp.int32), jnp.ones((3, 8), jnp.int32), cfg)
    for e in (img, txt):
        assert e.shape == (3, cfg.embed_dim) and e.dtype == jnp.float32
        np.testing.assert_allclose(jnp.linalg.norm(e, axis=-1), 1.0, rtol=1e-5)
    fixed = dataclasses.replace(cfg, learn_temperature=False, temperature_init=1 / 64)  # Table 8 rows 7-9
    p_fixed, _ = align.init(jax.random.key(0), fixed)
    assert "temperature" not in p_fixed and align.temperature(p_fixed, fixed) == 1 / 64
    # The main model's embedding shape, traced without allocating its 873M parameters.
    l2 = align.SIZES["L2"]
    p, s = jax.eval_shape(lambda: align.init(jax.random.key(0), l2))
    out = jax.eval_shape(lambda p, s, x: align.embed_images(p, s, x, l2), p, s,
                         jax.ShapeDtypeStruct((1, 289, 289, 3), jnp.float32))
    assert out.shape == (1, 1376)


def test_sharded_train_loss_and_gradients_equal_single_device():
    """The data-parallel step train.py runs: the global-batch loss over 8 devices, BatchNorm statistics
    averaged over them, parameter gradients pmean'd (contract in align.contrastive_loss)."""
    tiny = en.CONFIGS["tiny"]  # its first 4 stages, as test_train.py's runs: less to compile, the same step
    cfg = dataclasses.replace(align.SIZES["tiny"], image=dataclasses.replace(tiny, drop_connect=0.0, stages=tiny.stages[:4]),
                              text=dataclasses.replace(bert.CONFIGS["Tiny"], vocab_size=50, max_len=8))
    params, state = align.init(jax.random.key(0), cfg)
    n_dev, B = 8, 16
    pixels = _images(5, B, 32)
    ids = jax.random.randint(jax.random.key(6), (B, 8), 1, 50)
    mask = jnp.ones((B, 8), jnp.int32)
    grad_fn = jax.value_and_grad(align.train_loss, has_aux=True)
    (loss_ref, (m_ref, s_ref)), g_ref = jax.jit(grad_fn, static_argnums=5)(
        params, state, pixels, ids, mask, cfg, None)

    def step(p, s, x, i, m):
        (loss, (metrics, s)), g = grad_fn(p, s, x, i, m, cfg, None, axis_name="data", bn_axis_name="data")
        return loss, metrics, s, jax.lax.pmean(g, "data")

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:n_dev]), ("data",))
    loss, metrics, s_new, g = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P("data"), P("data"), P("data")),
                                                    out_specs=P()))(params, state, pixels, ids, mask)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
    for name in m_ref:  # every logged value is the global one
        np.testing.assert_allclose(metrics[name], m_ref[name], rtol=1e-5, err_msg=name)
    features = jax.jit(lambda p, s, x, i, m: (align.image_features(p, s, x, cfg, train=True)[0],
                                              align.text_features(p, i, m, cfg)))
    for name, f_BE in zip(("img_norm", "txt_norm"), features(params, state, pixels, ids, mask)):
        np.testing.assert_allclose(m_ref[name], np.linalg.norm(np.asarray(f_BE), axis=1).mean(), rtol=1e-5)
    assert _relative_error(g, g_ref) < 1e-4
    assert _relative_error(s_new, s_ref) < 1e-5


def _hf_align(torch, transformers, size, depthwise_padding=(3,)):
    vision = dict(width_coefficient=0.25, depth_coefficient=0.5, depthwise_padding=list(depthwise_padding),
                  hidden_dim=320, image_size=size)
    text = dict(vocab_size=90, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512,
                max_position_embeddings=16)
    model = transformers.AlignModel(transformers.AlignConfig(text_config=text, vision_config=vision, projection_dim=80))
    calibrate = torch.rand((16, 3, size, size), generator=torch.Generator().manual_seed(1)) * 2 - 1
    _perturb_torch_norms(torch, model.vision_model, calibrate)
    _perturb_torch_norms(torch, model.text_model)
    with torch.no_grad():
        model.temperature.fill_(0.07)
    return model.eval()


def _hf_align_outputs(torch, model, x, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     pixel_values=torch.tensor(x.transpose(0, 3, 1, 2)), return_loss=True)


def _align_inputs(size, B=4):
    rng = np.random.default_rng(size)
    x = rng.uniform(-1, 1, (B, size, size, 3)).astype(np.float32)
    mask = (np.arange(12)[None] < rng.integers(2, 13, (B, 1))).astype(np.int64)
    ids = np.where(mask == 1, rng.integers(5, 90, (B, 12)), 0)
    return x, ids, mask


@pytest.mark.parametrize("size", [64, 65])
def test_align_from_hf_matches_hf_embeddings_and_loss(size, tmp_path):
    torch, transformers = _torch()
    model = _hf_align(torch, transformers, size)
    x, ids, mask = _align_inputs(size)
    out = _hf_align_outputs(torch, model, x, ids, mask)
    model.save_pretrained(tmp_path)
    params, state, cfg = align.from_hf(str(tmp_path))
    assert cfg.embed_dim == 80 and not cfg.image_projection
    np.testing.assert_allclose(align.temperature(params, cfg), 0.07, rtol=1e-5)
    img = align.embed_images(params, state, jnp.asarray(x), cfg)
    txt = align.embed_texts(params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32), cfg)
    np.testing.assert_allclose(img, out.image_embeds.numpy(), atol=1e-4)  # unit vectors: absolute 1e-4
    np.testing.assert_allclose(txt, out.text_embeds.numpy(), atol=1e-4)
    assert np.abs(out.image_embeds[0] - out.image_embeds[1]).max() > 0.05  # depends on the image
    # The paper sums the two directions, HF averages them (both with label smoothing 0.1).
    loss = align.contrastive_loss(img, txt, align.temperature(params, cfg), label_smoothing=0.1)
    np.testing.assert_allclose(loss, 2 * out.loss.item(), rtol=1e-4)


def test_align_to_hf_round_trips(tmp_path):
    torch, transformers = _torch()
    size = 65
    model = _hf_align(torch, transformers, size)
    x, ids, mask = _align_inputs(size)
    out = _hf_align_outputs(torch, model, x, ids, mask)
    model.save_pretrained(tmp_path / "hf")
    params, state, cfg = align.from_hf(str(tmp_path / "hf"))
    align.to_hf(params, state, cfg, str(tmp_path / "ours"))
    back = transformers.AlignModel.from_pretrained(str(tmp_path / "ours")).eval()
    out2 = _hf_align_outputs(torch, back, x, ids, mask)
    for a, b in [(out2.image_embeds, out.image_embeds), (out2.text_embeds, out.text_embeds)]:
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)
    assert back.temperature.item() == pytest.approx(0.07, rel=1e-6)


def test_our_model_in_hf_gives_our_embeddings(tmp_path):
    """Our "SAME"-padded model, written for an even size where some stride-2 inputs are odd (36: 18, 9, 5)."""
    torch, transformers = _torch()
    image = dataclasses.replace(en.CONFIGS["tiny"], width=0.25, skip_first_blocks=False)  # see to_hf
    cfg = align.Config("t", image, dataclasses.replace(bert.CONFIGS["Tiny"], vocab_size=90, max_len=16), 80)
    params, state = align.init(jax.random.key(0), cfg)
    params["image"], state = _randomise_bn(params["image"], state)
    assert align._hf_square_pad_blocks(cfg.image, 36)  # the case that needs depthwise_padding
    align.to_hf(params, state, cfg, str(tmp_path), image_size=36)
    model = transformers.AlignModel.from_pretrained(str(tmp_path)).eval()
    x, ids, mask = _align_inputs(36)
    out = _hf_align_outputs(torch, model, x, ids, mask)
    np.testing.assert_allclose(align.embed_images(params, state, jnp.asarray(x), cfg), out.image_embeds.numpy(), atol=1e-5)  # measured 3e-7
    np.testing.assert_allclose(align.embed_texts(params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32), cfg),
                               out.text_embeds.numpy(), atol=1e-4)
    with pytest.raises(ValueError, match="odd"):
        align.to_hf(params, state, cfg, str(tmp_path / "odd"), image_size=289)
    # At width 0.25 TF's rule gives the first block (stride 1, 8 -> 8 channels) a skip that HF cannot
    # express: refused (written anyway, HF's embeddings were 0.33 from ours).
    skip = dataclasses.replace(cfg, image=dataclasses.replace(image, skip_first_blocks=True))
    with pytest.raises(ValueError, match="skip_first_blocks=False"):
        align.to_hf(params, state, skip, str(tmp_path / "skip"), 36)


def test_pickled_checkpoints_are_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="pytorch_model.bin"):
        align.from_hf(str(tmp_path))


def test_align_save_load_round_trip(tmp_path):
    cfg = dataclasses.replace(align.SIZES["tiny"], text=dataclasses.replace(bert.CONFIGS["Tiny"], vocab_size=30))
    params, state = align.init(jax.random.key(3), cfg)
    (tmp_path / "v.txt").write_text("[PAD]\n[UNK]\n")
    align.save(str(tmp_path / "m"), params, state, cfg, vocab_path=str(tmp_path / "v.txt"))
    p2, s2, cfg2 = align.load(str(tmp_path / "m"))
    assert cfg2 == cfg and (tmp_path / "m" / "vocab.txt").read_text() == "[PAD]\n[UNK]\n"
    assert _relative_error(p2, params) == 0 and _relative_error(s2, state) == 0
    other = dataclasses.replace(cfg, embed_dim=32)
    (tmp_path / "m" / "align_config.json").write_text(__import__("json").dumps(align.config_to_dict(other)))
    with pytest.raises(ValueError, match="another size"):
        align.load(str(tmp_path / "m"))


def test_model_dir_resolves_model_run_and_hf_directories(tmp_path):
    """A training run's --out holds train.py's config.json beside its ckpt_* model directories: the newest
    checkpoint is the model, not the run directory (which an HF config.json alone would name)."""
    run, hf = tmp_path / "run", tmp_path / "hf"
    for d in ("ckpt_000000200", "ckpt_000000400", ".tmp_ckpt_000000600"):
        (run / d).mkdir(parents=True)
        (run / d / "align_config.json").write_text("{}")
        (run / d / "train_state.json").write_text("{}")
    (run / "ckpt_000000500").mkdir()  # half-deleted: no train_state.json
    (run / "ckpt_000000500" / "align_config.json").write_text("{}")
    (run / "config.json").write_text("{}")
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert align.model_dir(str(run)) == str(run / "ckpt_000000400")
    assert align.model_dir(str(run / "ckpt_000000200")) == str(run / "ckpt_000000200")
    assert align.model_dir(str(hf)) == str(hf)
    with pytest.raises(FileNotFoundError, match="neither a model directory"):
        align.model_dir(str(tmp_path))
