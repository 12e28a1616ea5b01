"""EfficientNet B0-B7 and L2, ALIGN's image tower, in plain JAX.

ALIGN (Jia et al. 2021) Sec. 4.1: "EfficientNet with global pooling (without training the 1x1 conv
layer in the classification head) as the image encoder". So the tower is the EfficientNet trunk of
Tan & Le (2019): a stem conv, then MBConv blocks, then a global average over space of the last block's
output. B7 gives 640-d features and L2 (Xie et al. 2020, Noisy Student) 1376-d.

    params, state = init(jax.random.key(0), CONFIGS['B7'])
    features_BD, state = apply(params, state, images_BHWC, CONFIGS['B7'], train=False)

Parameters and BatchNorm running statistics are two separate nested dicts: `params` is what the
optimizer updates, `state` is what BatchNorm updates. The blocks of a stage after its first one all
have the same shapes, so their parameters are stacked on a leading axis and run with `jax.lax.scan`:
L2's 88 blocks compile as 7 first blocks plus 7 scan bodies, and compile time does not grow with depth
(on CPU, up to B7, the scans are unrolled, which is faster there: `Config.block_loop`).

Dimension key:
    B batch   H height   W width   C channels (in)   D channels (out / features)
    K kernel size   S squeeze-excitation channels   R stacked blocks of a stage

Deviations from the TF reference (tensorflow/tpu models/official/efficientnet):
- No head: no 1x1 conv to 1280 channels, no dropout, no classifier (ALIGN Sec. 4.1, 6.1).
- BatchNorm statistics are per device unless `bn_axis_name` is given (the TF TPU reference averages over
  groups of replicas; ALIGN trains with 16 images per core, Sec. 5).
- Models loaded from HF keep HF's padding (`padding="hf"`), which equals TF "SAME" only at even sizes.
"""

import argparse
import dataclasses
import functools
import json
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import backprop
import weights


class Stage(NamedTuple):
    """One stage of EfficientNet-B0 (Tan & Le 2019, Table 1): blocks that share kernel and width."""
    kernel: int
    stride: int
    expand: int
    in_channels: int
    out_channels: int
    repeats: int


# EfficientNet-B0 (Tan & Le 2019, Table 1); every other variant scales these with (width, depth).
B0_STAGES = (
    Stage(3, 1, 1, 32, 16, 1),
    Stage(3, 2, 6, 16, 24, 2),
    Stage(5, 2, 6, 24, 40, 2),
    Stage(3, 2, 6, 40, 80, 3),
    Stage(5, 1, 6, 80, 112, 3),
    Stage(5, 2, 6, 112, 192, 4),
    Stage(3, 1, 6, 192, 320, 1),
)


class Block(NamedTuple):
    """One MBConv block after compound scaling: what `_mbconv` needs to know statically."""
    index: int        # position among all blocks, for the stochastic-depth rate and HF names
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    expand: int
    skip: bool        # identity shortcut: stride 1 and in == out (TF reference `id_skip`)
    square_pad: bool  # HF padding only: this stride-2 block pads (k//2, k//2) instead of (k//2-1, k//2)


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    width: float                 # channel multiplier (compound scaling, Tan & Le 2019 Eq. 3)
    depth: float                 # repeat multiplier
    resolution: int              # the ImageNet model's native size; ALIGN trains every variant at 289
    stages: tuple = B0_STAGES
    stem_channels: int = 32
    se_ratio: float = 0.25       # squeeze-excitation width, relative to the block's *input* channels
    bn_momentum: float = 0.99    # TF convention: running = momentum * running + (1 - momentum) * batch
    bn_eps: float = 1e-3
    activation: str = "swish"    # HF `hidden_act` name (weights.HF_ACTIVATIONS); EfficientNet's is swish, x * sigmoid(x)
    drop_connect: float = 0.2    # stochastic depth, scaled linearly by block index
    divisor: int = 8
    padding: str = "same"        # "same": TF "SAME"; "hf": the HF port's fixed padding (for loaded models)
    hf_square_pad_blocks: tuple = ()  # HF `depthwise_padding`: blocks that pad symmetrically in "hf" mode
    # TF gives a stage's first block a skip when stride is 1 and channels match; HF's port never does.
    # No published variant has such a first block (only made-up narrow ones like `tiny`), but loaded HF
    # models must follow HF.
    skip_first_blocks: bool = True
    dtype: str = "float32"       # compute dtype of convolutions; parameters and statistics stay float32
    remat: bool = False          # recompute each block in the backward pass instead of storing it
    depthwise: str = "auto"      # "conv" (XLA grouped conv), "shift" (K*K shifted multiply-adds), "auto":
                                 # shift on CPU, where XLA's grouped-conv backward is 3-12x slower
    block_loop: str = "auto"     # "scan": a stage's blocks after its first compiled as one (compile time
                                 # flat in depth); "unroll": each block compiled on its own; "auto": unroll
                                 # on CPU up to B7's 55 blocks, where the scans' copies of residuals cost
                                 # B7 + BERT-Base 10-17% (compile 35-42 -> 65-93 s); L2 keeps its scans, as
                                 # unrolled it was slower (BENCHMARKS.md)

    def channels(self, c):
        """Round c * width to a multiple of `divisor`, never down by more than 10% (TF `round_filters`)."""
        c = c * self.width
        rounded = max(self.divisor, int(c + self.divisor / 2) // self.divisor * self.divisor)
        return int(rounded + self.divisor if rounded < 0.9 * c else rounded)

    def repeats(self, r):
        """Round r * depth up (TF `round_repeats`)."""
        return int(math.ceil(self.depth * r))

    @property
    def features(self):
        return self.channels(self.stages[-1].out_channels)

    def blocks(self):
        """The blocks of each stage after scaling, as a list of lists of `Block`."""
        total = sum(self.repeats(s.repeats) for s in self.stages)
        out, index = [], 0
        for s in self.stages:
            stage = []
            for j in range(self.repeats(s.repeats)):
                c_in = self.channels(s.in_channels) if j == 0 else self.channels(s.out_channels)
                c_out, stride = self.channels(s.out_channels), (s.stride if j == 0 else 1)
                stage.append(Block(index, c_in, c_out, s.kernel, stride, s.expand,
                                   skip=stride == 1 and c_in == c_out and (j > 0 or self.skip_first_blocks),
                                   square_pad=index in self.hf_square_pad_blocks))
                index += 1
            out.append(stage)
        assert index == total
        return out


CONFIGS = {
    # (width, depth, resolution) from Tan & Le 2019 (EfficientNet B0-B7) and Xie et al. 2020 (L2).
    "B0": Config("B0", 1.0, 1.0, 224),
    "B1": Config("B1", 1.0, 1.1, 240),
    "B2": Config("B2", 1.1, 1.2, 260),
    "B3": Config("B3", 1.2, 1.4, 300),
    "B4": Config("B4", 1.4, 1.8, 380),
    "B5": Config("B5", 1.6, 2.2, 456),
    "B6": Config("B6", 1.8, 2.6, 528),
    "B7": Config("B7", 2.0, 3.1, 600),
    # EfficientNet-L2: width 4.3, depth 5.3 (Noisy Student, Xie et al. 2020); ALIGN's main image tower.
    "L2": Config("L2", 4.3, 5.3, 800),
    # Made up for CPUs and tests: 10 blocks (stages of 1-2 repeats, so the scan path is exercised), 160-d,
    # for 32x32 images (where the last stages' maps are 1x1). Width 0.5, not 0.25: held-out R@1 after 600
    # steps of 64 pairs (on the synthetic data before its objects grew) was 4% at 0.25, 10% at 0.5 and 11%
    # at 1.0, the step 121, 139 and 190 ms (README, "Training"). No stage's first block has a skip (TF's
    # rule would give one at 0.25), so HF's port can load it (align.to_hf). BatchNorm momentum 0.9, not TF's 0.99: its runs are a few
    # hundred steps, and after 250 at 0.99 the running statistics still hold 8% (0.99^250) of their
    # initial 0 and 1; evaluation-mode R@1 was 0.1% where training accuracy was 51% (README, "Training").
    "tiny": Config("tiny", 0.5, 0.5, 32, bn_momentum=0.9),
}


# ----------------------------------------------------------------------------------------------------
# Initialisation


class _Normal(NamedTuple):
    """A parameter still to be drawn: normal with mean 0 and this standard deviation (see `_draw`)."""
    shape: tuple
    std: float


def _is_normal(x):
    return isinstance(x, _Normal)


def _conv_init(shape_HWIO):
    """TF reference `conv_kernel_initializer`: normal with std sqrt(2 / fan_out), fan_out = K*K*out.

    A depthwise kernel is ours [K, K, 1, D] but Keras's `DepthwiseConv2D` kernel is [K, K, D, 1] (one
    output per input channel), so TF's fan_out for it is K*K: pass it in that layout.
    """
    k_h, k_w, _, out = shape_HWIO
    return _Normal(tuple(shape_HWIO), math.sqrt(2.0 / (k_h * k_w * out)))


def _bn_init(c):
    return {"scale": jnp.ones((c,), jnp.float32), "bias": jnp.zeros((c,), jnp.float32)}


def _bn_state(c):
    return {"mean": jnp.zeros((c,), jnp.float32), "var": jnp.ones((c,), jnp.float32)}


def _init_block(b: Block, cfg: Config):
    C, S = b.in_channels, max(1, int(b.in_channels * cfg.se_ratio))
    D = C * b.expand  # channels inside the block
    pointwise = lambda c_in, c_out: _conv_init((1, 1, c_in, c_out))._replace(shape=(c_in, c_out))
    p, s = {}, {}
    if b.expand != 1:
        p["expand_conv"] = pointwise(C, D)
        p["expand_bn"], s["expand_bn"] = _bn_init(D), _bn_state(D)
    p["depthwise_conv"] = _conv_init((b.kernel, b.kernel, D, 1))._replace(shape=(b.kernel, b.kernel, 1, D))
    p["depthwise_bn"], s["depthwise_bn"] = _bn_init(D), _bn_state(D)
    p["se_reduce"] = {"kernel": pointwise(D, S), "bias": jnp.zeros((S,))}
    p["se_expand"] = {"kernel": pointwise(S, D), "bias": jnp.zeros((D,))}
    p["project_conv"] = pointwise(D, b.out_channels)
    p["project_bn"], s["project_bn"] = _bn_init(b.out_channels), _bn_state(b.out_channels)
    return p, s


def _stacked(tree, n):
    """n copies of a block's parameters or statistics on a new leading axis (each copy drawn anew)."""
    return jax.tree.map(lambda a: _Normal((n, *a.shape), a.std) if _is_normal(a) else jnp.stack([a] * n),
                        tree, is_leaf=_is_normal)


def _draw(key, tree):
    """`tree` with every `_Normal` leaf drawn, all from one call of `jax.random.normal`.

    One draw per parameter would be ~70 random-number programs for XLA to compile: EfficientNet-tiny's
    `jax.jit(init)` compiled in 9.6 s that way and compiles in 1.1 s this way (BENCHMARKS.md).
    """
    leaves, treedef = jax.tree.flatten(tree, is_leaf=_is_normal)
    sizes = [math.prod(a.shape) for a in leaves if _is_normal(a)]
    flat = iter(jnp.split(jax.random.normal(key, (sum(sizes),), jnp.float32), np.cumsum(sizes)[:-1]))
    return jax.tree.unflatten(treedef, [next(flat).reshape(a.shape) * a.std if _is_normal(a) else a
                                        for a in leaves])


@functools.partial(jax.jit, static_argnums=1)  # one program: run op by op, each op would compile alone
def init(key, cfg: Config):
    """Random parameters and fresh BatchNorm statistics: (params, state)."""
    stem = cfg.channels(cfg.stem_channels)
    params = {"stem": {"conv": _conv_init((3, 3, 3, stem)), "bn": _bn_init(stem)}, "stages": []}
    state = {"stem": {"bn": _bn_state(stem)}, "stages": []}
    for blocks in cfg.blocks():
        p_first, s_first = _init_block(blocks[0], cfg)
        p, s = {"first": p_first}, {"first": s_first}
        if len(blocks) > 1:  # identical shapes: stack them for jax.lax.scan
            p["rest"], s["rest"] = _stacked(_init_block(blocks[1], cfg), len(blocks) - 1)
        params["stages"].append(p)
        state["stages"].append(s)
    return _draw(key, params), state


# ----------------------------------------------------------------------------------------------------
# Layers


def _batch_norm(x_BHWC, p, s, cfg: Config, train, axis_name, act=None):
    """BatchNorm with explicit statistics, then `act` if given; returns (y, new statistics).

    Statistics are computed in float32 whatever the compute dtype: a bfloat16 variance of activations
    with large means loses most of its digits. With `axis_name`, batch statistics are averaged over that
    mesh axis (inside shard_map), so every device normalises with the statistics of the global batch;
    without it each device uses its own slice, as on ALIGN's TPUs (16 images per core, Sec. 5).
    The activation is applied in float32, before the cast back to the compute dtype. In training the
    gradient is written by hand (`backprop.normalise_batch`): fewer saved arrays than autodiff's.
    """
    x = x_BHWC.astype(jnp.float32)
    if train:
        y, mean_C, var_C = backprop.normalise_batch(x, p["scale"], p["bias"], cfg.bn_eps, axis_name, act)
        m = cfg.bn_momentum
        # Biased batch variance in the running average, as the TF TPU reference (TpuBatchNormalization).
        s = {"mean": m * s["mean"] + (1 - m) * mean_C, "var": m * s["var"] + (1 - m) * var_C}
    else:
        y = (x - s["mean"]) * jax.lax.rsqrt(s["var"] + cfg.bn_eps) * p["scale"] + p["bias"]
        y = y if act is None else act(y)
    return y.astype(x_BHWC.dtype), s


def _conv(x_BHWC, w_KKCD, stride, padding, groups=1):
    return jax.lax.conv_general_dilated(
        x_BHWC, w_KKCD.astype(x_BHWC.dtype), (stride, stride), padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)


def _pointwise(x_BHWC, w_CD):
    """A 1x1 convolution, written as one [B*H*W, C] x [C, D] matrix product.

    The same sums as `einsum("bhwc,cd->bhwd")`, but XLA's CPU backward of the 4-D form, which needs both
    the weight and the input gradient, is up to 1.6x slower than of the 2-D one (BENCHMARKS.md).
    """
    B, H, W, C = x_BHWC.shape
    return (x_BHWC.reshape(B * H * W, C) @ w_CD.astype(x_BHWC.dtype)).reshape(B, H, W, -1)


def _depthwise(x_BHWC, w_KK1C, stride, padding, impl):
    """Depthwise convolution, as XLA's grouped conv or as K*K shifted, per-channel multiply-adds.

    The two are the same sums in the same order (tested bit for bit). On CPU, XLA's grouped-conv
    backward pass is 3-12x slower than the fused elementwise form (bench.py); on GPU/TPU the native conv
    is kept. The shifted form's backward pass is written by hand (`backprop.shifted_sum`).
    """
    if impl == "auto":
        impl = "shift" if jax.default_backend() == "cpu" else "conv"
    if impl == "conv":
        return _conv(x_BHWC, w_KK1C, stride, padding, groups=x_BHWC.shape[-1])
    K, (_, H, W, _) = w_KK1C.shape[0], x_BHWC.shape
    if padding == "SAME":
        pads = []
        for n in (H, W):
            total = max((-(-n // stride) - 1) * stride + K - n, 0)
            pads.append((total // 2, total - total // 2))
    else:
        pads = list(padding)
    # lax.pad, not jnp.pad: HF's padding of a stride-2 kernel-1 conv is (-1, 0), a crop.
    x = jax.lax.pad(x_BHWC, jnp.zeros((), x_BHWC.dtype), [(0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)])
    return backprop.shifted_sum(x, w_KK1C[:, :, 0, :].astype(x.dtype), stride)


def _padding(kernel, stride, cfg: Config, square=False):
    """TF "SAME", or what HF's port does: at stride 2 a fixed (k//2-1, k//2) pad whatever the input size.

    The two agree at even input sizes; at odd sizes HF's output is one pixel smaller. Our own models use
    "SAME"; models loaded from HF keep HF's padding so that they reproduce HF's outputs.
    """
    if cfg.padding == "same" or stride == 1:
        return "SAME"
    lo, hi = (kernel // 2, kernel // 2) if square else (kernel // 2 - 1, kernel // 2)
    return ((lo, hi), (lo, hi))


def _drop_path(x_BHWC, rate, key):
    """Stochastic depth (Huang et al. 2016; TF reference `drop_connect`): drop a sample's whole branch."""
    keep = 1.0 - rate
    mask_B = jax.random.bernoulli(key, keep, (x_BHWC.shape[0],))
    return x_BHWC * (mask_B / keep).astype(x_BHWC.dtype)[:, None, None, None]


def _mbconv(p, s, x_BHWC, b: Block, cfg: Config, train, axis_name, drop_rate, key):
    """Mobile inverted bottleneck with squeeze-excitation (Sandler et al. 2018; Tan & Le 2019)."""
    act = weights.HF_ACTIVATIONS[cfg.activation]
    bn = lambda h, name, act=None: _batch_norm(h, p[name], s[name], cfg, train, axis_name, act)
    new_s = {}
    h = x_BHWC
    if b.expand != 1:  # at ratio 1 the block has no expansion conv (TF reference)
        h, new_s["expand_bn"] = bn(_pointwise(h, p["expand_conv"]), "expand_bn", act)
    h = _depthwise(h, p["depthwise_conv"], b.stride, _padding(b.kernel, b.stride, cfg, b.square_pad), cfg.depthwise)
    h, new_s["depthwise_bn"] = bn(h, "depthwise_bn", act)
    # Squeeze-excitation: a per-channel gate from the spatial mean; the mean in float32 (a sum of H*W).
    g_BD = jnp.mean(h.astype(jnp.float32), axis=(1, 2)).astype(h.dtype)
    g_BS = act(g_BD @ p["se_reduce"]["kernel"].astype(h.dtype) + p["se_reduce"]["bias"].astype(h.dtype))
    g_BD = jax.nn.sigmoid(g_BS @ p["se_expand"]["kernel"].astype(h.dtype) + p["se_expand"]["bias"].astype(h.dtype))
    h = h * g_BD[:, None, None, :]
    h = _pointwise(h, p["project_conv"])
    h, new_s["project_bn"] = bn(h, "project_bn")  # linear bottleneck: no activation
    if b.skip:
        if train and key is not None:
            h = _drop_path(h, drop_rate, key)
        h = h + x_BHWC
    return h, new_s


# `block_loop="auto"` unrolls on CPU up to this many blocks (B7's); L2's 88 unrolled, with BERT-Large, made
# a step 2.5x slower at batch 1 on two cores and compiled in 143 s against 47 s (BENCHMARKS.md).
_UNROLL_UP_TO = 55


def apply(params, state, images_BHWC, cfg: Config, train=False, *, rng=None, bn_axis_name=None):
    """Image features: the global average of the last MBConv block's output (ALIGN Sec. 4.1, 6.1).

    images_BHWC: pixels in [-1, 1] (any float dtype). Returns (features_BD float32, state): in training,
    `state` holds BatchNorm running averages updated with this batch; in evaluation it is returned as is.
    train=True needs `rng` for stochastic depth unless cfg.drop_connect is 0. `bn_axis_name`: average
    BatchNorm batch statistics over this mesh axis (inside shard_map) instead of per device.
    """
    if train and cfg.drop_connect > 0 and rng is None:
        raise ValueError("efficientnet.apply(train=True) needs rng= for stochastic depth "
                         "(or a config with drop_connect=0)")
    dtype = jnp.dtype(cfg.dtype)
    total = sum(len(stage) for stage in cfg.blocks())
    block_fn = _mbconv
    if cfg.remat:  # static arguments (Block, Config, flags) are closed over, so only arrays are saved
        block_fn = jax.checkpoint(_mbconv, static_argnums=(3, 4, 5, 6))
    keys = jax.random.split(rng, total) if (train and rng is not None) else None
    unroll = weights.unrolled(cfg.block_loop, total, _UNROLL_UP_TO, "efficientnet.Config.block_loop")

    x = images_BHWC.astype(dtype)
    stem_pad = "SAME" if cfg.padding == "same" else ((0, 1), (0, 1))  # HF's stem: ZeroPad2d((0, 1, 0, 1))
    x = _conv(x, params["stem"]["conv"], 2, stem_pad)
    x, stem_bn = _batch_norm(x, params["stem"]["bn"], state["stem"]["bn"], cfg, train, bn_axis_name,
                             weights.HF_ACTIVATIONS[cfg.activation])
    new_state = {"stem": {"bn": stem_bn}, "stages": []}

    for p, s, blocks in zip(params["stages"], state["stages"], cfg.blocks()):
        first = blocks[0]
        rate = cfg.drop_connect * first.index / total
        key = None if keys is None else keys[first.index]
        x, s_first = block_fn(p["first"], s["first"], x, first, cfg, train, bn_axis_name, rate, key)
        s_new = {"first": s_first}
        if len(blocks) > 1:
            idx = np.array([b.index for b in blocks[1:]])
            rates = jnp.asarray(cfg.drop_connect * idx / total, jnp.float32)
            rest_keys = None if keys is None else keys[idx]

            def body(x, xs, b=blocks[1]):
                p_b, s_b, rate_b, key_b = xs
                return block_fn(p_b, s_b, x, b, cfg, train, bn_axis_name, rate_b, key_b)

            x, s_new["rest"] = jax.lax.scan(body, x, (p["rest"], s["rest"], rates, rest_keys), unroll=unroll)
        new_state["stages"].append(s_new)

    features_BD = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    return features_BD, (new_state if train else state)


# ----------------------------------------------------------------------------------------------------
# HuggingFace checkpoints (EfficientNetModel, AlignVisionModel)


def config_from_hf(hf: dict, name="hf") -> Config:
    """Our Config for an HF EfficientNetConfig / AlignVisionConfig (as a dict from config.json).

    Every field of HF's port that this trunk can express is read; one it cannot raises a one-line
    ValueError naming the field. Not read: `hidden_dim` (EfficientNetModel's head conv, which ALIGN drops
    (Sec. 4.1); in AlignVisionModel the side of its average-pool window, which equals our global mean
    whenever HF can run: a last feature map wider than the window fails HF's reshape), `dropout_rate`
    (the classifier's), `initializer_range`.
    """
    def refuse(field, why):
        raise ValueError(f"HF config has {field}={hf.get(field)!r}: {why}")

    per_stage = ("kernel_sizes", "strides", "expand_ratios", "in_channels", "out_channels", "num_block_repeats")
    for field in per_stage:  # HF's port has a stage per entry of in_channels
        if len(hf[field]) != len(hf["in_channels"]):
            refuse(field, f"needs one entry per stage ({len(hf['in_channels'])}, as in_channels)")
    stages = tuple(Stage(*map(int, t)) for t in zip(*(hf[f] for f in per_stage)))
    if any(s.stride not in (1, 2) for s in stages):
        refuse("strides", "HF's port runs strides 1 and 2 only")
    if hf.get("hidden_act", "swish") not in weights.HF_ACTIVATIONS:
        refuse("hidden_act", f"supported: {', '.join(weights.HF_ACTIVATIONS)}")
    if hf.get("pooling_type", "mean") != "mean":
        refuse("pooling_type", "ALIGN's image tower is a global average (Sec. 4.1)")
    if hf.get("num_channels", 3) != 3:
        refuse("num_channels", "the stem takes RGB images")
    momentum = hf.get("batch_norm_momentum", 0.99)
    if not 0 <= momentum <= 1:
        refuse("batch_norm_momentum", "not in [0, 1]")
    size = hf.get("image_size", 600)
    return Config(name, hf["width_coefficient"], hf["depth_coefficient"],
                  int(max(size) if isinstance(size, (list, tuple)) else size),
                  stages=stages, se_ratio=hf.get("squeeze_expansion_ratio", 0.25),
                  # TF's convention, as the TF checkpoints it was copied from (align-base: 0.99), and ours.
                  # HF's port hands it to nn.BatchNorm2d as torch's momentum (the weight of the new batch), a
                  # bug for fine-tuning in PyTorch (test_train_parity.py); we keep what the number means.
                  bn_momentum=momentum,
                  bn_eps=hf.get("batch_norm_eps", 1e-3), drop_connect=hf.get("drop_connect_rate", 0.2),
                  divisor=hf.get("depth_divisor", 8), padding="hf", skip_first_blocks=False,
                  activation=hf.get("hidden_act", "swish"),
                  hf_square_pad_blocks=tuple(hf.get("depthwise_padding", ())))


def _hf_block_names(b: Block):
    """(our name, HF module path, kind) for each parameterised layer of a block."""
    names = [] if b.expand == 1 else [("expand_conv", "expansion.expand_conv", "1x1"),
                                       ("expand_bn", "expansion.expand_bn", "bn")]
    return names + [("depthwise_conv", "depthwise_conv.depthwise_conv", "conv"),
                    ("depthwise_bn", "depthwise_conv.depthwise_norm", "bn"),
                    ("se_reduce", "squeeze_excite.reduce", "dense"),
                    ("se_expand", "squeeze_excite.expand", "dense"),
                    ("project_conv", "projection.project_conv", "1x1"),
                    ("project_bn", "projection.project_bn", "bn")]


def _hf_layout(cfg: Config):
    """Yields (path into params/state, HF name, kind) for every tensor; path = ('stages', i, 'rest', j)."""
    yield ("stem", "conv"), "embeddings.convolution", "conv"
    yield ("stem", "bn"), "embeddings.batchnorm", "bn"
    for i, blocks in enumerate(cfg.blocks()):
        for j, b in enumerate(blocks):
            where = ("stages", i, "first") if j == 0 else ("stages", i, "rest", j - 1)
            for ours, theirs, kind in _hf_block_names(b):
                yield where + (ours,), f"encoder.blocks.{b.index}.{theirs}", kind


def from_hf_state_dict(sd, cfg: Config, prefix=""):
    """(params, state) from an HF EfficientNet state dict of numpy arrays (torch layouts)."""
    get = lambda name: np.asarray(weights.take(sd, prefix + name), np.float32)
    flat_p, flat_s = {}, {}
    for path, name, kind in _hf_layout(cfg):
        if kind == "conv":    # torch [D, C/groups, K, K] -> HWIO
            flat_p[path] = get(name + ".weight").transpose(2, 3, 1, 0)
        elif kind == "1x1":   # torch [D, C, 1, 1] -> [C, D]
            flat_p[path] = get(name + ".weight")[:, :, 0, 0].T
        elif kind == "dense":
            flat_p[path] = {"kernel": get(name + ".weight")[:, :, 0, 0].T, "bias": get(name + ".bias")}
        else:
            flat_p[path] = {"scale": get(name + ".weight"), "bias": get(name + ".bias")}
            flat_s[path] = {"mean": get(name + ".running_mean"), "var": get(name + ".running_var")}
    return _unflatten(flat_p, cfg), _unflatten(flat_s, cfg)


def to_hf_state_dict(params, state, cfg: Config, prefix=""):
    """The inverse of `from_hf_state_dict`: HF names and torch layouts, as numpy arrays."""
    sd = {}
    for path, name, kind in _hf_layout(cfg):
        p = _lookup(params, path)
        if kind == "conv":    # HWIO -> torch [D, C/groups, K, K]
            sd[name + ".weight"] = np.asarray(p, np.float32).transpose(3, 2, 0, 1)
        elif kind == "1x1":
            sd[name + ".weight"] = np.asarray(p, np.float32).T[:, :, None, None]
        elif kind == "dense":
            sd[name + ".weight"] = np.asarray(p["kernel"]).T[:, :, None, None]
            sd[name + ".bias"] = np.asarray(p["bias"])
        else:
            bn_s = _lookup(state, path)
            sd[name + ".weight"], sd[name + ".bias"] = np.asarray(p["scale"]), np.asarray(p["bias"])
            sd[name + ".running_mean"], sd[name + ".running_var"] = np.asarray(bn_s["mean"]), np.asarray(bn_s["var"])
            sd[name + ".num_batches_tracked"] = np.zeros((), np.int64)
    return {prefix + k: v for k, v in sd.items()}


def _lookup(tree, path):
    """tree[path], where a path through a stacked 'rest' names the stack index next: ('rest', j, name)."""
    path = list(path)
    while path:
        k = path.pop(0)
        tree = tree[k]
        if k == "rest":
            j = path.pop(0)
            tree = jax.tree.map(lambda a: a[j], tree)
    return tree


def _unflatten(flat, cfg: Config):
    """Rebuild the nested tree of `init` (stages' later blocks stacked) from {path: leaf}."""
    tree = {"stem": {k: flat[("stem", k)] for k in ("conv", "bn") if ("stem", k) in flat}, "stages": []}
    for i, blocks in enumerate(cfg.blocks()):
        names = [ours for ours, _, _ in _hf_block_names(blocks[0])]
        pick = lambda where: {n: flat[where + (n,)] for n in names if where + (n,) in flat}
        stage = {"first": pick(("stages", i, "first"))}
        if len(blocks) > 1:
            rest = [pick(("stages", i, "rest", j)) for j in range(len(blocks) - 1)]
            stage["rest"] = jax.tree.map(lambda *a: np.stack(a), *rest)
        tree["stages"].append(stage)
    return tree


def from_hf(path_or_state_dict, config=None, prefix=None):
    """(params, state, cfg) from an HF EfficientNetModel / AlignVisionModel directory or state dict.

    A directory is read as config.json + model.safetensors (with numpy; never unpickled). With a state
    dict, `config` is the HF config (a dict or an object with `to_dict()`).
    """
    sd, hf_cfg = weights.read_hf(path_or_state_dict, config)
    hf_cfg = hf_cfg.get("vision_config", hf_cfg)
    cfg = config_from_hf(hf_cfg)
    if prefix is None:
        prefix = weights.find_prefix(sd, "embeddings.convolution.weight")
    params, state = from_hf_state_dict(sd, cfg, prefix)
    return params, state, cfg


# ----------------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description="EfficientNet trunks as ALIGN image towers: the size table.")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args()
    rows = []
    for name, cfg in CONFIGS.items():
        rows.append({"variant": name, "width": cfg.width, "depth": cfg.depth, "resolution": cfg.resolution,
                     "blocks": sum(len(s) for s in cfg.blocks()), "params": weights.count_params(jax.eval_shape(lambda: init(jax.random.key(0), cfg))[0]),
                     "features": cfg.features})
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print("| variant | width | depth | native res | blocks | params (trunk) | features |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['width']} | {r['depth']} | {r['resolution']} | {r['blocks']} "
              f"| {r['params'] / 1e6:.2f}M | {r['features']} |")


if __name__ == "__main__":
    main()
