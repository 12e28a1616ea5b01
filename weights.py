"""Weight files with numpy only: safetensors, and HuggingFace `save_pretrained` directories.

A downloaded checkpoint is data, not code: safetensors is a JSON header plus raw little-endian
buffers, so it is mapped here with `np.memmap` and nothing is ever unpickled. A directory holding only
`pytorch_model.bin` (a pickle) is refused with a hint to convert it.

Format (https://github.com/huggingface/safetensors): 8 bytes little-endian header length N, N bytes of
JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the data.
"""

import functools
import json
import math
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
           "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


# HF `hidden_act` names (transformers' ACT2FN) that bert.Config.activation and efficientnet.Config.activation
# accept, as JAX functions. "gelu_new", "gelu_fast",
# "gelu_accurate" and "gelu_pytorch_tanh" are all the tanh approximation of GELU, written differently.
_gelu, _gelu_tanh = (functools.partial(jax.nn.gelu, approximate=a) for a in (False, True))
HF_ACTIVATIONS = {
    "gelu": _gelu, "gelu_python": _gelu, "gelu_10": lambda x: jnp.clip(_gelu(x), -10, 10),
    "gelu_new": _gelu_tanh, "gelu_fast": _gelu_tanh, "gelu_accurate": _gelu_tanh, "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_python_tanh": _gelu_tanh,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu, "relu2": lambda x: jnp.square(jax.nn.relu(x)), "relu6": jax.nn.relu6,
    "leaky_relu": jax.nn.leaky_relu, "silu": jax.nn.silu, "swish": jax.nn.silu, "mish": jax.nn.mish,
    "hardswish": jax.nn.hard_swish, "tanh": jnp.tanh, "sigmoid": jax.nn.sigmoid, "linear": lambda x: x,
}


def unrolled(loop, depth, limit, field):
    """Whether a tower's loop over its `depth` stacked layers is unrolled: `loop` is the config's `field`,
    "scan", "unroll" or "auto" (unrolled on CPU up to `limit` layers: efficientnet.Config.block_loop,
    bert.Config.layer_loop)."""
    if loop not in ("auto", "scan", "unroll"):
        raise ValueError(f"{field} is {loop!r}: one of auto, scan, unroll")
    return loop == "unroll" or (loop == "auto" and jax.default_backend() == "cpu" and depth <= limit)


def count_params(tree):
    """How many numbers a tree of arrays holds. Give it shapes to count without allocating, e.g.
    `count_params(jax.eval_shape(lambda: bert.init(jax.random.key(0), cfg)))`."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def read_safetensors(path):
    """{name: numpy array} from a .safetensors file. bfloat16 tensors are widened to float32.

    The file is mapped (read-only), not read: an L2 checkpoint with its optimizer state is about 10 GB,
    and a tensor's pages are read only when it is used. The arrays keep the mapping open after this
    returns and are not writable, so nothing can write through them into the file. (Files are replaced
    by renaming, `atomic_write`, never rewritten in place, so a mapping never sees a file change.) On CPU,
    `jax.device_put` may use the mapped pages without a copy; a step that donates its arguments still
    writes its results elsewhere (test_train.py resumes from mapped checkpoints).
    """
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    size = os.path.getsize(path) - 8 - n
    # np.asarray: plain ndarray views of the map (not np.memmap subclasses); their .base holds the map open.
    # (np.memmap refuses an empty map: a file of empty tensors.)
    data = (np.asarray(np.memmap(path, np.uint8, mode="r", offset=8 + n, shape=(size,))) if size
            else np.empty(0, np.uint8))
    out = {}
    for name, t in header.items():
        begin, end = t["data_offsets"]
        buf = data[begin:end]
        if t["dtype"] == "BF16":  # numpy has no bfloat16: it is the top half of a float32 (a copy, in memory)
            a = (buf.view("<u2").astype(np.uint32) << 16).view(np.float32)
        elif t["dtype"] in _DTYPES:
            a = buf.view(np.dtype(_DTYPES[t["dtype"]]).newbyteorder("<"))
        else:
            raise ValueError(f"{path}: tensor {name!r} has dtype {t['dtype']}, which this reader does not know")
        out[name] = a.reshape(t["shape"])
    return out


def write_safetensors(path, tensors, metadata=None):
    """Write {name: array} as safetensors, atomically (a temporary file renamed into place)."""
    header, offset, arrays = {}, 0, []
    for name in sorted(tensors):
        a = np.asarray(tensors[name])  # (not np.ascontiguousarray: it turns 0-d scalars into shape [1])
        a = np.array(a, dtype=a.dtype.newbyteorder("<"), order="C")
        header[name] = {"dtype": _NAMES[np.dtype(a.dtype.type)], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    header["__metadata__"] = {"format": "pt", **(metadata or {})}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    def write(f):
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays:
            f.write(a.tobytes())

    atomic_write(path, write)


def atomic_write(path, write):
    """Call write(f) on a temporary file, then rename it to `path`: a reader sees the whole file or none."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_hf(path_or_state_dict, config=None):
    """(state dict of numpy arrays, config dict) from a `save_pretrained` directory or a state dict.

    A state dict may hold numpy arrays or torch tensors; `config` is then the HF config, as a dict or
    an object with `to_dict()`.
    """
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        path = os.fspath(path_or_state_dict)
        st = os.path.join(path, "model.safetensors")
        if not os.path.exists(st):
            if os.path.exists(os.path.join(path, "pytorch_model.bin")):
                raise ValueError(f"{path} holds pytorch_model.bin (a pickle, which we never load); convert it "
                                 "once with transformers: AutoModel.from_pretrained(path).save_pretrained(out, "
                                 "safe_serialization=True)")
            if os.path.exists(os.path.join(path, "model.safetensors.index.json")):
                with open(os.path.join(path, "model.safetensors.index.json")) as f:
                    files = sorted(set(json.load(f)["weight_map"].values()))
                sd = {}
                for name in files:
                    sd.update(read_safetensors(os.path.join(path, name)))
            else:
                raise FileNotFoundError(f"{path}: no model.safetensors; expected a directory written by "
                                        "HF save_pretrained")
        else:
            sd = read_safetensors(st)
        with open(os.path.join(path, "config.json")) as f:
            return sd, json.load(f)
    if config is None:
        raise ValueError("a state dict needs its HF config: pass config= (a dict or a transformers config)")
    config = config if isinstance(config, dict) else config.to_dict()
    sd = {k: (v.detach().cpu().float().numpy() if hasattr(v, "detach") and v.is_floating_point()
              else np.asarray(v)) for k, v in path_or_state_dict.items()}
    return sd, config


def take(sd, name):
    """sd[name], with an error that names the missing tensor."""
    if name not in sd:
        raise KeyError(f"checkpoint has no tensor {name!r}: is it the right model and config?")
    return sd[name]


def find_prefix(sd, suffix):
    """The prefix in front of `suffix` in sd's names ('' or e.g. 'vision_model.')."""
    for name in sorted(sd, key=len):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    raise KeyError(f"checkpoint has no tensor ending in {suffix!r}: is it the right model?")


def tree_to_flat(tree):
    """{'a/b/0/c': array} for a nested dict/list tree, the names safetensors files use."""
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        flat[name] = np.asarray(leaf)
    return flat


def flat_to_tree(flat, template):
    """Inverse of `tree_to_flat`, shaped like `template` (e.g. from jax.eval_shape of an init)."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    leaves = []
    for path, like in paths:
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        if name not in flat:
            raise ValueError(f"the checkpoint has no tensor {name!r}, which the model expects: "
                             "was it saved from another size?")
        a = flat[name]
        if tuple(a.shape) != tuple(like.shape):
            raise ValueError(f"tensor {name!r} has shape {tuple(a.shape)}, the model expects {tuple(like.shape)}: "
                             "was it saved from another size?")
        leaves.append(a)
    return jax.tree_util.tree_unflatten(treedef, leaves)
