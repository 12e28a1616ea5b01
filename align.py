"""ALIGN (Jia et al., ICML 2021): the dual encoder of Sec. 4.1 and its contrastive loss, Eq. 1-2.

Two towers map into one embedding space: EfficientNet's globally pooled features (efficientnet.py) and
BERT's [CLS] state (bert.py), each through a linear layer to the embedding width (the image one only
when the widths differ, Sec. 6.1), then L2-normalised. Image and text embeddings are scored against
each other with a shared learned temperature; each image must pick out its own caption among all the
texts of the batch (Eq. 1) and each text its own image (Eq. 2). The paper gathers the embeddings of
all cores (Sec. 4.1: "we concatenate embeddings from all computing cores"; Sec. 5: 16 pairs per core
x 1024 cores = 16384 pairs), so with `axis_name` the loss runs inside `jax.shard_map` over a `data`
mesh axis: each device all-gathers both embeddings and scores its own B rows against all N columns.

    params, state = init(jax.random.key(0), SIZES['B7'])
    img_BE = embed_images(params, state, pixels_BHWC, SIZES['B7'])
    txt_BE = embed_texts(params, ids_BL, mask_BL, SIZES['B7'])
    loss = contrastive_loss(img_BE, txt_BE, temperature(params, SIZES['B7']))

Command line:
  python align.py [--vocab-size N]                      the size table (Sec. 5, 6.1, Table 8-9)
  python align.py export --checkpoint RUN --out DIR     a checkpoint as an HF directory that AlignModel and
                                                        AlignProcessor load (weights, tokenizer, preprocessing)

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
  - HF's AlignModel is only representable when embed_dim equals the image features (it has no image
    projection); `to_hf` writes our "SAME"-padded models for an even image size (see `to_hf`), so
    `export_hf` of a model trained at 289 gives HF the crop side 288.
  - The logits matmul runs at float32 HIGHEST precision (no bfloat16 passes on TPU, no TF32 on GPU),
    because dividing by a temperature near 1/64 amplifies the rounding of the cosines 64 times.
  - Not in ALIGN: `contrastive_loss(..., teacher=, distill_alpha=)`, momentum distillation for noisy
    alt-text from ALBEF (Li et al., NeurIPS 2021, Sec. 3.3). Unlike ALBEF the teacher is scored against the
    same gathered in-batch candidates as the student (no queue of 65,536 momentum features), and its
    targets are mixed with ALIGN's label-smoothed ones rather than a plain one-hot.
"""
import argparse
import dataclasses
import functools
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

import bert
import data
import efficientnet as en
import weights
import wordpiece

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


def _cross_entropy_B(logits_BN, labels_B, label_smoothing, candidates_BN, teacher_logits_BN=None, alpha=0.0):
    """Softmax cross-entropy of each row against its positive, with label smoothing over its candidates.

    The smoothed target, as in optax, PyTorch and HF, is (1 - ls) on the positive plus ls / K on each
    of the row's K candidates, so the cross-entropy is logsumexp(z) - (1 - ls) z_pos - ls mean(z).

    With `teacher_logits_BN` (momentum distillation, ALBEF Sec. 3.3) the target is (1 - alpha) x that plus
    alpha x q, q the softmax of the teacher's logits over the same K candidates. Cross-entropy is linear in
    its target, so this is the plain cross-entropy minus alpha (q . z - smoothed . z): alpha = 0, even
    traced, subtracts an exact zero and leaves the plain value's bits.
    """
    if candidates_BN is None:
        num_candidates = logits_BN.shape[1]
        masked_BN, zeroed_BN = logits_BN, logits_BN
    else:
        num_candidates = candidates_BN.sum(axis=1)
        masked_BN = jnp.where(candidates_BN, logits_BN, -jnp.inf)
        zeroed_BN = jnp.where(candidates_BN, logits_BN, 0.0)
    positive_B = jnp.take_along_axis(logits_BN, labels_B[:, None], axis=1)[:, 0]
    cross_entropy_B = (jax.nn.logsumexp(masked_BN, axis=1) - (1 - label_smoothing) * positive_B
                       - label_smoothing * zeroed_BN.sum(axis=1) / num_candidates)
    if teacher_logits_BN is None:
        return cross_entropy_B
    if candidates_BN is not None:
        teacher_logits_BN = jnp.where(candidates_BN, teacher_logits_BN, -jnp.inf)
    teacher_BN = jax.nn.softmax(teacher_logits_BN, axis=1)  # exactly 0 off the candidates
    smoothed_dot_B = (1 - label_smoothing) * positive_B + label_smoothing * zeroed_BN.sum(axis=1) / num_candidates
    return cross_entropy_B - alpha * ((teacher_BN * zeroed_BN).sum(axis=1) - smoothed_dot_B)


def contrastive_loss(img_BE, txt_BE, temperature, label_smoothing=0.1, axis_name=None,
                     negatives_fraction=1.0, with_metrics=False, teacher=None, distill_alpha=0.0):
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
    with_metrics: return (loss, metrics) instead, metrics being what a training step logs, every value
      global: loss_i2t, loss_t2i (Eq. 1, 2) and accuracy_i2t, accuracy_t2i, the fraction of the N images
      (texts) whose top-scoring candidate is their own text (image), per direction as big_vision logs it.
    teacher, distill_alpha: momentum distillation (not in ALIGN; ALBEF, Li et al. NeurIPS 2021, Sec. 3.3,
      L_itc^mod; ../shared/paper/albef_notes.md). `teacher` is (img_BE, txt_BE) of the momentum (EMA)
      model, L2-normalised, sharded like the student's; each row's target becomes (1 - distill_alpha) x the
      label-smoothed one-hot plus distill_alpha x the softmax of the teacher's logits over the row's
      candidates, in both directions, as in ALBEF's code (models/model_pretrain.py, `sim_i2t_targets`;
      ALBEF's alpha is 0.4, ramped up over the first epoch, and the EMA momentum 0.995). The teacher's
      logits are gathered like the student's and divided by the student's temperature, as ALBEF divides
      both by `self.temp`; targets carry no gradient, not even to the temperature. The value is ALBEF's
      code's cross-entropy form; the paper's equation writes the distillation term as a KL divergence,
      which is smaller by distill_alpha x the teacher's entropy, a constant with the same gradients.
      distill_alpha may be traced (a schedule); a Python 0.0, or teacher=None, is the plain loss.

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
    teacher_i2t_BN = teacher_t2i_BN = None
    no_distillation = isinstance(distill_alpha, (int, float)) and distill_alpha == 0  # the plain program
    if teacher is None and not no_distillation:
        raise ValueError(f"distill_alpha={distill_alpha} needs a teacher's embeddings")
    if teacher is not None and not no_distillation:
        # ALBEF's pseudo-targets: the teacher's logits, laid out as the student's, with no gradient to the
        # teacher's embeddings nor to the temperature (ALBEF computes them under torch.no_grad()).
        teacher_i2t_BN, teacher_t2i_BN, _ = jax.lax.stop_gradient(_logits(*teacher, temperature, axis_name))
        distill_alpha = jnp.asarray(distill_alpha, jnp.float32)

    def global_mean(x_B):
        # Eq. 1 and 2 are means over the N pairs of the global batch. This device holds B of them, so it
        # adds its own rows and divides by N; the psum adds the other devices' rows.
        total = x_B.astype(jnp.float32).sum()
        return (total if axis_name is None else jax.lax.psum(total, axis_name)) / n

    loss_i2t = global_mean(_cross_entropy_B(logits_i2t_BN, labels_B, label_smoothing, candidates_BN,
                                            teacher_i2t_BN, distill_alpha))
    loss_t2i = global_mean(_cross_entropy_B(logits_t2i_BN, labels_B, label_smoothing, candidates_BN,
                                            teacher_t2i_BN, distill_alpha))
    # The paper sums the two directions (Eq. 1 + Eq. 2); HF's AlignModel averages them (half our value).
    loss = loss_i2t + loss_t2i
    if not with_metrics:
        return loss

    def accuracy(logits_BN):
        if candidates_BN is not None:
            logits_BN = jnp.where(candidates_BN, logits_BN, -jnp.inf)
        return global_mean(jnp.argmax(logits_BN, axis=1) == labels_B)

    return loss, {"loss_i2t": loss_i2t, "loss_t2i": loss_t2i,
                  "accuracy_i2t": accuracy(logits_i2t_BN), "accuracy_t2i": accuracy(logits_t2i_BN)}


# ---------------------------------------------------------------------------------------------------
# The dual encoder (Sec. 4.1): EfficientNet and BERT into one embedding space


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    image: en.Config
    text: bert.Config
    embed_dim: int
    temperature_init: float = 1.0   # Sec. 5: "The softmax temperature variable is initialized as 1.0"
    learn_temperature: bool = True  # False: Table 8 rows 7-9, a fixed temperature_init
    image_size: int = 289           # the crop side it is trained at (Sec. 5: 289), and so evaluated at

    @property
    def image_projection(self):
        """Sec. 6.1: a linear layer on the pooled image features only when they are not embed_dim wide."""
        return self.image.features != self.embed_dim


SIZES = {
    # Sec. 5, 6.1: the main model, EfficientNet-L2 + BERT-Large; "L2 uses 1376", L2's own feature width.
    "L2": Config("L2", en.CONFIGS["L2"], bert.CONFIGS["Large"], 1376),
    # Sec. 6.1 / Figure 3: B7 + BERT-Base at B7's 640 (also the public kakaobrain/align-base).
    "B7": Config("B7", en.CONFIGS["B7"], bert.CONFIGS["Base"], 640),
    # Table 8's baseline: B5 + BERT-Base, 640-d, all in-batch negatives, learned temperature.
    "B5": Config("B5", en.CONFIGS["B5"], bert.CONFIGS["Base"], 640),
    # Table 9 (data-scale study): B3 + BERT-Mini, projected to 640 (Sec. 6.1).
    "B3": Config("B3", en.CONFIGS["B3"], bert.CONFIGS["Mini"], 640),
    # Figure 3's smallest pair: B1 + BERT-Mini, projected to 640.
    "B1": Config("B1", en.CONFIGS["B1"], bert.CONFIGS["Mini"], 640),
    # Made up for CPUs and tests (README, "Training"); the text vocabulary is set from the tokenizer by
    # train.py. Embeddings as wide as the image features, as L2 and B7, so HF's AlignModel can hold it; no
    # stochastic depth in runs of a few hundred steps; 24 tokens hold every synthetic caption (at most 22).
    "tiny": Config("tiny", dataclasses.replace(en.CONFIGS["tiny"], drop_connect=0.0),
                   dataclasses.replace(bert.CONFIGS["Tiny"], max_len=24), en.CONFIGS["tiny"].features, image_size=32),
}


def _dense_init(key, d_in, d_out):
    limit = math.sqrt(6.0 / (d_in + d_out))  # Glorot uniform, the Keras Dense default
    return {"kernel": jax.random.uniform(key, (d_in, d_out), jnp.float32, -limit, limit),
            "bias": jnp.zeros((d_out,), jnp.float32)}


@functools.partial(jax.jit, static_argnums=1)  # one program: run op by op, each op would compile alone
def init(key, cfg: Config):
    """(params, state): both towers, the projections, the raw temperature; state is BatchNorm's."""
    k_img, k_txt, k_iproj, k_tproj = jax.random.split(key, 4)
    img_params, state = en.init(k_img, cfg.image)
    params = {"image": img_params, "text": bert.init(k_txt, cfg.text),
              "text_projection": _dense_init(k_tproj, cfg.text.width, cfg.embed_dim)}
    if cfg.image_projection:
        params["image_projection"] = _dense_init(k_iproj, cfg.image.features, cfg.embed_dim)
    if cfg.learn_temperature:
        params["temperature"] = learned_temperature_raw(cfg.temperature_init)
    return params, state


def temperature(params, cfg: Config):
    """The softmax temperature: learned (through `learned_temperature`), or Table 8's fixed value."""
    return learned_temperature(params["temperature"]) if cfg.learn_temperature else cfg.temperature_init


def l2_normalise(x_BE):
    """Unit rows, in float32: a bfloat16 norm has 3 significant digits and cosines need more."""
    x_BE = x_BE.astype(jnp.float32)
    return x_BE * jax.lax.rsqrt(jnp.maximum(jnp.sum(x_BE * x_BE, axis=-1, keepdims=True), 1e-24))


def image_features(params, state, pixels_BHWC, cfg: Config, train=False, rng=None, bn_axis_name=None):
    """Unnormalised image embeddings [B, E] float32 and the BatchNorm state (updated when training)."""
    f_BD, state = en.apply(params["image"], state, pixels_BHWC, cfg.image, train, rng=rng,
                           bn_axis_name=bn_axis_name)
    if cfg.image_projection:  # the projections are tiny: float32, whatever the towers' compute dtype
        f_BD = f_BD @ params["image_projection"]["kernel"] + params["image_projection"]["bias"]
    return f_BD, state


def text_features(params, ids_BL, mask_BL, cfg: Config):
    """Unnormalised text embeddings [B, E] float32: a linear layer on the [CLS] state (Sec. 4.1)."""
    cls_BD = bert.apply(params["text"], ids_BL, mask_BL, cfg.text)[:, 0].astype(jnp.float32)
    return cls_BD @ params["text_projection"]["kernel"] + params["text_projection"]["bias"]


@functools.partial(jax.jit, static_argnames="cfg")  # compiled once per cfg and shape, even when called eagerly
def embed_images(params, state, pixels_BHWC, cfg: Config):
    """L2-normalised float32 image embeddings [B, E] (evaluation mode: BatchNorm running averages)."""
    return l2_normalise(image_features(params, state, pixels_BHWC, cfg)[0])


@functools.partial(jax.jit, static_argnames="cfg")  # compiled once per cfg and shape, even when called eagerly
def embed_texts(params, ids_BL, mask_BL, cfg: Config):
    """L2-normalised float32 text embeddings [B, E]."""
    return l2_normalise(text_features(params, ids_BL, mask_BL, cfg))


def features_loss(img_BE, txt_BE, params, cfg: Config, *, axis_name=None, label_smoothing=0.1,
                  negatives_fraction=1.0, teacher=None, distill_alpha=0.0):
    """Eq. 1-2 on the towers' unnormalised features [B, E]: (loss, metrics).

    metrics: `contrastive_loss`'s (loss of each direction, top-1 accuracy of each direction), the loss, the
    temperature, and img_norm, txt_norm: the mean norm of the features before L2-normalisation, over the
    global batch. Of `params` only the temperature is read, so its gradient is the temperature's alone.
    teacher, distill_alpha: momentum distillation, as `contrastive_loss` (teacher: normalised embeddings).
    """
    t = temperature(params, cfg)
    loss, metrics = contrastive_loss(l2_normalise(img_BE), l2_normalise(txt_BE), t, label_smoothing, axis_name,
                                     negatives_fraction, with_metrics=True, teacher=teacher,
                                     distill_alpha=distill_alpha)
    # Every device holds as many rows, so the mean of the devices' means is the global mean.
    global_mean = lambda x: x if axis_name is None else jax.lax.pmean(x, axis_name)
    return loss, {"loss": loss, **metrics, "temperature": jnp.asarray(t, jnp.float32),
                  "img_norm": global_mean(jnp.linalg.norm(img_BE, axis=-1).mean()),
                  "txt_norm": global_mean(jnp.linalg.norm(txt_BE, axis=-1).mean())}


def train_features(params, state, pixels_BHWC, ids_BL, mask_BL, cfg: Config, rng, bn_axis_name=None):
    """Both towers in training mode: ((img_BE, txt_BE) unnormalised, new BatchNorm state)."""
    img_BE, state = image_features(params, state, pixels_BHWC, cfg, train=True, rng=rng, bn_axis_name=bn_axis_name)
    return (img_BE, text_features(params, ids_BL, mask_BL, cfg)), state


def train_loss(params, state, pixels_BHWC, ids_BL, mask_BL, cfg: Config, rng, *, axis_name=None,
               bn_axis_name=None, label_smoothing=0.1, negatives_fraction=1.0, teacher=None, distill_alpha=0.0):
    """The training objective on a batch, Eq. 1-2 on the towers' embeddings: (loss, (metrics, new BatchNorm
    state)), for jax.value_and_grad; metrics as `features_loss`.

    Inside shard_map, pass axis_name='data' for the global-batch loss (and bn_axis_name to average
    BatchNorm statistics over devices); the gradient contract of `contrastive_loss` applies.
    """
    (img_BE, txt_BE), state = train_features(params, state, pixels_BHWC, ids_BL, mask_BL, cfg, rng, bn_axis_name)
    loss, metrics = features_loss(img_BE, txt_BE, params, cfg, axis_name=axis_name, label_smoothing=label_smoothing,
                                  negatives_fraction=negatives_fraction, teacher=teacher, distill_alpha=distill_alpha)
    return loss, (metrics, state)


# ---------------------------------------------------------------------------------------------------
# Saved models: a directory with align_config.json, model.safetensors and (usually) vocab.txt


def config_to_dict(cfg: Config):
    return dataclasses.asdict(cfg)


def config_from_dict(d) -> Config:
    img = dict(d["image"], stages=tuple(en.Stage(*s) for s in d["image"]["stages"]),
               hf_square_pad_blocks=tuple(d["image"]["hf_square_pad_blocks"]))
    return Config(**{**d, "image": en.Config(**img), "text": bert.Config(**d["text"])})


def save(path, params, state, cfg: Config, vocab_path=None):
    """Write a model directory that `load` reads: the weights first, the config last, each atomically."""
    os.makedirs(path, exist_ok=True)
    flat = {f"params/{k}": v for k, v in weights.tree_to_flat(params).items()}
    flat.update({f"state/{k}": v for k, v in weights.tree_to_flat(state).items()})
    weights.write_safetensors(os.path.join(path, "model.safetensors"), flat)
    if vocab_path and os.path.abspath(vocab_path) != os.path.abspath(os.path.join(path, "vocab.txt")):
        with open(vocab_path, "rb") as src:
            vocab = src.read()
        weights.atomic_write(os.path.join(path, "vocab.txt"), lambda f: f.write(vocab))
    config = json.dumps(config_to_dict(cfg), indent=1).encode()
    weights.atomic_write(os.path.join(path, "align_config.json"), lambda f: f.write(config))


def checkpoints(run_dir):
    """A training run's whole checkpoints, oldest first: the `ckpt_<step>` directories in it.

    train.py writes each checkpoint as `OUT/.tmp_ckpt_<step>/` and renames it, so those are never listed;
    one also needs both the model's config (written last by `save`) and train_state.json (written last by
    train.py), which a directory a kill left half-deleted lacks.
    """
    if not os.path.isdir(run_dir):
        return []
    return [os.path.join(run_dir, d) for d in sorted(os.listdir(run_dir)) if d.startswith("ckpt_")
            and all(os.path.exists(os.path.join(run_dir, d, f)) for f in ("align_config.json", "train_state.json"))]


def model_dir(path):
    """The model directory `path` names: itself (ours or HF's), or a training run's newest checkpoint.

    train.py writes checkpoints as `OUT/ckpt_<step>/` (`checkpoints`), each a model directory of `save`
    plus the optimizer state; `vocab.txt` sits beside the weights in each.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such model or run directory")
    if os.path.exists(os.path.join(path, "align_config.json")):
        return path
    if ckpts := checkpoints(path):  # a run directory: its config.json is train.py's resolved config, not HF's
        return ckpts[-1]
    if not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path}: neither a model directory (align_config.json or HF config.json) nor a "
                                "training run with ckpt_* checkpoints")
    return path


def load(path):
    """(params, state, cfg) from a directory written by `save`, a training run's --out (its newest
    checkpoint), or an HF AlignModel directory."""
    path = model_dir(path)
    if not os.path.exists(os.path.join(path, "align_config.json")):
        return from_hf(path)
    with open(os.path.join(path, "align_config.json")) as f:
        cfg = config_from_dict(json.load(f))
    flat = weights.read_safetensors(os.path.join(path, "model.safetensors"))
    params_t, state_t = jax.eval_shape(lambda: init(jax.random.key(0), cfg))
    params = weights.flat_to_tree({k[7:]: v for k, v in flat.items() if k.startswith("params/")}, params_t)
    state = weights.flat_to_tree({k[6:]: v for k, v in flat.items() if k.startswith("state/")}, state_t)
    return params, state, cfg


# ---------------------------------------------------------------------------------------------------
# HuggingFace AlignModel checkpoints (e.g. kakaobrain/align-base)


def from_hf(path):
    """(params, state, cfg) from an HF `AlignModel` directory (config.json + model.safetensors).

    The weights are read with numpy, never unpickled; a directory with only pytorch_model.bin is
    refused with the command to convert it. The image tower keeps HF's padding (see efficientnet.py).
    """
    sd, hf = weights.read_hf(path)
    if "vision_config" not in hf or "text_config" not in hf:
        raise ValueError(f"{path}: config.json is not an AlignModel config (no vision_config/text_config)")
    img_params, state, img_cfg = en.from_hf(sd, hf["vision_config"], prefix="vision_model.")
    txt_params, txt_cfg = bert.from_hf(sd, hf["text_config"], prefix="text_model.")
    embed_dim = hf.get("projection_dim", 640)
    if embed_dim != img_cfg.features:
        raise ValueError(f"{path}: projection_dim {embed_dim} differs from the image features "
                         f"({img_cfg.features}); HF's AlignModel has no image projection to reconcile them")
    t = float(np.asarray(weights.take(sd, "temperature")).reshape(()))
    if not t > MIN_TEMPERATURE:
        raise ValueError(f"{path}: temperature {t} is below MIN_TEMPERATURE={MIN_TEMPERATURE}")
    cfg = Config(hf.get("_name_or_path") or "hf", img_cfg, txt_cfg, embed_dim,
                 temperature_init=hf.get("temperature_init_value", 1.0), image_size=_hf_crop_size(path))
    params = {"image": img_params, "text": txt_params,
              "text_projection": {"kernel": np.asarray(weights.take(sd, "text_projection.weight")).T,
                                  "bias": np.asarray(weights.take(sd, "text_projection.bias"))},
              "temperature": np.asarray(learned_temperature_raw(t))}
    return params, state, cfg


def _hf_crop_size(path):
    """The crop side of an HF directory's image processor (`preprocessor_config.json`), else Sec. 5's 289.

    HF's vision `image_size` is EfficientNet's native ImageNet resolution (600 for B7), not the crop that
    ALIGN's processor makes (kakaobrain/align-base: resize 346, crop 289, as Sec. 5).
    """
    processor = os.path.join(path, "preprocessor_config.json") if isinstance(path, str) else ""
    if not os.path.exists(processor):
        return 289
    with open(processor) as f:
        crop = json.load(f).get("crop_size", 289)
    return int(crop["height"] if isinstance(crop, dict) else crop)


def _hf_square_pad_blocks(cfg: en.Config, image_size):
    """HF `depthwise_padding` for which HF's fixed padding equals "SAME" at this (even) image size.

    "SAME" pads a stride-2 conv (k//2 - 1, k//2) on even inputs and (k//2, k//2) on odd ones; HF pads
    the former unless the block is listed.
    """
    size, square = -(-image_size // 2), []  # after the stem
    for b in (b for stage in cfg.blocks() for b in stage):
        if b.stride == 2:
            if size % 2:
                square.append(b.index)
            size = -(-size // 2)
    return square


def to_hf(params, state, cfg: Config, path, image_size=None):
    """Write an HF `AlignModel` directory (config.json + model.safetensors) that transformers loads.

    HF's stem always pads (0, 1), which equals "SAME" only at even sizes. So a model of ours (padding
    "same") is written for an even `image_size` (default: the largest even size <= 289), at which HF
    reproduces our embeddings exactly; a model loaded from HF round-trips unchanged at every size.
    """
    if cfg.image_projection:
        raise ValueError(f"HF's AlignModel has no image projection: embed_dim {cfg.embed_dim} must equal the "
                         f"image features ({cfg.image.features})")
    first_skips = [stage[0].index for stage in cfg.image.blocks() if stage[0].skip]
    if first_skips:  # HF's port never gives a stage's first block a skip, and its config cannot say so
        raise ValueError(f"blocks {first_skips} are the first of their stage and have a skip connection (TF's "
                         "rule), which HF's EfficientNet cannot express; use an image config with "
                         "skip_first_blocks=False")
    image_size = image_size or 288
    if cfg.image.padding == "hf":
        square = list(cfg.image.hf_square_pad_blocks)
    elif image_size % 2:
        raise ValueError(f"image_size={image_size} is odd: HF's padding cannot equal ours there; pick an even size "
                         f"(`align.py export --image-size {image_size - 1}`: HF then crops {image_size - 1} px)")
    else:
        square = _hf_square_pad_blocks(cfg.image, image_size)
    i, t = cfg.image, cfg.text
    vision = {"width_coefficient": i.width, "depth_coefficient": i.depth, "depth_divisor": i.divisor,
              "kernel_sizes": [s.kernel for s in i.stages], "strides": [s.stride for s in i.stages],
              "expand_ratios": [s.expand for s in i.stages], "in_channels": [s.in_channels for s in i.stages],
              "out_channels": [s.out_channels for s in i.stages],
              "num_block_repeats": [s.repeats for s in i.stages], "squeeze_expansion_ratio": i.se_ratio,
              "depthwise_padding": square, "hidden_dim": max(2560, i.channels(1280)), "image_size": image_size,
              "batch_norm_eps": i.bn_eps, "batch_norm_momentum": i.bn_momentum, "drop_connect_rate": i.drop_connect,
              "hidden_act": i.activation, "pooling_type": "mean", "num_channels": 3}
    text = {"vocab_size": t.vocab_size, "hidden_size": t.width, "num_hidden_layers": t.layers,
            "num_attention_heads": t.heads, "intermediate_size": t.ff_width, "hidden_act": t.activation,
            "max_position_embeddings": t.max_len, "type_vocab_size": t.type_vocab_size,
            "layer_norm_eps": t.ln_eps, "pad_token_id": t.pad_id}
    hf = {"architectures": ["AlignModel"], "model_type": "align", "projection_dim": cfg.embed_dim,
          "temperature_init_value": cfg.temperature_init, "text_config": text, "vision_config": vision}
    sd = {**en.to_hf_state_dict(params["image"], state, cfg.image, prefix="vision_model."),
          **bert.to_hf_state_dict(params["text"], cfg.text, prefix="text_model.")}
    # AlignTextModel carries BERT's pooler, which AlignModel never uses; zeros keep the load warning-free.
    sd["text_model.pooler.dense.weight"] = np.zeros((t.width, t.width), np.float32)
    sd["text_model.pooler.dense.bias"] = np.zeros((t.width,), np.float32)
    sd["text_projection.weight"] = np.asarray(params["text_projection"]["kernel"], np.float32).T
    sd["text_projection.bias"] = np.asarray(params["text_projection"]["bias"], np.float32)
    sd["temperature"] = np.asarray(temperature(params, cfg), np.float32).reshape(())
    os.makedirs(path, exist_ok=True)
    weights.write_safetensors(os.path.join(path, "model.safetensors"), sd)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=1)


def hf_preprocessor_config(image_size):
    """ALIGN's evaluation preprocessing (Sec. 5, as data.py and evaluate.py do it) in the options of HF's
    `EfficientNetImageProcessor`: `preprocessor_config.json` for a crop side `image_size`.

    Resize to R x R, R = 346/289 of the crop (`data.resize_for`), bilinear (PIL's, resample=2); the central
    crop, offset (R - S) // 2 as `data.crop_params`; then x / 127.5 - 1, pixels in [-1, 1] (rescale_offset).
    HF's defaults differ at each step: bicubic, no crop, x / 255 then ImageNet mean and std, then a second
    division by the std (include_top). data.py resamples the crop's source box once instead of resizing then
    cropping: the same filter (PIL clips it to the image, not the box), but where the box's corners are not
    exact in binary PIL rounds its weights differently, and some values come out one grey level apart
    (test_export.py: none at 57 -> 38 px, 176 of 3,072 at 48x40 -> 38).
    """
    resize = data.resize_for(image_size)
    return {"image_processor_type": "EfficientNetImageProcessor", "processor_class": "AlignProcessor",
            "do_resize": True, "size": {"height": resize, "width": resize}, "resample": 2,
            "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
            "do_rescale": True, "rescale_factor": 1 / 127.5, "rescale_offset": True,
            "do_normalize": False, "include_top": False}


def hf_tokenizer_config(max_len):
    """`tokenizer_config.json` for HF's `BertTokenizer` over our vocab.txt: uncased, accents stripped, CJK
    split (wordpiece.py), each text [CLS] ... [SEP], truncated and padded to the model's max_len.

    AlignProcessor pads to 64 unless the tokenizer's own settings say otherwise, and HF's text tower holds
    only max_len positions, so padding, max_length and truncation are written here too.
    """
    return {"tokenizer_class": "BertTokenizer", "processor_class": "AlignProcessor", "do_lower_case": True,
            "do_basic_tokenize": True, "tokenize_chinese_chars": True, "strip_accents": None,
            "model_max_length": max_len, "max_length": max_len, "padding": "max_length", "truncation": True,
            **dict(zip(("pad_token", "unk_token", "cls_token", "sep_token", "mask_token"), wordpiece.SPECIAL_TOKENS))}


def export_hf(checkpoint, out, vocab=None, image_size=None):
    """Write a complete HF directory for `checkpoint` (a model directory or a training run's --out, its
    newest checkpoint): `AlignProcessor.from_pretrained(out)` and `AlignModel.from_pretrained(out)` on image
    files and strings then give our embeddings (evaluate.py's). Returns the names of the files written.

    config.json, model.safetensors (`to_hf`); vocab.txt and tokenizer_config.json (`hf_tokenizer_config`);
    preprocessor_config.json (`hf_preprocessor_config`) at `image_size`, by default the crop side the model
    was trained at, or one less when that is odd (Sec. 5's 289) and the model is ours: HF's padding equals
    our "SAME" only at even sizes (`to_hf`), so HF then gives our embeddings at 288, with a warning.
    Raises ValueError (one line) for what HF cannot represent: an image projection, a stage's first block
    with a skip, an odd `image_size` for a model of ours.
    """
    path = model_dir(checkpoint)
    vocab = vocab or os.path.join(path, "vocab.txt")
    if not os.path.exists(vocab):
        raise FileNotFoundError(f"{path} has no vocab.txt; pass --vocab with the model's WordPiece vocabulary")
    try:
        tokens = len(wordpiece.Tokenizer(vocab).vocab)
    except KeyError as e:
        raise ValueError(f"{vocab} lacks the special token {e}: not a BERT WordPiece vocabulary")
    params, state, cfg = load(path)
    if tokens > cfg.text.vocab_size:
        raise ValueError(f"{vocab} has {tokens} tokens, more than the model's {cfg.text.vocab_size} embeddings")
    if image_size is None:
        image_size = cfg.image_size
        if image_size % 2 and cfg.image.padding != "hf":  # e.g. Sec. 5's 289: HF cannot pad as we do there
            image_size -= 1
            print(f"align.py export: warning: {path} was trained at {cfg.image_size} px, an odd size at which "
                  f"HF's EfficientNet cannot pad as ours does; HF's processor will crop {image_size} px and give "
                  f"the embeddings of `evaluate.py --image-size {image_size}`", file=sys.stderr)
    to_hf(params, state, cfg, out, image_size=image_size)
    with open(vocab, "rb") as f:
        files = {"vocab.txt": f.read()}
    files["tokenizer_config.json"] = json.dumps(hf_tokenizer_config(cfg.text.max_len), indent=1).encode()
    files["preprocessor_config.json"] = json.dumps(hf_preprocessor_config(image_size), indent=1).encode()
    for name, content in files.items():
        weights.atomic_write(os.path.join(out, name), lambda f: f.write(content))
    return ["config.json", "model.safetensors", *files]


# ---------------------------------------------------------------------------------------------------


def print_sizes(vocab_size):
    """The size table: parameters of each tower and of the projections, from shapes only."""
    print(f"| size | image tower | text tower | embedding | image params | text params ({vocab_size} vocab) "
          "| projections | total |")
    print("|---|---|---|---|---|---|---|---|")
    for name, cfg in SIZES.items():
        cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, vocab_size=vocab_size))
        params, _ = jax.eval_shape(lambda: init(jax.random.key(0), cfg))  # shapes only: nothing allocated
        n = {k: weights.count_params(params[k]) for k in ("image", "text")}
        n["total"] = weights.count_params(params)
        n["projections"] = sum(weights.count_params(v) for k, v in params.items() if k.endswith("_projection"))
        print(f"| {name} | EfficientNet-{cfg.image.name} | BERT-{cfg.text.name} | {cfg.embed_dim} "
              f"| {n['image'] / 1e6:.1f}M | {n['text'] / 1e6:.1f}M | {n['projections'] / 1e6:.2f}M "
              f"| {n['total'] / 1e6:.1f}M |")


def main(argv=None):
    """`python align.py [--vocab-size N]`: the size table; `python align.py export --checkpoint RUN --out DIR`."""
    ap = argparse.ArgumentParser(description="ALIGN model sizes (paper Sec. 5, 6.1, Table 8-9); `export` writes "
                                             "a checkpoint as an HF AlignModel directory.")
    ap.add_argument("--vocab-size", type=int, default=bert.Config.vocab_size)
    sub = ap.add_subparsers(dest="command")  # none: the size table
    p = sub.add_parser("export", help="a checkpoint as an HF directory: AlignModel and AlignProcessor load it",
                       description=export_hf.__doc__)
    p.add_argument("--checkpoint", required=True,
                   help="model directory, or training --out directory (its newest ckpt_*)")
    p.add_argument("--out", required=True, help="the HF directory to write")
    p.add_argument("--vocab", help="vocab.txt (default: the model directory's)")
    p.add_argument("--image-size", type=int,
                   help="crop side of HF's image processor (default: the size the model was trained at)")
    args = ap.parse_args(argv)
    if args.command != "export":
        return print_sizes(args.vocab_size)
    try:
        files = export_hf(args.checkpoint, args.out, args.vocab, args.image_size)
    except (FileNotFoundError, KeyError, ValueError) as e:  # each says what is wrong in one line
        print(f"align.py export: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    print(f"wrote {args.out}: {', '.join(files)}")
    print(f"load it with transformers.AlignProcessor.from_pretrained({args.out!r}) and "
          f"AlignModel.from_pretrained({args.out!r})")


if __name__ == "__main__":
    main()
