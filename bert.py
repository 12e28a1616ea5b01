"""BERT Tiny to Large, ALIGN's text tower, in plain JAX.

ALIGN (Jia et al. 2021) Sec. 4.1: "BERT with [CLS] token embedding as the text embedding encoder",
trained from scratch on a 100k WordPiece vocabulary, with sequences of at most 64 tokens (Sec. 5).
This is the encoder of Devlin et al. (2019): learned word, position and token-type embeddings, then
post-LayerNorm transformer layers with exact GELU. `apply` returns the last layer's hidden states;
ALIGN uses position 0, the [CLS] token.

    params = init(jax.random.key(0), CONFIGS['Base'])
    hidden_BLD = apply(params, ids_BL, mask_BL, CONFIGS['Base'])
    cls_BD = hidden_BLD[:, 0]

The layers are identical in shape, so their parameters are stacked on a leading axis and run with
`jax.lax.scan`: BERT-Large's 24 layers compile as one (on CPU, up to BERT-Base, the scan is unrolled:
`Config.layer_loop`).

Dimension key:
    B batch   L sequence length (queries)   M sequence length (keys)   D width
    N attention heads   K head width (64)   F feed-forward width (4D unless set)   V vocabulary   R layers

Deviations from google-research/bert and HF's BertModel:
- No dropout (ALIGN does not mention it; its data is 1.8B pairs seen for ~12 epochs).
- Token types are always 0 (ALIGN encodes one caption per sequence); the table exists so that HF
  checkpoints load unchanged. No pooler: ALIGN projects the [CLS] hidden state itself (align.py).
"""

import argparse
import dataclasses
import functools
import json
import math

import einops
import jax
import jax.numpy as jnp
import numpy as np

import weights


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    layers: int
    width: int
    head_width: int = 64            # Turc et al. 2019's compact BERTs keep 64-wide heads at every size
    vocab_size: int = 100_000       # ALIGN Sec. 4.1: a 100k WordPiece vocabulary built from its alt-texts
    max_len: int = 64               # ALIGN Sec. 5: "wordpiece sequence of maximum 64 tokens"
    type_vocab_size: int = 2
    ln_eps: float = 1e-12
    pad_id: int = 0
    intermediate: int = 0           # F, HF's intermediate_size; 0: 4 x width, as every BERT of Devlin et al.
    activation: str = "gelu"        # HF `hidden_act` name (weights.HF_ACTIVATIONS); BERT's is the exact erf GELU
    dtype: str = "float32"          # compute dtype of matmuls; LayerNorm and softmax run in float32
    remat: bool = False             # recompute each layer in the backward pass instead of storing it
    layer_loop: str = "auto"        # "scan": the layers' loop as one compiled layer (compile time flat in
                                    # depth); "unroll": every layer compiled on its own; "auto": unroll on
                                    # CPU up to BERT-Base's 12 layers, where a scan copies each layer's
                                    # weights out of the stack (BERT-Base alone 9% faster, compile 6 -> 10
                                    # s); BERT-Large keeps its scan, with L2 slower unrolled (BENCHMARKS.md)

    @property
    def heads(self):
        return self.width // self.head_width

    @property
    def ff_width(self):
        return self.intermediate or 4 * self.width


CONFIGS = {
    # Turc et al. 2019 ("Well-read students learn better"): Tiny L2/H128, Mini L4/H256, Small L4/H512,
    # Medium L8/H512; Devlin et al. 2019: Base L12/H768, Large L24/H1024. ALIGN Sec. 6.1 uses Mini-Large.
    "Tiny": Config("Tiny", 2, 128),
    "Mini": Config("Mini", 4, 256),
    "Small": Config("Small", 4, 512),
    "Medium": Config("Medium", 8, 512),
    "Base": Config("Base", 12, 768),
    "Large": Config("Large", 24, 1024),
}


# ----------------------------------------------------------------------------------------------------
# Initialisation


def _normal(key, shape):
    """google-research/bert `create_initializer`: truncated normal, std 0.02."""
    return jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32) * 0.02


def _dense(key, d_in, d_out):
    return {"kernel": _normal(key, (d_in, d_out)), "bias": jnp.zeros((d_out,), jnp.float32)}


def _layer_norm_init(d):
    return {"scale": jnp.ones((d,), jnp.float32), "bias": jnp.zeros((d,), jnp.float32)}


def _init_layer(key, cfg: Config):
    D, F = cfg.width, cfg.ff_width
    k = jax.random.split(key, 6)
    return {"query": _dense(k[0], D, D), "key": _dense(k[1], D, D), "value": _dense(k[2], D, D),
            "attention_out": _dense(k[3], D, D), "attention_ln": _layer_norm_init(D),
            "intermediate": _dense(k[4], D, F), "output": _dense(k[5], F, D), "output_ln": _layer_norm_init(D)}


@functools.partial(jax.jit, static_argnums=1)  # one program: run op by op, each op would compile alone
def init(key, cfg: Config):
    """Random parameters: {'embeddings': ..., 'layers': stacked over a leading axis of cfg.layers}."""
    k_word, k_pos, k_type, k_layers = jax.random.split(key, 4)
    return {
        "embeddings": {
            "word": _normal(k_word, (cfg.vocab_size, cfg.width)),
            "position": _normal(k_pos, (cfg.max_len, cfg.width)),
            "token_type": _normal(k_type, (cfg.type_vocab_size, cfg.width)),
            "ln": _layer_norm_init(cfg.width),
        },
        "layers": jax.vmap(lambda k: _init_layer(k, cfg))(jax.random.split(k_layers, cfg.layers)),
    }


# ----------------------------------------------------------------------------------------------------
# Layers


def _layer_norm(x_BLD, p, eps):
    """LayerNorm in float32 (bfloat16 statistics over 1024 features are too coarse), cast back."""
    x = x_BLD.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]
    return y.astype(x_BLD.dtype)


def _dense_apply(x, p):
    return x @ p["kernel"].astype(x.dtype) + p["bias"].astype(x.dtype)


def _layer(p, x_BLD, bias_BM, cfg: Config):
    """One post-LayerNorm transformer layer (Vaswani et al. 2017; BERT keeps the original order)."""
    # D = N heads x K features each; a head's K features are contiguous in the projection's output.
    heads = lambda x_BLD: einops.rearrange(x_BLD, "b l (n k) -> b l n k", n=cfg.heads)
    q_BLNK = heads(_dense_apply(x_BLD, p["query"]))
    k_BMNK = heads(_dense_apply(x_BLD, p["key"]))
    v_BMNK = heads(_dense_apply(x_BLD, p["value"]))
    # Scores and softmax in float32: the padding bias is -1e9-like and bfloat16 exp loses the ordering.
    s_BNLM = jnp.einsum("blnk,bmnk->bnlm", q_BLNK, k_BMNK, preferred_element_type=jnp.float32)
    s_BNLM = s_BNLM / math.sqrt(cfg.head_width) + bias_BM[:, None, None, :]
    w_BNLM = jax.nn.softmax(s_BNLM, axis=-1).astype(x_BLD.dtype)
    a_BLD = einops.rearrange(jnp.einsum("bnlm,bmnk->blnk", w_BNLM, v_BMNK), "b l n k -> b l (n k)")
    x_BLD = _layer_norm(x_BLD + _dense_apply(a_BLD, p["attention_out"]), p["attention_ln"], cfg.ln_eps)
    h_BLF = weights.HF_ACTIVATIONS[cfg.activation](_dense_apply(x_BLD, p["intermediate"]))
    return _layer_norm(x_BLD + _dense_apply(h_BLF, p["output"]), p["output_ln"], cfg.ln_eps)


def apply(params, ids_BL, mask_BL, cfg: Config):
    """Last-layer hidden states [B, L, D] in the compute dtype; ALIGN takes [:, 0], the [CLS] token.

    mask_BL: 1 for real tokens, 0 for padding. Padded keys get a large negative attention bias, so no
    real token (and in particular not [CLS]) can see them.
    """
    L = ids_BL.shape[1]
    if L > cfg.max_len:
        raise ValueError(f"sequence length {L} exceeds the model's max_len {cfg.max_len}; "
                         f"encode with max_len={cfg.max_len}")
    dtype = jnp.dtype(cfg.dtype)
    e = params["embeddings"]
    x_BLD = e["word"][ids_BL] + e["position"][:L][None] + e["token_type"][0]
    x_BLD = _layer_norm(x_BLD, e["ln"], cfg.ln_eps).astype(dtype)
    # As HF: the most negative float32, so a padded key's weight is exactly 0 after the softmax.
    bias_BM = jnp.where(mask_BL.astype(bool), 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)

    layer_fn = lambda x, p: (_layer(p, x, bias_BM, cfg), None)
    if cfg.remat:
        layer_fn = jax.checkpoint(layer_fn)
    unroll = weights.unrolled(cfg.layer_loop, cfg.layers, 12, "bert.Config.layer_loop")  # up to BERT-Base
    x_BLD, _ = jax.lax.scan(layer_fn, x_BLD, params["layers"], unroll=unroll)
    return x_BLD


# ----------------------------------------------------------------------------------------------------
# HuggingFace checkpoints (BertModel, AlignTextModel)

_HF_LAYER = {  # ours -> HF module path inside encoder.layer.{i}
    "query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
    "attention_out": "attention.output.dense", "attention_ln": "attention.output.LayerNorm",
    "intermediate": "intermediate.dense", "output": "output.dense", "output_ln": "output.LayerNorm",
}
_HF_EMBEDDINGS = {"word": "word_embeddings", "position": "position_embeddings",
                  "token_type": "token_type_embeddings", "ln": "LayerNorm"}


def config_from_hf(hf: dict, name="hf") -> Config:
    """Our Config for an HF BertConfig / AlignTextConfig (as a dict from config.json).

    Every field that changes what an encoder-only BertModel computes is read; one this encoder cannot
    express raises a one-line ValueError naming the field. (`pad_token_id` only zeroes HF's initial
    padding row; the weights carry it.)
    """
    def refuse(field, why):
        raise ValueError(f"HF config has {field}={hf.get(field)!r}: {why}")

    if hf.get("hidden_act", "gelu") not in weights.HF_ACTIVATIONS:
        refuse("hidden_act", f"supported: {', '.join(weights.HF_ACTIVATIONS)}")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        refuse("position_embedding_type", "only absolute (learned) position embeddings are implemented")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        refuse("is_decoder" if hf.get("is_decoder") else "add_cross_attention", "this BERT is an encoder")
    width, heads = hf["hidden_size"], hf["num_attention_heads"]
    if width % heads:
        refuse("num_attention_heads", f"does not divide hidden_size={width}")
    return Config(name, hf["num_hidden_layers"], width, head_width=width // heads, vocab_size=hf["vocab_size"],
                  max_len=hf["max_position_embeddings"], type_vocab_size=hf.get("type_vocab_size", 2),
                  ln_eps=hf.get("layer_norm_eps", 1e-12), pad_id=hf.get("pad_token_id", 0) or 0,
                  intermediate=hf.get("intermediate_size", 4 * width), activation=hf.get("hidden_act", "gelu"))


def _leaf_pairs(node):
    """(our leaf, HF suffix, transpose?) for a dense or LayerNorm parameter dict."""
    if "kernel" in node:
        return [("kernel", "weight", True), ("bias", "bias", False)]
    return [("scale", "weight", False), ("bias", "bias", False)]


def from_hf_state_dict(sd, cfg: Config, prefix=""):
    """Parameters from an HF BERT state dict of numpy arrays (torch Linear weights are [out, in])."""
    get = lambda name: np.asarray(weights.take(sd, prefix + name), np.float32)
    template = jax.eval_shape(lambda: init(jax.random.key(0), cfg))
    emb = {}
    for ours, theirs in _HF_EMBEDDINGS.items():
        if ours == "ln":
            emb["ln"] = {"scale": get("embeddings.LayerNorm.weight"), "bias": get("embeddings.LayerNorm.bias")}
        else:
            emb[ours] = get(f"embeddings.{theirs}.weight")
    layers = {}
    for ours, theirs in _HF_LAYER.items():
        layers[ours] = {}
        for leaf, suffix, transpose in _leaf_pairs(template["layers"][ours]):
            stack = [get(f"encoder.layer.{i}.{theirs}.{suffix}") for i in range(cfg.layers)]
            layers[ours][leaf] = np.stack([a.T if transpose else a for a in stack])
    params = {"embeddings": emb, "layers": layers}
    got = jax.tree.map(np.shape, params)
    if got != jax.tree.map(lambda a: a.shape, template):
        raise ValueError(f"BERT checkpoint shapes do not match the config {cfg}")
    return params


def to_hf_state_dict(params, cfg: Config, prefix=""):
    """The inverse of `from_hf_state_dict`: HF names and torch layouts, as numpy arrays."""
    sd = {}
    for ours, theirs in _HF_EMBEDDINGS.items():
        if ours == "ln":
            sd["embeddings.LayerNorm.weight"] = params["embeddings"]["ln"]["scale"]
            sd["embeddings.LayerNorm.bias"] = params["embeddings"]["ln"]["bias"]
        else:
            sd[f"embeddings.{theirs}.weight"] = params["embeddings"][ours]
    for ours, theirs in _HF_LAYER.items():
        for leaf, suffix, transpose in _leaf_pairs(params["layers"][ours]):
            for i in range(cfg.layers):
                a = np.asarray(params["layers"][ours][leaf][i])
                sd[f"encoder.layer.{i}.{theirs}.{suffix}"] = a.T if transpose else a
    return {prefix + k: np.asarray(v, np.float32) for k, v in sd.items()}


def from_hf(path_or_state_dict, config=None, prefix=None):
    """(params, cfg) from an HF BertModel / AlignTextModel directory or state dict (see weights.read_hf)."""
    sd, hf_cfg = weights.read_hf(path_or_state_dict, config)
    cfg = config_from_hf(hf_cfg.get("text_config", hf_cfg))
    if prefix is None:
        prefix = weights.find_prefix(sd, "embeddings.word_embeddings.weight")
    return from_hf_state_dict(sd, cfg, prefix), cfg


# ----------------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description="BERT text towers for ALIGN: the size table.")
    ap.add_argument("--vocab-size", type=int, default=Config.vocab_size, help="default: ALIGN's 100k WordPiece")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args()
    rows = []
    for name, cfg in CONFIGS.items():
        cfg = dataclasses.replace(cfg, vocab_size=args.vocab_size)
        total = weights.count_params(jax.eval_shape(lambda: init(jax.random.key(0), cfg)))
        rows.append({"variant": name, "layers": cfg.layers, "width": cfg.width, "heads": cfg.heads,
                     "params": total, "params_without_embeddings": total - cfg.vocab_size * cfg.width,
                     "features": cfg.width})
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"| variant | layers | width | heads | params ({args.vocab_size} vocab) | without word embeddings | [CLS] width |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['layers']} | {r['width']} | {r['heads']} | {r['params'] / 1e6:.1f}M "
              f"| {r['params_without_embeddings'] / 1e6:.1f}M | {r['features']} |")


if __name__ == "__main__":
    main()
