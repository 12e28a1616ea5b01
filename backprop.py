"""The backward passes written by hand: EfficientNet's BatchNorm and its depthwise convolution.

Both layers are run as written in the forward pass; their gradients are given to JAX with
`jax.custom_vjp`, because autodiff's are slow or large on these two layers (BENCHMARKS.md):

- `normalise_batch`: BatchNorm in training, the textbook gradient (Ioffe & Szegedy 2015, Sec. 3) from
  x alone, with the activation after it recomputed. Autodiff keeps three more full-size arrays per
  BatchNorm (B7 + BERT-Base at 16 pairs: 26.3 -> 17.1 GiB planned).
- `shifted_sum`: the depthwise convolution as K*K shifted, per-channel multiply-adds, which is how it
  runs on CPU (`efficientnet.Config.depthwise`; XLA:CPU's grouped convolution is 3-12x slower there).
  Its input gradient is the same shifted sum over g; its weight gradient, `tap_gradients`, sums each
  tap over groups of rows so that they stay in cache.

Both are correct inside `jax.shard_map` too: a replicated parameter's gradient is summed over the
devices that used it (`_summed_over_copies`), as autodiff would. efficientnet.py holds what these
layers mean (running statistics, padding, when each form is used); this file holds only the maths.
Tests: test_align.py, against autodiff of the same forward pass and XLA's grouped convolution.

Dimension key: B batch   H height   W width   C channels   K kernel size
"""

import jax
import jax.numpy as jnp


# Inside shard_map, what both backward passes need: which values differ from device to device.


def _varying_axes(x):
    """The mesh axes along which x differs from device to device, inside shard_map (else none).

    JAX has no public accessor for this part of a value's type (jax.typeof(x)): JAX >= 0.9 keeps it in
    `manual_axis_type.varying`, older versions in `vma`. Where neither exists (check_vma=False, or outside
    shard_map) nothing varies, and `_summed_over_copies` sums nothing, which is what that mode needs.
    """
    t = jax.typeof(x)
    mat = getattr(t, "manual_axis_type", None)
    return frozenset(mat.varying if mat is not None else getattr(t, "vma", ()))


def _summed_over_copies(ct, primal):
    """A parameter's cotangent summed over the mesh axes where the parameter is one replicated copy.

    Inside shard_map a replicated parameter meeting per-device data is implicitly broadcast, and
    autodiff transposes that broadcast to a psum; a custom backward pass must do the same.
    """
    axes = tuple(sorted(_varying_axes(ct) - _varying_axes(primal)))
    return jax.lax.psum(ct, axes) if axes else ct


def normalise_batch_plain(x_BHWC, scale_C, bias_C, eps, axis_name, act):
    """act((x - batch mean) / batch std * scale + bias), and the batch's (mean, biased variance)."""
    mean_C = jnp.mean(x_BHWC, axis=(0, 1, 2))
    if axis_name is not None:
        mean_C = jax.lax.pmean(mean_C, axis_name)
    var_C = jnp.mean(jnp.square(x_BHWC - mean_C), axis=(0, 1, 2))
    if axis_name is not None:
        var_C = jax.lax.pmean(var_C, axis_name)
    y = (x_BHWC - mean_C) * jax.lax.rsqrt(var_C + eps) * scale_C + bias_C
    return (y if act is None else act(y)), mean_C, var_C


# The forward pass as written; the backward pass by hand (below). The statistics it also returns are
# for the running averages and get no gradient.
normalise_batch = jax.custom_vjp(normalise_batch_plain, nondiff_argnums=(3, 4, 5))


def _normalise_batch_fwd(x_BHWC, scale_C, bias_C, eps, axis_name, act):
    y, mean_C, var_C = normalise_batch_plain(x_BHWC, scale_C, bias_C, eps, axis_name, act)
    return (y, mean_C, var_C), (x_BHWC, scale_C, bias_C, mean_C, jax.lax.rsqrt(var_C + eps))


def _normalise_batch_bwd(eps, axis_name, act, saved, cotangents):
    """The textbook BatchNorm gradient (Ioffe & Szegedy 2015, Sec. 3), from x alone.

    dx = scale / std * (g - mean(g) - x_hat * mean(g * x_hat)), with the means over the batch (and
    over `axis_name`). Autodiff instead saves x - mean as a residual and makes more passes over
    the activations: this form is one reduction and one elementwise pass (BENCHMARKS.md).
    The activation's gradient is taken here too, from its input recomputed from x: autodiff would
    save that input and the activation's own intermediates (swish: three more full-size arrays per
    BatchNorm). B7 + BERT-Base's planned step at 16 pairs without remat: 26.3 -> 17.1 GiB (BENCHMARKS.md).
    """
    x_BHWC, scale_C, bias_C, mean_C, rstd_C = saved
    g_BHWC = cotangents[0]
    x_hat = (x_BHWC - mean_C) * rstd_C
    if act is not None:
        g_BHWC = jax.vjp(act, x_hat * scale_C + bias_C)[1](g_BHWC)[0]
    dbias_C = jnp.sum(g_BHWC, axis=(0, 1, 2))
    dscale_C = jnp.sum(g_BHWC * x_hat, axis=(0, 1, 2))
    n = x_BHWC.shape[0] * x_BHWC.shape[1] * x_BHWC.shape[2]
    mean_g_C, mean_gx_C = dbias_C / n, dscale_C / n
    if axis_name is not None:
        mean_g_C, mean_gx_C = jax.lax.pmean((mean_g_C, mean_gx_C), axis_name)
    dx = scale_C * rstd_C * (g_BHWC - mean_g_C - x_hat * mean_gx_C)
    return dx, _summed_over_copies(dscale_C, scale_C), _summed_over_copies(dbias_C, bias_C)


normalise_batch.defvjp(_normalise_batch_fwd, _normalise_batch_bwd)


def _tap(xp_BHWC, i, j, stride, H_out, W_out):
    """The padded input seen by kernel tap (i, j): rows i, i+stride, ..., H_out of them; likewise columns."""
    size = (xp_BHWC.shape[0], stride * (H_out - 1) + 1, stride * (W_out - 1) + 1, xp_BHWC.shape[3])
    return jax.lax.dynamic_slice(xp_BHWC, (0, i, j, 0), size)[:, ::stride, ::stride]


def taps_sum(xp_BHWC, w_KKC, stride):
    """sum over taps (i, j) of tap(i, j) * w[i, j]: a depthwise convolution of the already padded input."""
    K = w_KKC.shape[0]
    H_out, W_out = (xp_BHWC.shape[1] - K) // stride + 1, (xp_BHWC.shape[2] - K) // stride + 1
    return sum(_tap(xp_BHWC, i, j, stride, H_out, W_out) * w_KKC[i, j] for i in range(K) for j in range(K))


# The forward pass as written; the backward pass by hand (below).
shifted_sum = jax.custom_vjp(taps_sum, nondiff_argnums=(2,))


def _shifted_sum_fwd(xp_BHWC, w_KKC, stride):
    return taps_sum(xp_BHWC, w_KKC, stride), (xp_BHWC, w_KKC)


def _shifted_sum_bwd(stride, saved, g_BHWC):
    """Both gradients by hand, each 4-10x faster on XLA:CPU than autodiff's (BENCHMARKS.md).

    Input: the transposed convolution, written as the forward pass itself: g spread out by the stride
    (zeros between its rows and columns), padded by K-1, convolved with the kernel turned by 180
    degrees. Autodiff instead adds K*K padded copies of g*w, which XLA:CPU does not vectorise
    (2x73x73x144, 5x5, stride 2: 19.4 -> 2.5 ms).
    Weight: K*K sums of tap(i, j) * g over batch and space (`tap_gradients`): on maps of 16 rows or
    more, a group of rows of one sample at a time, every tap summed over the group's rows as one
    elementwise expression (B7's layers: 440 -> 225 ms); on smaller maps one tap at a time in `lax.map`.
    """
    xp_BHWC, w_KKC = saved
    # g is read once per tap. Left unmaterialised, XLA fuses its producer (BatchNorm's backward pass)
    # into each reader and computes it K*K times.
    g_BHWC = jax.lax.optimization_barrier(g_BHWC)
    K, (_, H_in, W_in, _), (_, H_out, W_out, _) = w_KKC.shape[0], xp_BHWC.shape, g_BHWC.shape
    spread = [(0, 0, 0), (K - 1, H_in - stride * (H_out - 1) - 1, stride - 1),
              (K - 1, W_in - stride * (W_out - 1) - 1, stride - 1), (0, 0, 0)]
    dx = taps_sum(jax.lax.pad(g_BHWC, jnp.zeros((), g_BHWC.dtype), spread), w_KKC[::-1, ::-1], 1)

    dw = tap_gradients(xp_BHWC, g_BHWC, K, stride).reshape(w_KKC.shape).astype(w_KKC.dtype)
    return dx, _summed_over_copies(dw, w_KKC)


shifted_sum.defvjp(_shifted_sum_fwd, _shifted_sum_bwd)


# Output rows per group of the weight gradient (`tap_gradients`), and the fewest for which groups are
# used. At least 16 because every tap's sum reads each of the group's rows once, and XLA:CPU fuses a
# producer into a reader that reads it at most 15 times: at 16 or more the group is copied out of g and
# x once, not re-sliced inside each tap's loop (5x slower at 8 rows; BENCHMARKS.md).
GROUP_ROWS, MIN_GROUP_ROWS = 24, 16


def tap_gradients(xp_BHWC, g_BHWC, K, stride):
    """[K*K, C]: for each tap (i, j), the sum over batch and space of tap(i, j) * g, in float32.

    Maps of 16 rows or more: one group of output rows of one sample at a time (`fori_loop`), so that
    the group's g and x stay in cache while all K*K taps read them. Within a group each tap's sum over
    the rows is one elementwise expression (an XLA loop fusion, as the forward pass) that keeps the
    columns; the [K*K, W, C] total is summed over columns at the end. A sample's last group starts
    early enough to fit, and the rows it shares with the group before are masked out.
    Smaller maps: the taps one by one over the whole batch (`lax.map`: written out, XLA:CPU
    materialises all K*K taps at once), each a product reduced over batch and space.
    """
    B, H_out, W_out, C = g_BHWC.shape
    if H_out < MIN_GROUP_ROWS:
        taps = jnp.array([(i, j) for i in range(K) for j in range(K)], jnp.int32)
        g32_BHWC = g_BHWC.astype(jnp.float32)  # once, not in every tap's step of the map
        tap = lambda ij: _tap(xp_BHWC, ij[0], ij[1], stride, H_out, W_out).astype(jnp.float32)
        return jax.lax.map(lambda ij: jnp.sum(tap(ij) * g32_BHWC, axis=(0, 1, 2)), taps)
    rows = min(H_out, GROUP_ROWS)
    per_sample, rows_in = -(-H_out // rows), stride * (rows - 1) + K

    def group(n, total_TWC):
        b, r = n // per_sample, n % per_sample
        start = jnp.minimum(r * rows, H_out - rows)
        new_rows = (start + jnp.arange(rows) >= r * rows)[:, None, None]
        g_HWC = jax.lax.dynamic_slice(g_BHWC, (b, start, 0, 0), (1, rows, W_out, C))[0]
        g_HWC = g_HWC.astype(jnp.float32) * new_rows
        x_HWC = jax.lax.dynamic_slice(xp_BHWC, (b, start * stride, 0, 0), (1, rows_in, xp_BHWC.shape[2], C))[0]
        tap_row = lambda i, j, t: x_HWC[stride * t + i, j:j + stride * (W_out - 1) + 1:stride].astype(jnp.float32)
        return total_TWC + jnp.stack([sum(tap_row(i, j, t) * g_HWC[t] for t in range(rows))
                                      for i in range(K) for j in range(K)])

    zeros = jnp.zeros((K * K, W_out, C), jnp.float32)
    varying = tuple(sorted(_varying_axes(g_BHWC)))  # inside shard_map the sums differ from device to device
    if varying:
        zeros = jax.lax.pcast(zeros, varying, to="varying")
    return jax.lax.fori_loop(0, B * per_sample, group, zeros).sum(axis=1)
