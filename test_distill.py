"""Tests of momentum distillation in the contrastive loss (align.py, `teacher=`, ALBEF Sec. 3.3) and of the
synthetic data's noise knob (synthetic.py, `noise=`): alpha = 0 is the plain loss exactly, a float64 numpy
reference written from ALBEF's targets, a known value (a teacher equal to the student), sharded == unsharded
on 8 simulated CPU devices (conftest.py), and the noisy share of the synthetic captions.
"""
import hashlib
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

import align
from test_align import _relative_error
import synthetic
from test_loss import random_pairs


def student_and_teacher(n, seed):
    """A student and a teacher that is near it (an EMA of recent students), all unit vectors."""
    img, txt = random_pairs(n, seed=seed)
    rng = np.random.default_rng(seed + 100)
    drift = lambda x: x + 0.3 * rng.normal(size=x.shape).astype(np.float32)
    t_img, t_txt = drift(img), drift(txt)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    return img, txt, unit(t_img), unit(t_txt)


# --- a float64 reference from ALBEF's targets (models/model_pretrain.py, `sim_i2t_targets`) ---

def reference_distilled(img, txt, t_img, t_txt, temperature, label_smoothing, alpha, negatives_fraction=1.0):
    """Loss and d loss / d(img, txt, temperature): explicit N x N target matrices, -sum(target * log_softmax).

    Each row's target is (1 - alpha) x ALIGN's smoothed one-hot + alpha x softmax(teacher row), both over the
    row's group of candidates; targets are constants (ALBEF computes them under torch.no_grad()).
    """
    x, y, tx, ty = (a.astype(np.float64) for a in (img, txt, t_img, t_txt))
    t, n = float(temperature), len(x)
    g = round(negatives_fraction * n)
    group_N = np.arange(n) // g
    candidates_NN = group_N[:, None] == group_N[None, :]
    smoothed_NN = (1 - label_smoothing) * np.eye(n) + label_smoothing / g * candidates_NN

    def log_softmax(s_NN):
        z_NN = np.where(candidates_NN, s_NN, -np.inf)
        z_NN = z_NN - z_NN.max(axis=1, keepdims=True)
        return z_NN - np.log(np.exp(z_NN).sum(axis=1, keepdims=True))

    def one_direction(s_NN, teacher_NN):
        target_NN = (1 - alpha) * smoothed_NN + alpha * np.exp(log_softmax(teacher_NN))
        log_p_NN = log_softmax(s_NN)
        loss = -(target_NN * np.where(candidates_NN, log_p_NN, 0.0)).sum() / n
        return loss, (np.exp(log_p_NN) - target_NN) / n  # the target is a constant: softmax minus target

    s_NN, teacher_NN = x @ y.T / t, tx @ ty.T / t  # the teacher divided by the student's temperature
    loss_i2t, d_i2t = one_direction(s_NN, teacher_NN)
    loss_t2i, d_t2i = one_direction(s_NN.T, teacher_NN.T)
    d_s_NN = d_i2t + d_t2i.T
    return loss_i2t + loss_t2i, d_s_NN @ y / t, d_s_NN.T @ x / t, -(d_s_NN * s_NN).sum() / t


def distilled(img, txt, temperature, t_img, t_txt, alpha, **kwargs):
    return align.contrastive_loss(img, txt, temperature, teacher=(t_img, t_txt), distill_alpha=alpha, **kwargs)


value_and_grads = jax.jit(jax.value_and_grad(distilled, argnums=(0, 1, 2)),
                          static_argnames=("label_smoothing", "negatives_fraction"))


@pytest.mark.parametrize("label_smoothing,negatives_fraction", [(0.0, 1.0), (0.1, 1.0), (0.1, 0.5)])
def test_matches_float64_reference_from_albef_targets(label_smoothing, negatives_fraction):
    img, txt, t_img, t_txt = student_and_teacher(12, seed=1)
    t, alpha = 0.1, 0.4  # ALBEF's alpha
    loss, grads = value_and_grads(img, txt, t, t_img, t_txt, alpha, label_smoothing=label_smoothing,
                                  negatives_fraction=negatives_fraction)
    ref_loss, *ref_grads = reference_distilled(img, txt, t_img, t_txt, t, label_smoothing, alpha, negatives_fraction)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for got, ref in zip(grads, ref_grads):  # the gradient of the student only: the targets are constants
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    # Distillation toward a teacher that is not the labels changes the value.
    assert abs(ref_loss - reference_distilled(img, txt, t_img, t_txt, t, label_smoothing, 0.0,
                                              negatives_fraction)[0]) > 1e-2


@pytest.mark.parametrize("negatives_fraction", [1.0, 0.5])
def test_traced_alpha_zero_is_the_plain_loss_exactly(negatives_fraction):
    """alpha = 0 inside jit subtracts an exact zero: loss, gradients and metrics equal the plain ones bit for
    bit (both compiled). A Python 0.0 skips the teacher altogether (same program as no teacher)."""
    img, txt, t_img, t_txt = student_and_teacher(8, seed=2)

    def plain(img, txt, t):
        return align.contrastive_loss(img, txt, t, negatives_fraction=negatives_fraction, with_metrics=True)

    def with_teacher(img, txt, t, alpha):
        return align.contrastive_loss(img, txt, t, negatives_fraction=negatives_fraction, with_metrics=True,
                                      teacher=(t_img, t_txt), distill_alpha=alpha)

    want = jax.jit(jax.value_and_grad(plain, argnums=(0, 1, 2), has_aux=True))(img, txt, 0.07)
    got = jax.jit(jax.value_and_grad(with_teacher, argnums=(0, 1, 2), has_aux=True))(img, txt, 0.07, 0.0)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)
    assert (str(jax.make_jaxpr(lambda a, b: with_teacher(a, b, 0.07, 0.0))(img, txt))
            == str(jax.make_jaxpr(lambda a, b: plain(a, b, 0.07))(img, txt)))
    with pytest.raises(ValueError):  # an alpha without a teacher is a mistake, not the plain loss
        align.contrastive_loss(img, txt, 0.07, distill_alpha=0.4)


@pytest.mark.parametrize("negatives_fraction", [1.0, 0.5])
def test_teacher_equal_to_student_at_alpha_one_gives_the_entropy(negatives_fraction):
    """alpha = 1 and teacher = student: each row's target is the student's own softmax p, so the loss is
    sum_rows H(p) / N per direction, whatever the label smoothing, and the gradient p - p is zero."""
    n, t = 8, 0.2
    img, txt = random_pairs(n, seed=3)

    def self_distilled(img, txt, t):  # the teacher is the student itself, the same traced values
        return distilled(img, txt, t, img, txt, 1.0, negatives_fraction=negatives_fraction)

    loss, grads = jax.jit(jax.value_and_grad(self_distilled, argnums=(0, 1, 2)))(img, txt, t)
    g = round(negatives_fraction * n)
    s = img.astype(np.float64) @ txt.astype(np.float64).T / t
    entropy = 0.0
    for s_NN in (s, s.T):
        for i in range(n):
            z = s_NN[i, i // g * g:(i // g + 1) * g]  # the row's group of candidates
            p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
            entropy += -(p * np.log(p)).sum() / n
    np.testing.assert_allclose(loss, entropy, rtol=1e-6)
    assert entropy < 2 * math.log(g) - 0.1  # not the uniform softmax's value by accident
    for grad in grads:  # the targets carry no gradient, so the student is pulled nowhere
        np.testing.assert_allclose(grad, 0.0, atol=1e-5)


# --- sharded == unsharded ---

@pytest.mark.parametrize("negatives_fraction", [1.0, 0.25])  # 0.25: groups of 4 rows span two devices of 2
def test_sharded_over_8_devices_equals_single_device(negatives_fraction):
    n_devices, n = 8, 16
    img, txt, t_img, t_txt = student_and_teacher(n, seed=4)
    t, alpha = jnp.float32(0.05), jnp.float32(0.4)

    def step(img_BE, txt_BE, t_img_BE, t_txt_BE, t, alpha):
        loss, grads = jax.value_and_grad(align.contrastive_loss, argnums=(0, 1, 2))(
            img_BE, txt_BE, t, axis_name="data", negatives_fraction=negatives_fraction,
            teacher=(t_img_BE, t_txt_BE), distill_alpha=alpha)
        return loss[None], grads[0], grads[1], grads[2][None]

    mesh = Mesh(np.array(jax.devices()[:n_devices]), ("data",))
    f = jax.shard_map(step, mesh=mesh, in_specs=(P("data"),) * 4 + (P(), P()), out_specs=P("data"))
    loss, d_img, d_txt, d_t = jax.jit(f)(img, txt, t_img, t_txt, t, alpha)
    ref_loss, (ref_img, ref_txt, ref_t) = value_and_grads(img, txt, t, t_img, t_txt, alpha,
                                                          label_smoothing=0.1, negatives_fraction=negatives_fraction)
    np.testing.assert_allclose(loss, np.full(n_devices, ref_loss), rtol=1e-5)
    for got, ref in [(d_img, ref_img), (d_txt, ref_txt), (d_t, np.full(n_devices, ref_t))]:
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


# --- the synthetic data's noise knob ---

# sha256 of samples 0..299 of both splits at seed 0 and side 38 (pixels, caption), and of the captions of
# samples 0..1999 of both splits at seed 3, written by synthetic.py before the noise knob existed.
BEFORE_THE_KNOB = {"examples": "393e042a1a08f69cd24e937ff0f8f97b9ecf44dbfd054c594c6a50bc668a4d73",
                   "captions": "527e477b60fe2b7fabca98e6ab8d67d7aaa2c257b0407d540c6bca5b5316ad47"}


@pytest.mark.parametrize("noise", [None, synthetic.NOISE])  # None: the default argument
def test_default_noise_reproduces_the_data_before_the_knob(noise):
    kwargs = {} if noise is None else {"noise": noise}
    examples, captions = hashlib.sha256(), hashlib.sha256()
    for split in (0, 1):
        for i in range(300):
            pixels, caption = synthetic.synthetic_example(0, i, 38, split, **kwargs)
            examples.update(pixels.tobytes() + caption.encode() + b"\n")
        for i in range(2000):
            captions.update(synthetic._synthetic_scene(np.random.default_rng([3, split, i]), **kwargs)[1].encode()
                            + b"\n")
    assert {"examples": examples.hexdigest(), "captions": captions.hexdigest()} == BEFORE_THE_KNOB


def test_noisy_share_follows_the_knob():
    """Over 2000 samples the share of captions that are not the scene's own is the requested noise, within 4
    binomial standard deviations; the images never change, and noise 0 leaves every caption naming shapes."""
    count = 2000
    clean = [synthetic.synthetic_example(0, i, 8, 0, noise=0.0) for i in range(count)]
    assert all(any(s in caption for s in synthetic.SYN_SHAPES) for _, caption in clean)  # no alt-text at all
    noisy_before = np.zeros(count, bool)
    for noise in (0.1, 0.4, 0.7):
        noisy = np.zeros(count, bool)
        for i, (pixels, caption) in enumerate(synthetic.synthetic_example(0, i, 8, 0, noise=noise)
                                              for i in range(count)):
            assert pixels.tobytes() == clean[i][0].tobytes()
            noisy[i] = caption != clean[i][1]
        margin = 4 * math.sqrt(noise * (1 - noise) / count)
        assert abs(noisy.mean() - noise) < margin, (noise, noisy.mean())
        assert (noisy | ~noisy_before).all()  # noisy at a lower noise stays noisy at a higher one
        noisy_before = noisy
    with pytest.raises(ValueError):
        synthetic.synthetic_example(0, 0, 8, 0, noise=1.5)


# --- train.py: the moving average, the distilled step, resume ---

TINY = ["--size", "tiny", "--image-stages", "4", "--image-size", "32", "--batch-size", "16", "--workers", "0",
        "--log-every", "1", "--skip-final-eval"]  # --image-stages: see test_train.TINY


def _train(out, *flags):
    import train
    assert train.main(TINY + ["--out", str(out), *flags]) == 0
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return np.array([json.loads(line)["loss"] for line in f])


def test_distilled_run_keeps_the_moving_average_resumes_exactly_and_starts_as_the_plain_loss(tmp_path):
    """--momentum-distill 0.4 --ema-momentum 0.5, checkpointed every step:
    - after each step the checkpoint's ema/ is 0.5 x the previous average plus 0.5 x the new weights,
      starting from a copy of the initial weights;
    - the distillation weight ramps from 0 at step 0, so the first loss is the plain run's bit for bit;
    - a run stopped after 2 steps resumes to the uninterrupted run's losses and moving average, its
      momentum model restored from the checkpoint.
    The warm-up is test_train.py's (100 steps), so that the plain run reuses their compiled step."""
    flags = ["--steps", "4", "--warmup-steps", "100", "--momentum-distill", "0.4", "--ema-momentum", "0.5",
             "--ckpt-every", "1", "--keep", "5"]
    straight = _train(tmp_path / "straight", *flags)
    out = tmp_path / "straight"
    (p1, s1, cfg), (p2, s2, _) = [align.load(str(out / f"ckpt_{k:09d}")) for k in (1, 2)]
    (e1, es1, _), (e2, es2, _) = [align.load(str(out / f"ckpt_{k:09d}" / "ema")) for k in (1, 2)]
    p0, s0 = jax.device_get(align.init(jax.random.key(0), cfg))
    half = lambda a, b: jax.tree.map(lambda x, y: 0.5 * np.float64(x) + 0.5 * np.float64(y), a, b)
    assert _relative_error((e1, es1), half((p0, s0), (p1, s1))) < 1e-6
    assert _relative_error((e2, es2), half((e1, es1), (p2, s2))) < 1e-6
    assert _relative_error(e2, p2) > 1e-5  # the average lags the weights (6.7e-5 at these small first steps)
    plain = _train(tmp_path / "plain", "--steps", "1", "--warmup-steps", "100")
    assert straight[0] == plain[0]
    assert not np.allclose(straight[1:], _train(tmp_path / "plain", "--steps", "4", "--warmup-steps", "100")[1:],
                           rtol=1e-6, atol=0)  # the momentum model's targets change the loss from step 1
    _train(tmp_path / "resumed", *flags, "--stop-after", "2")
    resumed = _train(tmp_path / "resumed", *flags)
    np.testing.assert_allclose(resumed, straight, rtol=1e-6)
    a = align.load(str(tmp_path / "resumed" / "ckpt_000000004" / "ema"))[0]
    b = align.load(str(out / "ckpt_000000004" / "ema"))[0]
    assert _relative_error(a, b) < 1e-6
