"""Tests of the ALIGN loss (align.py, Sec. 4.1 Eq. 1-2): a float64 numpy reference, sharded == unsharded on
simulated CPU devices (conftest.py makes 8), loss properties with known values, parity with HF's
`align_loss`, and the data-parallel gradient contract that train.py relies on.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

import align


# --- an independent float64 reference: loss and its analytic gradient, written from Eq. 1-2 ---

def reference_loss_and_grads(img_NE, txt_NE, temperature, label_smoothing, negatives_fraction=1.0):
    """L_i2t + L_t2i and dL/d(img, txt, temperature), in float64 numpy over the whole batch."""
    x, y, t = img_NE.astype(np.float64), txt_NE.astype(np.float64), float(temperature)
    n = len(x)
    g = round(negatives_fraction * n)
    group_N = np.arange(n) // g
    candidates_NN = group_N[:, None] == group_N[None, :]
    target_NN = (1 - label_smoothing) * np.eye(n) + label_smoothing / g * candidates_NN
    s_NN = x @ y.T / t

    def one_direction(s_NN):
        z_NN = np.where(candidates_NN, s_NN, -np.inf)
        z_NN = z_NN - z_NN.max(axis=1, keepdims=True)
        log_p_NN = z_NN - np.log(np.exp(z_NN).sum(axis=1, keepdims=True))
        loss = -(target_NN * np.where(candidates_NN, log_p_NN, 0.0)).sum() / n
        return loss, (np.exp(log_p_NN) - target_NN) / n  # d loss / d logits: softmax minus target

    loss_i2t, d_s_i2t = one_direction(s_NN)
    loss_t2i, d_s_t2i = one_direction(s_NN.T)
    d_s_NN = d_s_i2t + d_s_t2i.T
    return (loss_i2t + loss_t2i, d_s_NN @ y / t, d_s_NN.T @ x / t, -(d_s_NN * s_NN).sum() / t)


def random_pairs(n, e=16, seed=0, noise=1.0):
    """n unit-norm image/text pairs, positives correlated so the loss is well away from log N."""
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(n, e))
    txt = img + noise * rng.normal(size=(n, e))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    return img.astype(np.float32), txt.astype(np.float32)


def mesh_of(n_devices):
    return Mesh(np.array(jax.devices()[:n_devices]), ("data",))


def sharded_loss_and_grads(n_devices, img, txt, temperature, check_vma=True, **kwargs):
    """Loss and gradients (img, txt, temperature) with jax.grad taken inside shard_map, per device."""
    def step(img_BE, txt_BE, t):
        loss, grads = jax.value_and_grad(align.contrastive_loss, argnums=(0, 1, 2))(
            img_BE, txt_BE, t, axis_name="data", **kwargs)
        return loss[None], grads[0], grads[1], grads[2][None]

    f = jax.shard_map(step, mesh=mesh_of(n_devices), in_specs=(P("data"), P("data"), P()),
                      out_specs=(P("data"), P("data"), P("data"), P("data")), check_vma=check_vma)
    return [np.asarray(a) for a in jax.jit(f)(img, txt, jnp.float32(temperature))]


def assert_close(actual, expected, rtol=1e-5):
    """Relative agreement, with an absolute floor scaled to the array so tiny entries do not dominate."""
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


def test_reference_gradient_matches_finite_differences():
    """Guards the float64 reference itself: its analytic gradient against central differences."""
    img, txt = random_pairs(6, e=5, seed=1)
    img, txt = img.astype(np.float64), txt.astype(np.float64)
    t, ls, h = 0.3, 0.1, 1e-6
    _, d_img, d_txt, d_t = reference_loss_and_grads(img, txt, t, ls, 0.5)

    def numeric(array, index):
        plus, minus = array.copy(), array.copy()
        plus[index] += h
        minus[index] -= h
        return plus, minus

    for index in [(0, 0), (2, 3), (5, 4)]:
        plus, minus = numeric(img, index)
        fd = (reference_loss_and_grads(plus, txt, t, ls, 0.5)[0]
              - reference_loss_and_grads(minus, txt, t, ls, 0.5)[0]) / (2 * h)
        assert abs(fd - d_img[index]) < 1e-7
        plus, minus = numeric(txt, index)
        fd = (reference_loss_and_grads(img, plus, t, ls, 0.5)[0]
              - reference_loss_and_grads(img, minus, t, ls, 0.5)[0]) / (2 * h)
        assert abs(fd - d_txt[index]) < 1e-7
    fd = (reference_loss_and_grads(img, txt, t + h, ls, 0.5)[0]
          - reference_loss_and_grads(img, txt, t - h, ls, 0.5)[0]) / (2 * h)
    assert abs(fd - d_t) < 1e-6


# --- sharded == unsharded == float64 reference ---

@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("n_devices,global_batch", [(1, 8), (2, 8), (2, 12), (8, 8), (8, 24)])
def test_sharded_loss_and_grads_match_reference(n_devices, global_batch, label_smoothing):
    img, txt = random_pairs(global_batch, seed=global_batch)
    t = 0.05  # near the paper's learned 1/64 (Sec. 6.1), where logits are large
    loss, d_img, d_txt, d_t = sharded_loss_and_grads(n_devices, img, txt, t,
                                                     label_smoothing=label_smoothing)
    ref_loss, ref_img, ref_txt, ref_t = reference_loss_and_grads(img, txt, t, label_smoothing)
    assert_close(loss, np.full(n_devices, ref_loss))  # the global loss on every device
    assert_close(d_img, ref_img)
    assert_close(d_txt, ref_txt)
    assert_close(d_t, np.full(n_devices, ref_t))


def test_check_vma_false_scales_gradients_by_device_count():
    """Pins the docstring's claim for check_vma=False: same loss, embedding gradients n_devices times
    too large (the old psum transpose), which is why the contract is a pmean of parameter gradients."""
    img, txt = random_pairs(8, seed=8)
    loss, d_img, d_txt, d_t = sharded_loss_and_grads(4, img, txt, 0.1, check_vma=False)
    ref_loss, ref_img, ref_txt, ref_t = reference_loss_and_grads(img, txt, 0.1, 0.1)
    assert_close(loss, np.full(4, ref_loss))
    assert_close(d_img, 4 * ref_img)
    assert_close(d_txt, 4 * ref_txt)
    assert_close(d_t.sum(), 4 * ref_t)  # each device holds 4 x its own share of d loss / d t


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_single_device_loss_and_grads_match_reference(label_smoothing):
    img, txt = random_pairs(10, seed=3)
    t = 1.0  # the paper's initial temperature (Sec. 5)
    loss, grads = jax.value_and_grad(align.contrastive_loss, argnums=(0, 1, 2))(
        img, txt, t, label_smoothing=label_smoothing)
    ref_loss, *ref_grads = reference_loss_and_grads(img, txt, t, label_smoothing)
    assert_close(loss, ref_loss)
    for g, ref in zip(grads, ref_grads):
        assert_close(np.asarray(g), ref)


@pytest.mark.parametrize("n_devices,global_batch,fraction", [
    (1, 16, 0.5),
    (2, 16, 0.25),   # G=4 < B=8: a device holds two groups
    (4, 16, 0.25),   # G=B=4: each device is its own group
    (8, 16, 0.25),   # G=4 > B=2: a group spans two devices
    (8, 32, 0.5),
])
def test_negatives_fraction_sharded_matches_reference(n_devices, global_batch, fraction):
    img, txt = random_pairs(global_batch, seed=7)
    t = 0.1
    loss, d_img, d_txt, d_t = sharded_loss_and_grads(n_devices, img, txt, t, label_smoothing=0.1,
                                                     negatives_fraction=fraction)
    ref_loss, ref_img, ref_txt, ref_t = reference_loss_and_grads(img, txt, t, 0.1, fraction)
    assert_close(loss, np.full(n_devices, ref_loss))
    assert_close(d_img, ref_img)
    assert_close(d_txt, ref_txt)
    assert_close(d_t, np.full(n_devices, ref_t))
    # Fewer negatives is strictly easier than all of them on the same batch.
    assert ref_loss < reference_loss_and_grads(img, txt, t, 0.1)[0]


def test_negatives_fraction_is_the_mean_of_per_group_losses():
    """With G-sized groups, the loss equals the average of the full loss over each group on its own."""
    img, txt = random_pairs(12, seed=11)
    whole = align.contrastive_loss(img, txt, 0.2, negatives_fraction=1 / 3)
    per_group = [align.contrastive_loss(img[i:i + 4], txt[i:i + 4], 0.2) for i in (0, 4, 8)]
    np.testing.assert_allclose(whole, np.mean(per_group), rtol=1e-6)


@pytest.mark.parametrize("fraction", [0.3, 0.0, 1.5])
def test_negatives_fraction_must_split_the_batch(fraction):
    img, txt = random_pairs(16)
    with pytest.raises(ValueError):
        align.contrastive_loss(img, txt, 1.0, negatives_fraction=fraction)


# --- properties with known values ---

def test_invariant_to_permuting_the_pairs():
    img, txt = random_pairs(16, seed=5)
    perm = np.random.default_rng(0).permutation(16)
    np.testing.assert_allclose(align.contrastive_loss(img[perm], txt[perm], 0.07),
                               align.contrastive_loss(img, txt, 0.07), rtol=1e-6)
    # Permuting only one tower breaks the pairs, so the loss must change.
    assert abs(align.contrastive_loss(img[perm], txt, 0.07)
               - align.contrastive_loss(img, txt, 0.07)) > 1.0


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_swapping_the_towers_gives_the_same_loss(fraction):
    """L_i2t(x, y) = L_t2i(y, x), so the symmetric sum cannot tell which tower is which."""
    img, txt = random_pairs(8, seed=6)
    kwargs = dict(label_smoothing=0.1, negatives_fraction=fraction)
    np.testing.assert_allclose(align.contrastive_loss(txt, img, 0.1, **kwargs),
                               align.contrastive_loss(img, txt, 0.1, **kwargs), rtol=1e-6)
    _, metrics = align.contrastive_loss(img, txt, 0.1, with_metrics=True, **kwargs)
    assert metrics["loss_i2t"] != metrics["loss_t2i"]  # the directions themselves differ


def test_aligned_one_hot_embeddings_reach_the_analytic_minimum():
    """x_i = y_i = e_i: cosines 1 on the diagonal, 0 elsewhere. With label smoothing ls the cross-entropy
    is smallest, at the entropy of the smoothed target, when the softmax equals that target, i.e. when
    exp(1 / t) = (1 - ls + ls / N) / (ls / N)."""
    n, ls = 8, 0.1
    eye = np.eye(n, dtype=np.float32)
    p_pos, p_neg = 1 - ls + ls / n, ls / n
    entropy = -p_pos * math.log(p_pos) - (n - 1) * p_neg * math.log(p_neg)
    t_best = 1 / math.log(p_pos / p_neg)
    np.testing.assert_allclose(align.contrastive_loss(eye, eye, t_best, ls), 2 * entropy, rtol=1e-5)
    for t in [t_best / 2, t_best * 0.9, t_best * 1.1, 2 * t_best]:
        assert align.contrastive_loss(eye, eye, t, ls) > 2 * entropy + 1e-4
    # Without smoothing the minimum is 0, approached as the temperature goes to 0.
    assert align.contrastive_loss(eye, eye, 1 / 64, 0.0) < 2 * n * math.exp(-64)
    assert align.contrastive_loss(eye, eye, 0.01, 0.0) < 1e-30


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_identical_embeddings_give_two_log_n(label_smoothing):
    """All logits equal: each direction is a uniform softmax over N, log N whatever the smoothing."""
    n = 12
    same = np.tile(random_pairs(1)[0], (n, 1))
    np.testing.assert_allclose(align.contrastive_loss(same, same, 0.03, label_smoothing),
                               2 * math.log(n), rtol=1e-6)


def test_logits_are_float32_for_bfloat16_inputs():
    img, txt = random_pairs(8, seed=9)
    loss32 = align.contrastive_loss(img, txt, 1 / 64)
    loss16 = align.contrastive_loss(img.astype(jnp.bfloat16), txt.astype(jnp.bfloat16), 1 / 64)
    assert loss16.dtype == jnp.float32
    # Only the inputs' rounding differs (bfloat16 keeps 8 bits), not the softmax.
    np.testing.assert_allclose(loss16, loss32, rtol=0.05)


# --- parity with HF's AlignModel loss ---

def test_twice_hf_align_loss():
    """HF averages the two directions (align_loss), the paper sums them: ours = 2 x theirs, same logits.
    HF hard-codes label smoothing 0.1, the paper's value."""
    torch = pytest.importorskip("torch")
    modeling_align = pytest.importorskip("transformers.models.align.modeling_align")
    img, txt = random_pairs(16, seed=4)
    t = 0.05
    logits_per_text = torch.from_numpy(txt) @ torch.from_numpy(img).T / t  # as in AlignModel.forward
    theirs = modeling_align.align_loss(logits_per_text).item()
    np.testing.assert_allclose(align.contrastive_loss(img, txt, t, 0.1), 2 * theirs, rtol=1e-5)


# --- temperature parametrisation ---

def test_learned_temperature():
    np.testing.assert_allclose(align.learned_temperature(align.learned_temperature_raw(1.0)), 1.0,
                               rtol=1e-6)  # Sec. 5: initialised at 1.0
    for t in [1 / 16, 1 / 64, 1 / 128, 0.9]:
        np.testing.assert_allclose(align.learned_temperature(align.learned_temperature_raw(t)), t,
                                   rtol=1e-5)
    # Positive and bounded below even for a raw value far past where exp underflows.
    assert align.learned_temperature(-1000.0) == np.float32(align.MIN_TEMPERATURE)
    assert np.isnan(align.learned_temperature_raw(align.MIN_TEMPERATURE / 2))
    # The gradient never dies: d t / d raw = t - MIN_TEMPERATURE > 0.
    slope = jax.grad(align.learned_temperature)(align.learned_temperature_raw(1 / 64))
    np.testing.assert_allclose(slope, 1 / 64 - align.MIN_TEMPERATURE, rtol=1e-5)


# --- metrics ---

@pytest.mark.parametrize("n_devices,fraction", [(1, 1.0), (4, 1.0), (4, 0.5)])
def test_metrics_are_global_and_match_numpy(n_devices, fraction):
    n = 16
    img, txt = random_pairs(n, seed=2, noise=1.5)  # noisy enough that some rows are wrong
    t = 0.1

    def step(img_BE, txt_BE):
        loss, metrics = align.contrastive_loss(img_BE, txt_BE, t, axis_name="data", negatives_fraction=fraction,
                                               with_metrics=True)
        return jax.tree.map(lambda v: v[None], (loss, metrics))

    f = jax.shard_map(step, mesh=mesh_of(n_devices), in_specs=(P("data"), P("data")), out_specs=P("data"))
    loss, metrics = jax.tree.map(np.asarray, jax.jit(f)(img, txt))
    assert_close(loss, align.contrastive_loss(img, txt, t, negatives_fraction=fraction))

    g = round(fraction * n)
    group = np.arange(n) // g
    scores = np.where(group[:, None] == group[None, :], img.astype(np.float64) @ txt.T, -np.inf)
    acc_i2t = np.mean(scores.argmax(axis=1) == np.arange(n))
    acc_t2i = np.mean(scores.T.argmax(axis=1) == np.arange(n))
    assert 0 < acc_i2t < 1 and 0 < acc_t2i < 1
    assert_close(loss, np.full(n_devices, reference_loss_and_grads(img, txt, t, 0.1, fraction)[0]))
    for name, value in {"accuracy_i2t": acc_i2t, "accuracy_t2i": acc_t2i}.items():
        assert_close(metrics[name], np.full(n_devices, value))
    assert_close(metrics["loss_i2t"] + metrics["loss_t2i"], loss)


# --- the data-parallel gradient contract (what train.py does) ---

def toy_objective(params, x_img_BD, x_txt_BD, axis_name):
    """A replicated linear 'tower' per modality, L2-normalised, and a learned temperature."""
    def embed(w_DE, x_BD):
        e_BE = x_BD @ w_DE
        return e_BE / jnp.linalg.norm(e_BE, axis=1, keepdims=True)

    return align.contrastive_loss(embed(params["img"], x_img_BD), embed(params["txt"], x_txt_BD),
                                  align.learned_temperature(params["raw_temperature"]),
                                  axis_name=axis_name)


@pytest.mark.parametrize("check_vma", [True, False])
@pytest.mark.parametrize("n_devices", [2, 8])
def test_data_parallel_gradient_contract(n_devices, check_vma):
    """grad inside shard_map, then pmean over `data`, equals the single-device gradient, on every
    device, in both shard_map modes; a psum would give n_devices times it (the classic pitfall)."""
    rng = np.random.default_rng(0)
    n, d, e = 16, 6, 4
    params = {"img": jnp.asarray(rng.normal(size=(d, e)), jnp.float32),
              "txt": jnp.asarray(rng.normal(size=(d, e)), jnp.float32),
              "raw_temperature": align.learned_temperature_raw(0.2)}
    x_img = rng.normal(size=(n, d)).astype(np.float32)
    x_txt = (x_img + 0.5 * rng.normal(size=(n, d))).astype(np.float32)
    ref_loss, ref_grads = jax.value_and_grad(toy_objective)(params, x_img, x_txt, None)

    def train_step(params, x_img_BD, x_txt_BD):
        loss, grads = jax.value_and_grad(toy_objective)(params, x_img_BD, x_txt_BD, "data")
        pmean, psum = jax.lax.pmean(grads, "data"), jax.lax.psum(grads, "data")
        return jax.tree.map(lambda v: v[None], (loss, pmean, psum))

    f = jax.shard_map(train_step, mesh=mesh_of(n_devices), in_specs=(P(), P("data"), P("data")),
                      out_specs=P("data"), check_vma=check_vma)
    loss, pmean, psum = jax.tree.map(np.asarray, jax.jit(f)(params, x_img, x_txt))
    assert_close(loss, np.full(n_devices, ref_loss))
    for name, ref in ref_grads.items():
        ref = np.broadcast_to(np.asarray(ref), pmean[name].shape)  # one copy per device
        assert_close(pmean[name], ref)
        assert_close(psum[name], n_devices * ref)

    # Differentiating outside the shard_map needs no reduction at all.
    def loss_fn(params):
        return jax.shard_map(lambda p, a, b: toy_objective(p, a, b, "data"), mesh=mesh_of(n_devices),
                             in_specs=(P(), P("data"), P("data")), out_specs=P(),
                             check_vma=check_vma)(params, x_img, x_txt)

    outside = jax.jit(jax.grad(loss_fn))(params)
    for name, ref in ref_grads.items():
        assert_close(np.asarray(outside[name]), np.asarray(ref))
