"""Tests: any HF AlignModel / BertModel / EfficientNetModel config our towers can express loads and
matches HF; one they cannot is refused in one line naming the field (issue 14, item 5).

Random small configs (seeded) are built in HF, given weights whose signals neither vanish nor saturate,
saved with `save_pretrained` and loaded with our `from_hf`. The reference is HF in float64; we are held to
HF float32's own distance from it (times 3, plus a few float32 rounding steps of a unit vector), at an
even and an odd image size, where HF's fixed padding and TF's "SAME" differ.
"""

import copy
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import align
import bert
import efficientnet as en

SLACK = 3.0   # ours may be this many times HF float32's distance from HF float64 ...
ATOL = 1e-5   # ... plus this much (unit vectors; float32 rounds them at ~6e-8)


def _torch():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    return torch, transformers


# ----------------------------------------------------------------------------------------------------
# Random configs


def _vision_config(rng, deep=False):
    """A random HF EfficientNet config: 3-5 stages (B0's channel chain scaled down), any kernel, stride,
    expansion and repeat count, square padding on random blocks, non-default BatchNorm and activation."""
    n = int(rng.integers(3, 6))
    out = [int(c) for c in rng.choice([8, 16, 24, 32, 40, 48], n)]
    strides = [int(s) for s in rng.choice([1, 2], n)]
    for i in np.flatnonzero(np.cumsum(strides) - np.arange(1, n + 1) > 3):  # at most 3 stride-2 stages: at
        strides[i] = 1                                                     # 32 px HF cannot pad a 7x7 on 1x1
    repeats = [int(r) for r in rng.integers(1, 3 if deep else 4, n)]
    if deep:  # B7's depth coefficient, and a stage of 4 blocks (13 after scaling)
        repeats[int(rng.integers(n))] = 4
    depth = 3.1 if deep else float(rng.choice([0.5, 1.0]))
    blocks = sum(math.ceil(depth * r) for r in repeats)
    width = 0.1 if deep else float(rng.choice([0.1, 0.15, 0.25]))  # deep ones narrow: HF float64 is slow
    return dict(width_coefficient=width, depth_coefficient=depth, image_size=32,
                depth_divisor=int(rng.choice([4, 8])), kernel_sizes=[int(k) for k in rng.choice([1, 3, 5, 7], n)],
                strides=strides, expand_ratios=[int(e) for e in rng.choice([1, 2, 4, 6], n)],
                in_channels=[32] + out[:-1], out_channels=out, num_block_repeats=repeats,
                squeeze_expansion_ratio=float(rng.choice([0.25, 0.5])),
                depthwise_padding=sorted(int(b) for b in rng.choice(blocks, 2, replace=False)),
                hidden_act=str(rng.choice(["swish", "silu", "relu", "gelu"])), hidden_dim=int(rng.choice([64, 2560])),
                batch_norm_eps=float(rng.choice([1e-3, 1e-5, 1e-2])),
                batch_norm_momentum=float(rng.choice([0.99, 0.1])), drop_connect_rate=0.2)


def _text_config(rng):
    """A random HF BERT config: any width, heads, feed-forward width, activation and table sizes."""
    heads = int(rng.choice([1, 2, 4]))
    return dict(vocab_size=int(rng.integers(40, 120)), hidden_size=heads * int(rng.choice([8, 16])),
                num_hidden_layers=int(rng.integers(1, 3)), num_attention_heads=heads,
                intermediate_size=int(rng.integers(16, 100)),
                hidden_act=str(rng.choice(["gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "quick_gelu"])),
                layer_norm_eps=float(rng.choice([1e-12, 1e-6, 1e-3])), type_vocab_size=int(rng.integers(1, 4)),
                max_position_embeddings=int(rng.integers(12, 40)), pad_token_id=int(rng.choice([0, 1, 3])))


def _realistic_weights(torch, model, calibrate, seed):
    """Conv and linear weights at 1/sqrt(fan_in), random norm parameters, BatchNorm running statistics
    set to a training batch's (momentum 1), so that activations stay image-dependent through every block
    (HF's std-0.02 initialisation makes them vanish)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / math.sqrt(m.weight[0].numel()))
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = 1.0
        if calibrate is not None:
            model.train()(calibrate)
    return model.eval()


# ----------------------------------------------------------------------------------------------------
# AlignModel: both towers, ten random configs, each at an even and an odd size


def _check_align_config(seed, tmp_path, deep):
    torch, transformers = _torch()
    rng = np.random.default_rng(seed)
    vision, text = _vision_config(rng, deep), _text_config(rng)
    features = en.config_from_hf(vision).features
    model = transformers.AlignModel(transformers.AlignConfig(text_config=text, vision_config=vision,
                                                             projection_dim=features))
    calibrate = torch.rand((4, 3, 33, 33), generator=torch.Generator().manual_seed(seed)) * 2 - 1
    _realistic_weights(torch, model.vision_model, calibrate, seed)
    _realistic_weights(torch, model.text_model, None, seed)
    model_64 = copy.deepcopy(model).double()
    model.save_pretrained(tmp_path)
    params, state, cfg = align.from_hf(str(tmp_path))
    assert (cfg.text.ff_width, cfg.text.activation) == (text["intermediate_size"], text["hidden_act"])
    assert (cfg.image.bn_eps, cfg.image.activation) == (vision["batch_norm_eps"], vision["hidden_act"])

    L = min(12, text["max_position_embeddings"])
    mask = (np.arange(L)[None] < rng.integers(2, L + 1, (2, 1))).astype(np.int64)
    ids = np.where(mask == 1, rng.integers(5, text["vocab_size"], (2, L)), text["pad_token_id"])
    for S in (32, 33):
        x = rng.uniform(-1, 1, (2, S, S, 3)).astype(np.float32)
        inputs = lambda dtype: dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                                    pixel_values=torch.tensor(x.transpose(0, 3, 1, 2), dtype=dtype))
        with torch.no_grad():
            hf_32, hf_64 = model(**inputs(torch.float32)), model_64(**inputs(torch.float64))
        img = np.asarray(align.embed_images(params, state, jnp.asarray(x), cfg))
        txt = np.asarray(align.embed_texts(params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32), cfg))
        for name, ours in (("image_embeds", img), ("text_embeds", txt)):
            ref = getattr(hf_64, name).numpy()
            ours_err, hf_err = np.abs(ours - ref).max(), np.abs(getattr(hf_32, name).numpy() - ref).max()
            assert ours_err <= SLACK * hf_err + ATOL, (name, S, ours_err, hf_err)
        # A comparison with meaning: the image embeddings depend on the image, not only on BatchNorm biases.
        ref = hf_64.image_embeds.numpy()
        assert np.abs(ref[0] - ref[1]).max() > 0.05
    return vision


@pytest.mark.parametrize("seed", range(8))
def test_random_align_configs_match_hf_float64(seed, tmp_path):
    _check_align_config(seed, tmp_path, deep=False)


@pytest.mark.parametrize("seed", [100, 101])
def test_deep_random_align_configs_match_hf_float64(seed, tmp_path):
    """Depth coefficient 3.1, as B7, with a stage of 4 blocks (13 after scaling)."""
    vision = _check_align_config(seed, tmp_path, deep=True)
    assert max(math.ceil(3.1 * r) for r in vision["num_block_repeats"]) >= 13


# ----------------------------------------------------------------------------------------------------
# The towers alone: BertModel and EfficientNetModel


def test_random_bert_model_configs_match_hf_float64(tmp_path):
    torch, transformers = _torch()
    rng = np.random.default_rng(7)
    for i in range(3):
        text = _text_config(rng)
        model = _realistic_weights(torch, transformers.BertModel(transformers.BertConfig(**text)), None, i)
        model_64 = copy.deepcopy(model).double()
        model.save_pretrained(tmp_path / str(i))
        params, cfg = bert.from_hf(str(tmp_path / str(i)))
        L = min(10, text["max_position_embeddings"])
        mask = (np.arange(L)[None] < np.array([[L], [3]])).astype(np.int64)
        ids = np.where(mask == 1, rng.integers(5, text["vocab_size"], (2, L)), text["pad_token_id"])
        with torch.no_grad():
            kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
            hf_32, ref = model(**kw).last_hidden_state.numpy(), model_64(**kw).last_hidden_state.numpy()
        ours = np.asarray(jax.jit(bert.apply, static_argnums=3)(params, ids, mask, cfg))
        valid = mask == 1
        ours_err, hf_err = np.abs(ours - ref)[valid].max(), np.abs(hf_32 - ref)[valid].max()
        assert ours_err <= SLACK * hf_err + ATOL, (text, ours_err, hf_err)


def test_efficientnet_model_config_with_every_field_changed(tmp_path):
    """EfficientNetModel (with its head conv, which we drop): the last block's global average."""
    torch, transformers = _torch()
    vision = _vision_config(np.random.default_rng(3))
    vision["hidden_dim"] = en.config_from_hf(vision).channels(1280)  # its head conv's width (HF requires this)
    model = transformers.EfficientNetModel(transformers.EfficientNetConfig(**vision))
    calibrate = torch.rand((4, 3, 33, 33), generator=torch.Generator().manual_seed(3)) * 2 - 1
    model = _realistic_weights(torch, model, calibrate, 3)
    model_64 = copy.deepcopy(model).double()
    model.save_pretrained(tmp_path)
    params, state, cfg = en.from_hf(str(tmp_path))
    assert cfg.bn_momentum == vision["batch_norm_momentum"]  # TF's convention, as the number was meant
    x = np.random.default_rng(0).uniform(-1, 1, (2, 33, 33, 3)).astype(np.float32)
    with torch.no_grad():
        pool = lambda m, dtype: m(torch.tensor(x.transpose(0, 3, 1, 2), dtype=dtype),
                                  output_hidden_states=True).hidden_states[-1].mean((2, 3)).numpy()
        hf_32, ref = pool(model, torch.float32), pool(model_64, torch.float64)
    ours = np.asarray(jax.jit(en.apply, static_argnums=3)(params, state, x, cfg)[0])
    scale = np.abs(ref).max()
    ours_err, hf_err = np.abs(ours - ref).max() / scale, np.abs(hf_32 - ref).max() / scale
    assert ours_err <= SLACK * hf_err + ATOL, (ours_err, hf_err)


# ----------------------------------------------------------------------------------------------------
# Configs we cannot express: one line that names the field


@pytest.mark.parametrize("tower,field,value", [
    ("text", "hidden_act", "prelu"),
    ("text", "position_embedding_type", "relative_key"),
    ("text", "is_decoder", True),
    ("vision", "pooling_type", "max"),
    ("vision", "strides", [1, 3, 2]),
    ("vision", "hidden_act", "xielu"),
    ("vision", "num_channels", 1),
    ("vision", "kernel_sizes", [3, 5]),  # one per stage
])
def test_inexpressible_configs_are_refused_naming_the_field(tower, field, value):
    if tower == "text":
        hf = dict(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                  max_position_embeddings=16, **{field: value})
        load = bert.config_from_hf
    else:
        hf = dict(width_coefficient=0.25, depth_coefficient=1.0, kernel_sizes=[3, 5, 3], strides=[1, 2, 2],
                  expand_ratios=[1, 6, 6], in_channels=[32, 16, 24], out_channels=[16, 24, 40],
                  num_block_repeats=[1, 2, 2])
        hf[field] = value
        load = en.config_from_hf
    with pytest.raises(ValueError, match=f"^HF config has {field}=") as e:
        load(hf)
    assert "\n" not in str(e.value)
