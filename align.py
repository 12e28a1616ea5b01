"""ALIGN (Jia et al., ICML 2021): the contrastive loss of Sec. 4.1, Eq. 1-2, on one device or sharded.

Image and text embeddings, already L2-normalised, are scored against each other with a shared learned
temperature; each image must pick out its own caption among all the texts of the batch (Eq. 1) and each
text its own image (Eq. 2). The paper gathers the embeddings of all cores (Sec. 4.1: "we concatenate
embeddings from all computing cores"; Sec. 5: 16 pairs per core x 1024 cores = 16384 pairs), so with
`axis_name` the loss runs inside `jax.shard_map` over a `data` mesh axis: each device all-gathers both
embeddings and scores its own B rows against all N columns, in both directions.

Dimension key:
  B  pairs on this device (the local batch; the whole batch when unsharded)
  N  pairs in the global batch, the candidates a row is scored against (B x number of devices)
  E  embedding width
  G  candidates per row when only a fraction of in-batch negatives is used (Table 8): negatives_fraction x N

Deviations from the paper and from HF's `AlignModel`:
  - The loss is L_i2t + L_t2i, the sum of Eq. 1 and 2, as the paper writes it; HF's `align_loss` averages
    the two, so its loss (and every gradient) is half of ours.
  - Table 8's "50% / 25% in-batch negatives" is not defined further in the paper. Here each pair's
    candidates are the contiguous group of G = fraction x N pairs holding it (global order, that is
    device-major), which is "gather from only a group of devices" when G is a multiple of B.
  - The learned temperature is exp(raw) + 1/1024 (`learned_temperature`), positive by construction;
    the paper and HF learn the temperature itself, unconstrained.
  - The logits matmul runs at float32 HIGHEST precision (no bfloat16 passes on TPU, no TF32 on GPU),
    because dividing by a temperature near 1/64 amplifies the rounding of the cosines 64 times.
"""
import jax
import jax.numpy as jnp

# The smallest temperature `learned_temperature` can produce. It never binds in the paper's runs (the
# learned value converges near 1/64, Sec. 6.1; the smallest fixed one in Table 8 is 1/128), but it stops
# a run without label smoothing, where a perfectly separated batch pays less and less as the temperature
# shrinks, from driving logits toward float32 overflow.
MIN_TEMPERATURE = 1.0 / 1024


def learned_temperature(raw):
    """The softmax temperature from its unconstrained parameter: MIN_TEMPERATURE + exp(raw), always positive.

    Learning the logarithm makes the step size relative to the temperature, so an optimizer moves 1.0
    (the paper's initial value, Sec. 5) and 1/64 (where it converges, Sec. 6.1) at the same pace; learning
    the temperature itself, an Adam step of 1e-3 is 6% of 1/64, and a few dozen of them cross zero.
    """
    return MIN_TEMPERATURE + jnp.exp(jnp.asarray(raw, jnp.float32))


def learned_temperature_raw(temperature):
    """Inverse of `learned_temperature`: the raw parameter for a temperature (NaN below MIN_TEMPERATURE).

    `learned_temperature_raw(1.0)` initialises as the paper does (Sec. 5). HF's `AlignModel.temperature`
    is the temperature itself (logits = cosine / temperature), so importing it is
    `learned_temperature_raw(hf_model.temperature.item())`.
    """
    return jnp.log(jnp.asarray(temperature, jnp.float32) - MIN_TEMPERATURE)


def _logits(img_BE, txt_BE, temperature, axis_name):
    """This device's rows against all N columns, both directions, and the column of each row's positive."""
    # Softmax and loss in float32 whatever the towers' compute dtype; the embeddings are unit vectors.
    img_BE = img_BE.astype(jnp.float32)
    txt_BE = txt_BE.astype(jnp.float32)
    temperature = jnp.asarray(temperature, jnp.float32)
    if axis_name is None:
        img_NE, txt_NE, offset = img_BE, txt_BE, 0
    else:
        # Sec. 4.1: concatenate the embeddings of all cores. all_gather is differentiable (its transpose
        # is a reduce-scatter), so each device's embeddings also get the gradient of being other devices'
        # negatives. Only B x N logits per direction live on a device, never N x N.
        img_NE = jax.lax.all_gather(img_BE, axis_name, tiled=True)
        txt_NE = jax.lax.all_gather(txt_BE, axis_name, tiled=True)
        offset = jax.lax.axis_index(axis_name) * img_BE.shape[0]
    hi = jax.lax.Precision.HIGHEST
    logits_i2t_BN = jnp.einsum("be,ne->bn", img_BE, txt_NE, precision=hi) / temperature
    logits_t2i_BN = jnp.einsum("be,ne->bn", txt_BE, img_NE, precision=hi) / temperature
    labels_B = offset + jnp.arange(img_BE.shape[0])
    return logits_i2t_BN, logits_t2i_BN, labels_B


def _candidates_BN(labels_B, n, negatives_fraction):
    """Which columns each row is scored against: all N, or its contiguous group of G (Table 8 rows 5-6)."""
    if negatives_fraction == 1.0:
        return None
    g = round(negatives_fraction * n)
    if not (0 < negatives_fraction < 1 and abs(g - negatives_fraction * n) < 1e-6 and n % g == 0):
        raise ValueError(f"negatives_fraction={negatives_fraction} must split the global batch of "
                         f"{n} into equal groups")
    return (labels_B[:, None] // g) == (jnp.arange(n)[None, :] // g)


def _cross_entropy_B(logits_BN, labels_B, label_smoothing, candidates_BN):
    """Softmax cross-entropy of each row against its positive, with label smoothing over its candidates.

    The smoothed target, as in optax, PyTorch and HF, is (1 - ls) on the positive plus ls / K on each
    of the row's K candidates, so the cross-entropy is logsumexp(z) - (1 - ls) z_pos - ls mean(z).
    """
    if candidates_BN is None:
        num_candidates = logits_BN.shape[1]
        masked_BN, zeroed_BN = logits_BN, logits_BN
    else:
        num_candidates = candidates_BN.sum(axis=1)
        masked_BN = jnp.where(candidates_BN, logits_BN, -jnp.inf)
        zeroed_BN = jnp.where(candidates_BN, logits_BN, 0.0)
    positive_B = jnp.take_along_axis(logits_BN, labels_B[:, None], axis=1)[:, 0]
    return (jax.nn.logsumexp(masked_BN, axis=1) - (1 - label_smoothing) * positive_B
            - label_smoothing * zeroed_BN.sum(axis=1) / num_candidates)


def contrastive_loss(img_BE, txt_BE, temperature, label_smoothing=0.1, axis_name=None,
                     negatives_fraction=1.0):
    """Symmetric normalized softmax loss, ALIGN Sec. 4.1, Eq. 1-2: L = L_i2t + L_t2i, a float32 scalar.

    img_BE, txt_BE: L2-normalised embeddings of B image-text pairs (row i of each is a pair). Without
      `axis_name`, B = N is the whole batch. With it, the call must sit inside `jax.shard_map` and they
      are this device's shard of the global batch, in device order along `axis_name`.
    temperature: positive scalar shared by both directions (Sec. 5), e.g. `learned_temperature(raw)`.
      For the fixed temperatures of Table 8 (1/128, 1/64, 1/32) pass a Python float.
    label_smoothing: 0.1 in the paper (Sec. 5).
    axis_name: the mesh axis the batch is sharded over. Returns the global loss, the same on every device.
    negatives_fraction: Table 8 rows 5-6 (1.0, 0.5, 0.25): each pair is scored only against the
      contiguous group of fraction x N pairs of the global batch that holds it.

    Gradient contract for a data-parallel step (parameters replicated, batch sharded, `jax.grad` of this
    value taken inside the shard_map): reduce parameter gradients with `jax.lax.pmean(grads, axis_name)`,
    never `psum` (which gives N_devices times the true gradient). The result is then exactly the
    gradient of the single-device loss on the global batch, in both shard_map modes:
      - check_vma=True (the default): the returned loss is device-invariant, so JAX transposes the psum
        below into a plain broadcast and the implicit broadcast of replicated parameters into a psum;
        gradients of replicated parameters come out already summed over devices and identical on every
        device, and the pmean is a no-op. Gradients with respect to this device's embeddings are exact.
      - check_vma=False: the psum transposes into another psum, so every gradient inside the shard_map
        is scaled by N_devices: embedding gradients are N_devices times the true ones, and gradients of
        replicated parameters N_devices times this device's partial sum, which the pmean turns into the
        total.
    Differentiating outside the shard_map (jax.grad of a shard_map'd function that returns this loss
    with out_specs=P()) is exact in both modes and needs no reduction.
    """
    logits_i2t_BN, logits_t2i_BN, labels_B = _logits(img_BE, txt_BE, temperature, axis_name)
    n = logits_i2t_BN.shape[1]
    candidates_BN = _candidates_BN(labels_B, n, negatives_fraction)
    # Eq. 1 and 2 are means over the N pairs of the global batch. This device holds B of them, so it
    # adds its own rows and divides by N; the psum adds the other devices' rows.
    loss_i2t = _cross_entropy_B(logits_i2t_BN, labels_B, label_smoothing, candidates_BN).sum() / n
    loss_t2i = _cross_entropy_B(logits_t2i_BN, labels_B, label_smoothing, candidates_BN).sum() / n
    # The paper sums the two directions (Eq. 1 + Eq. 2); HF's AlignModel averages them (half our value).
    loss = loss_i2t + loss_t2i
    return loss if axis_name is None else jax.lax.psum(loss, axis_name)


def loss_and_metrics(img_BE, txt_BE, temperature, label_smoothing=0.1, axis_name=None,
                     negatives_fraction=1.0, img_norm_B=None, txt_norm_B=None):
    """`contrastive_loss` and what a training step logs: (loss, metrics), every value global and float32.

    metrics: loss, loss_i2t, loss_t2i (Eq. 1, 2); accuracy_i2t, accuracy_t2i, the fraction of the N
    images (texts) whose top-scoring candidate is their own text (image), per direction as big_vision
    logs it; temperature; img_norm, txt_norm, the mean norm of `img_norm_B` / `txt_norm_B`, the towers'
    embeddings before L2-normalisation when the caller passes them, else of the given embeddings
    (then 1.0 unless they were not normalised). Same arguments and gradient contract as `contrastive_loss`.
    """
    logits_i2t_BN, logits_t2i_BN, labels_B = _logits(img_BE, txt_BE, temperature, axis_name)
    n = logits_i2t_BN.shape[1]
    candidates_BN = _candidates_BN(labels_B, n, negatives_fraction)

    def global_mean(x_B):
        total = x_B.astype(jnp.float32).sum()
        return (total if axis_name is None else jax.lax.psum(total, axis_name)) / n

    def accuracy(logits_BN):
        if candidates_BN is not None:
            logits_BN = jnp.where(candidates_BN, logits_BN, -jnp.inf)
        return global_mean(jnp.argmax(logits_BN, axis=1) == labels_B)

    if img_norm_B is None:
        img_norm_B = jnp.linalg.norm(img_BE.astype(jnp.float32), axis=1)
    if txt_norm_B is None:
        txt_norm_B = jnp.linalg.norm(txt_BE.astype(jnp.float32), axis=1)
    loss_i2t = global_mean(_cross_entropy_B(logits_i2t_BN, labels_B, label_smoothing, candidates_BN))
    loss_t2i = global_mean(_cross_entropy_B(logits_t2i_BN, labels_B, label_smoothing, candidates_BN))
    loss = loss_i2t + loss_t2i  # Eq. 1 + Eq. 2, summed as in the paper (see contrastive_loss).
    metrics = {
        "loss": loss,
        "loss_i2t": loss_i2t,
        "loss_t2i": loss_t2i,
        "accuracy_i2t": accuracy(logits_i2t_BN),
        "accuracy_t2i": accuracy(logits_t2i_BN),
        "temperature": jnp.asarray(temperature, jnp.float32),
        "img_norm": global_mean(img_norm_B),
        "txt_norm": global_mean(txt_norm_B),
    }
    return loss, metrics


# ---------------------------------------------------------------------------------------------------
# Dual encoder (Sec. 4): SIZES, init, embed_images / embed_texts, from_hf. Added separately; the
# learned temperature parameter lives there and goes through `learned_temperature`.
# ---------------------------------------------------------------------------------------------------
