"""Train ALIGN: the paper's recipe (Sec. 5) at every size, one CPU to many hosts.

    python train.py                       # tiny model, synthetic data, this CPU, a few minutes
    python train.py --size L2 --data 'shards/{00000..99999}.tar' --vocab vocab.txt --out runs/l2
    python train.py --size L2 --memory-report --remat   # one device's memory for a step: compiled, not run

The step is data parallel over one `data` mesh axis spanning every device of every process: each
device holds its slice of the global batch, the parameters are replicated, and the loss is ALIGN's
global-batch contrastive loss (align.py), whose negatives are every pair on every device. Parameter
gradients are averaged over the axis (the contract in `align.contrastive_loss`).

Checkpoints (`OUT/ckpt_<step>/`): a model directory of `align.save` (weights, BatchNorm state, config,
vocab) plus the optimizer state and `train_state.json` (step, data position, counters). A checkpoint is
written under a temporary name and renamed into place, so a kill never leaves a half-written one; the
last `--keep` are kept; the same command started again resumes from the newest.

Deviations from the paper's recipe, and details it leaves open:
- LAMB's trust ratio applies only to the parameters that get weight decay (matrices, kernels, embedding
  tables), as in TF Model Garden's and timm's LAMB; biases, BatchNorm/LayerNorm parameters and the
  log-temperature take Adam's step. The paper names LAMB and nothing finer.
- BatchNorm running averages are averaged over devices after each step, so the state stays replicated
  (the batch statistics used in the forward pass stay per device, as on the paper's TPUs).
"""

import argparse
import dataclasses
import functools
import json
import math
import os
import shutil
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import align
import bert
import data
import efficientnet as en
import evaluate
import synthetic
import weights
import wordpiece

P = jax.sharding.PartitionSpec


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Optimisation and data settings; model shape comes from align.SIZES plus overrides."""
    batch_size: int = 16384          # Sec. 5: 1024 TPUv3 cores x 16 pairs
    steps: int = 1_200_000           # Sec. 5: "linearly decay to zero in 1.2M steps (~12 epochs)"
    lr: float = 1e-3                 # Sec. 5: warmed up linearly to 1e-3 ...
    warmup_steps: int = 10_000       # ... from zero in 10k steps
    weight_decay: float = 1e-5       # Sec. 5: LAMB with weight decay ratio 1e-5
    label_smoothing: float = 0.1     # Sec. 5
    temperature_init: float = 1.0    # Sec. 5
    negatives_fraction: float = 1.0  # Table 8 rows 5-6: score each pair against only this share of the batch
    image_size: int = 289            # Sec. 5: 346 resize, 289 crop
    dtype: str = "bfloat16"
    optimizer: str = "lamb"          # Sec. 5: LAMB (You et al. 2020); "adamw" for short small-batch runs
    log_every: int = 100
    ckpt_every: int = 5000
    eval_every: int = 0


RECIPES = {
    "L2": Recipe(),
    # Sec. 6.1: "We reduce the training steps to 1M in ablation"; the ablation models are B1-B7.
    **{s: Recipe(steps=1_000_000) for s in ("B1", "B3", "B5", "B7")},
    # Made up for a 2-core CPU (README, "Training"): 300 steps of 128 pairs at 32 px. Held-out R@1 on the
    # synthetic data, for the same number of images: 500 x 64 pairs 17%, 250 x 128 20%, 150 x 256 17%
    # (at lr 4e-3; the step costs about the same per image). Two changes from the paper's recipe make a
    # short run learn:
    # - AdamW, not LAMB: LAMB's step is lr x each layer's norm (made for batch 32k, You et al. 2020),
    #   slow here: R@1 0.6% after 500 steps of 64 at lr 1e-2, AdamW 6% at 3e-3 (README, "Training").
    # - temperature from 0.07 (CLIP's), not 1.0: Adam moves the log-temperature by about lr per step,
    #   so in 400 steps it only got from 1.0 to 0.47, where the logits cannot separate 64 pairs.
    "tiny": Recipe(batch_size=128, steps=300, lr=3e-3, warmup_steps=50, image_size=32, dtype="float32",
                   optimizer="adamw", temperature_init=0.07, log_every=50, ckpt_every=150, eval_every=0),
}
# Sec. 5.1: fine-tuning for retrieval, batch 2048, learning rate 1e-5, 3k (Flickr30K) / 6k (MSCOCO) steps.
FINETUNE = {"flickr30k": dict(batch_size=2048, lr=1e-5, steps=3000, warmup_steps=0),
            "mscoco": dict(batch_size=2048, lr=1e-5, steps=6000, warmup_steps=0)}


class UsageError(Exception):
    """A problem with the command line or inputs: printed as one line, no traceback."""


# ----------------------------------------------------------------------------------------------------
# Configuration


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Train ALIGN (Jia et al. 2021).",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--size", default="tiny", help=f"one of {list(align.SIZES)}")
    ap.add_argument("--image-tower", help=f"override: one of {list(en.CONFIGS)}")
    ap.add_argument("--text-tower", help=f"override: one of {list(bert.CONFIGS)}")
    ap.add_argument("--embed-dim", type=int)
    ap.add_argument("--finetune", choices=list(FINETUNE), help="Sec. 5.1 retrieval fine-tuning recipe")
    for field in dataclasses.fields(Recipe):
        ap.add_argument("--" + field.name.replace("_", "-"), type=field.type if field.type != "str" else str,
                        help="default: the size's recipe")
    ap.add_argument("--fixed-temperature", type=float,
                    help="a fixed softmax temperature instead of a learned one (Table 8 rows 7-9: 1/128, 1/64, 1/32)")
    ap.add_argument("--data", default="synthetic", help="tar shards (brace/glob/list), a TSV/CSV, or synthetic")
    ap.add_argument("--eval-data", help="held-out data for retrieval (default: synthetic's held-out split); a "
                                        "Karpathy JSON is scored on its val split, every caption of each image")
    ap.add_argument("--images", help="the image folder of a Karpathy JSON given as --data or --eval-data")
    ap.add_argument("--vocab", help="WordPiece vocab.txt (default: the synthetic data's vocabulary)")
    ap.add_argument("--out", default="runs/tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", help="start from this model: a checkpoint, a run's --out or an HF AlignModel "
                                   "directory (its architecture, image size and text length; required by --finetune)")
    ap.add_argument("--remat", action="store_true", help="recompute blocks in the backward pass")
    ap.add_argument("--micro-batch", type=int,
                    help="pairs per device per forward/backward pass: exact micro-batching of a large batch on few "
                         "devices, equal to more devices holding this many pairs each (README)")
    ap.add_argument("--shard-optimizer", action="store_true",
                    help="split the optimizer state over the devices (ZeRO stage 1) instead of replicating it")
    ap.add_argument("--bn-across-devices", action="store_true",
                    help="average BatchNorm batch statistics over all devices (default: per device, as the paper)")
    ap.add_argument("--keep", type=int, default=3, help="checkpoints to keep")
    ap.add_argument("--workers", type=int, default=None, help="data decoding processes (default: cores - 1)")
    ap.add_argument("--max-skipped-steps", type=int, default=10,
                    help="stop when this many consecutive steps have a non-finite loss or gradient")
    ap.add_argument("--max-bad-fraction", type=float, default=0.5,
                    help="checkpoint and stop when more than this fraction of the last --bad-window samples failed "
                         "to load (bad samples are otherwise skipped and counted; 1 never stops)")
    ap.add_argument("--bad-window", type=int, default=1000, help="samples that --max-bad-fraction looks back over")
    ap.add_argument("--coordinator", help="HOST:PORT of process 0, for multi-host without auto-detection")
    ap.add_argument("--num-processes", type=int)
    ap.add_argument("--process-id", type=int)
    ap.add_argument("--skip-final-eval", action="store_true", help="do not run held-out retrieval at the end")
    ap.add_argument("--stop-after", type=int, help="checkpoint and exit after this many steps, as on preemption")
    ap.add_argument("--memory-report", action="store_true",
                    help="print one device's memory for a training step (compiled, not run; 16 pairs per device "
                         "unless --batch-size) as a README table row, and exit")
    ap.add_argument("--devices", type=int, help=argparse.SUPPRESS)  # tests: the first N devices of one process
    ap.add_argument("--plant-nan-at", type=int, help=argparse.SUPPRESS)  # tests: a NaN batch at this step
    ap.add_argument("--pause-in-checkpoint", type=int, help=argparse.SUPPRESS)  # tests: hang writing this step's
    return ap.parse_args(argv)


def resolve(args, init_cfg=None):
    """(model config, recipe) from --size plus overrides, or from `init_cfg` (--init's model); errors are
    UsageError one-liners.

    With --init the model is --init's: its towers, embedding width, image size and text length (an HF
    directory's text length is Sec. 5's 64, `init_model`). --finetune takes the paper's pre-training
    recipe with Sec. 5.1's changes, "all the other hyper-parameters are kept the same as pre-training";
    without it the recipe is --size's. Every value can still be overridden from the command line.
    """
    if args.size not in align.SIZES:
        raise UsageError(f"unknown --size {args.size!r}; choose one of {list(align.SIZES)}")
    if args.finetune and init_cfg is None:
        raise UsageError(f"--finetune {args.finetune} needs --init: the pre-trained model to fine-tune (a model "
                         "directory, a training run's --out, or an HF AlignModel directory)")
    if init_cfg is not None and (args.image_tower or args.text_tower or args.embed_dim):
        raise UsageError("--image-tower, --text-tower and --embed-dim do not apply with --init: the model is --init's")
    recipe = Recipe() if args.finetune else RECIPES[args.size]
    if args.finetune:
        recipe = dataclasses.replace(recipe, **FINETUNE[args.finetune])
    if init_cfg is not None:
        recipe = dataclasses.replace(recipe, image_size=init_cfg.image_size)
    recipe = dataclasses.replace(recipe, **{f.name: getattr(args, f.name) for f in dataclasses.fields(Recipe)
                                            if getattr(args, f.name) is not None})
    if recipe.optimizer not in ("lamb", "adamw"):
        raise UsageError(f"unknown --optimizer {recipe.optimizer!r}; choose lamb (the paper's) or adamw")
    cfg = align.SIZES[args.size] if init_cfg is None else init_cfg
    if args.image_tower:
        if args.image_tower not in en.CONFIGS:
            raise UsageError(f"unknown --image-tower {args.image_tower!r}; choose one of {list(en.CONFIGS)}")
        cfg = dataclasses.replace(cfg, image=en.CONFIGS[args.image_tower])
    if args.text_tower:
        if args.text_tower not in bert.CONFIGS:
            raise UsageError(f"unknown --text-tower {args.text_tower!r}; choose one of {list(bert.CONFIGS)}")
        cfg = dataclasses.replace(cfg, text=bert.CONFIGS[args.text_tower])
    f, n = recipe.negatives_fraction, recipe.batch_size
    if not (0 < f <= 1 and abs(round(f * n) - f * n) < 1e-6 and n % round(f * n) == 0):
        raise UsageError(f"--negatives-fraction {f} must split the batch of {n} into equal groups (e.g. 0.5, 0.25)")
    if args.fixed_temperature is not None:
        if not args.fixed_temperature > 0:
            raise UsageError(f"--fixed-temperature {args.fixed_temperature} must be positive (Table 8: 1/128 = 0.0078125)")
        if init_cfg is not None:
            raise UsageError("--fixed-temperature does not apply with --init: the model's temperature is --init's")
        recipe = dataclasses.replace(recipe, temperature_init=args.fixed_temperature)
    if init_cfg is None:
        cfg = dataclasses.replace(cfg, learn_temperature=args.fixed_temperature is None,
                                  temperature_init=recipe.temperature_init)
    cfg = dataclasses.replace(cfg, embed_dim=args.embed_dim or cfg.embed_dim, image_size=recipe.image_size,
                              image=dataclasses.replace(cfg.image, dtype=recipe.dtype, remat=args.remat),
                              text=dataclasses.replace(cfg.text, dtype=recipe.dtype, remat=args.remat))
    return cfg, recipe


# ----------------------------------------------------------------------------------------------------
# Optimiser and step


def _is_stacked(path):
    """Leaves stacked over layers: EfficientNet stages' 'rest' blocks and BERT's 'layers'."""
    names = [getattr(k, "key", None) for k in path]
    return "rest" in names or names[:2] == ["text", "layers"]


def decay_mask(params):
    """True for the leaves that get weight decay and LAMB's trust ratio: weight matrices, conv kernels and
    embedding tables; False for biases, BatchNorm/LayerNorm parameters and the temperature.

    A leaf's rank tells them apart, counting a stacked leaf's layer axis out: matrices and kernels have
    two or more axes, the rest are vectors or scalars.
    """
    return jax.tree_util.tree_map_with_path(lambda path, x: x.ndim - _is_stacked(path) >= 2, params)


def scale_by_layer_trust_ratio(mask):
    """LAMB's trust ratio |w| / |u| (You et al. 2020, Algorithm 2), one per layer, on `mask`'s leaves only.

    The other leaves keep the plain Adam step, as TF Model Garden's LAMB (`exclude_from_layer_adaptation`
    defaults to the weight-decay exclusions) and timm's (`always_adapt=False`) do: a bias or a BatchNorm
    offset starts at 0, and a step proportional to its norm would leave it there, growing by (1 + lr) per
    step from rounding. optax computes the ratio per leaf, but our scanned blocks and BERT layers are
    stacked on a leading axis: those leaves get one ratio per slice of that axis, as separate layers would.
    """
    def update(updates, state, params):
        def one(path, u, p, adapt):
            if not adapt:
                return u
            axes = tuple(range(1, u.ndim)) if _is_stacked(path) else None
            p_norm = jnp.sqrt(jnp.sum(jnp.square(p), axis=axes, keepdims=True))
            u_norm = jnp.sqrt(jnp.sum(jnp.square(u), axis=axes, keepdims=True))
            return u * jnp.where((p_norm > 0) & (u_norm > 0), p_norm / u_norm, 1.0)
        return jax.tree_util.tree_map_with_path(one, updates, params, mask(params)), state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(recipe: Recipe, params):
    """LAMB (or AdamW) with weight decay on weight matrices only, warm-up then linear decay (Sec. 5).

    Returns (optimizer, learning-rate schedule). `params` is unused beyond its structure: the masks are
    functions of the tree, so the optimizer applies to any tree of the same shape.
    """
    del params
    lr = optax.join_schedules([optax.linear_schedule(0.0, recipe.lr, max(recipe.warmup_steps, 1)),
                               optax.linear_schedule(recipe.lr, 0.0, max(recipe.steps - recipe.warmup_steps, 1))],
                              [recipe.warmup_steps])
    if recipe.optimizer == "lamb":  # optax.lamb's chain with the masked, per-layer trust ratio above
        return optax.chain(optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-6),
                           optax.add_decayed_weights(recipe.weight_decay, decay_mask),
                           scale_by_layer_trust_ratio(decay_mask), optax.scale_by_learning_rate(lr)), lr
    # The same without the trust ratio: AdamW's step is absolute, not relative to each layer's norm.
    return optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-6, weight_decay=recipe.weight_decay, mask=decay_mask), lr


def batch_gradients(params, state, pixels, ids, mask, rng, *, cfg, recipe, bn_axis=None, micro_batch=None):
    """One device's part of a step, inside shard_map over `data`: (gradients of the global-batch loss,
    new BatchNorm state, metrics), all replicated.

    Without `micro_batch` (or when it is the device's whole batch): one forward and backward pass over
    the device's pairs. With it, exact micro-batching (GradCache, Gao et al. 2021): the device's B pairs
    are K = B / M micro-batches of M, and the step equals one over D x K devices holding M pairs each
    (D: this mesh's devices) -- the same loss, gradients and BatchNorm update:
      1. embed every micro-batch in turn, keeping no activations: the global batch's features [B, E];
      2. the global-batch loss (all-gathered over devices as always) and its gradient with respect to
         every feature and the temperature;
      3. embed each micro-batch again, now with its activations, and back-propagate its slice of those
         gradients into the towers' parameters, summing over micro-batches and devices.
    Only one micro-batch's activations live at a time, plus the features and their gradients; the cost
    is one more forward pass of the towers (step 3 recomputes step 1's). Each micro-batch normalises
    with its own BatchNorm statistics and draws its own stochastic depth (folded by its global index
    d x K + k, as a device's is by d), and the running averages are the mean of the micro-batches'
    updates, as they are the mean of the devices'.
    """
    d = jax.lax.axis_index("data")
    loss_kw = dict(axis_name="data", label_smoothing=recipe.label_smoothing,
                   negatives_fraction=recipe.negatives_fraction)
    k_micro = pixels.shape[0] // micro_batch if micro_batch else 1
    if k_micro == 1:
        (loss, (logged, new_state)), grads = jax.value_and_grad(align.train_loss, has_aux=True)(
            params, state, pixels, ids, mask, cfg, jax.random.fold_in(rng, d), bn_axis_name=bn_axis, **loss_kw)
        grads = jax.lax.pmean(grads, "data")  # align.contrastive_loss's contract: pmean, never psum
        return grads, jax.lax.pmean(new_state, "data"), logged  # keep BatchNorm's running averages replicated

    def micro(x):  # [B, ...] -> [K, M, ...]: micro-batch k holds the device's rows k*M ... (k+1)*M - 1
        return x.reshape(k_micro, micro_batch, *x.shape[1:])

    batches = (micro(pixels), micro(ids), micro(mask), jax.vmap(lambda k: jax.random.fold_in(rng, d * k_micro + k))(
        jnp.arange(k_micro)))

    def towers(p, batch):
        pixels, ids, mask, rng = batch
        return align.train_features(p, state, pixels, ids, mask, cfg, rng)

    # 1. Features of every micro-batch; a loop keeps one micro-batch's activations at a time.
    (img_KME, txt_KME), states = jax.lax.map(lambda batch: towers(params, batch), batches)
    flat = lambda x_KME: x_KME.reshape(-1, x_KME.shape[-1])
    # 2. The loss of the global batch and its gradient with respect to the features and the temperature.
    scalars = {k: v for k, v in params.items() if k == "temperature"}
    (_, logged), (g_img_BE, g_txt_BE, g_scalars) = jax.value_and_grad(
        lambda img, txt, p: align.features_loss(img, txt, p, cfg, **loss_kw), argnums=(0, 1, 2), has_aux=True)(
        flat(img_KME), flat(txt_KME), scalars)

    # 3. Back-propagate each micro-batch's feature gradients. The parameters are marked as varying over
    # the devices so that each device sums only its own micro-batches' contributions, added over
    # devices once at the end (the gradient of replicated parameters would otherwise be summed over
    # devices inside every iteration).
    local = jax.lax.pcast(params, "data", to="varying")

    def backward(total, batch_and_cotangent):
        batch, cotangent = batch_and_cotangent
        _, pull_back = jax.vjp(lambda p: towers(p, batch)[0], local)
        return jax.tree.map(jnp.add, total, pull_back(cotangent)[0]), None

    grads, _ = jax.lax.scan(backward, jax.tree.map(jnp.zeros_like, local),
                            (batches, (micro(g_img_BE), micro(g_txt_BE))))
    grads = jax.lax.psum(grads, "data")
    grads.update({k: grads[k] + g for k, g in g_scalars.items()})
    new_state = jax.tree.map(lambda x: x.mean(axis=0), states)  # the mean of the micro-batches' updates
    return grads, jax.lax.pmean(new_state, "data"), logged


def shard_over_devices(tree, mesh):
    """Shardings that split each leaf over the `data` axis along its largest dimension that the devices
    divide (ZeRO, Rajbhandari et al. 2020); leaves that no dimension of fits (scalars, small vectors)
    stay replicated."""
    n = mesh.shape["data"]

    def one(x):
        axes = [a for a in range(x.ndim) if x.shape[a] % n == 0 and x.shape[a] >= n]
        if not axes:
            return jax.sharding.NamedSharding(mesh, P())
        spec = [None] * x.ndim
        spec[max(axes, key=lambda a: x.shape[a])] = "data"
        return jax.sharding.NamedSharding(mesh, P(*spec))
    return jax.tree.map(one, tree)


def opt_shardings(opt_state, mesh, shard_optimizer):
    """Where the optimizer state lives: split over the devices (`shard_over_devices`), or replicated."""
    if shard_optimizer:
        return shard_over_devices(opt_state, mesh)
    return jax.tree.map(lambda _: jax.sharding.NamedSharding(mesh, P()), opt_state)


def make_step(cfg, recipe, optimizer, mesh, bn_across, micro_batch=None, shard_optimizer=False):
    """The jitted data-parallel training step over the mesh's `data` axis.

    The gradients come from `batch_gradients` (shard_map: the batch split over devices, parameters
    replicated); the optimizer's update follows outside the shard_map. With `shard_optimizer` the
    optimizer state is split over the devices (`shard_over_devices`, ZeRO stage 1): each device updates
    its slice of every parameter from its slice of the moments, and the new parameters are gathered back
    to every device. The arithmetic is the replicated update's; XLA's partitioner adds the collectives
    (LAMB's per-layer norms become partial sums added over devices).
    """
    rep = jax.sharding.NamedSharding(mesh, P())
    grads_fn = jax.shard_map(
        functools.partial(batch_gradients, cfg=cfg, recipe=recipe, bn_axis="data" if bn_across else None,
                          micro_batch=micro_batch),
        mesh=mesh, in_specs=(P(), P(), P("data"), P("data"), P("data"), P()), out_specs=(P(), P(), P()))

    def step(params, state, opt_state, pixels, ids, mask, rng):
        grads, new_state, logged = grads_fn(params, state, pixels, ids, mask, rng)
        finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in [logged["loss"], *jax.tree.leaves(grads)]]))

        def update(params, state, opt_state):
            sliced = shard_over_devices(params, mesh) if shard_optimizer else jax.tree.map(lambda _: rep, params)
            p, g = jax.lax.with_sharding_constraint((params, grads), (sliced, sliced))
            updates, new_opt = optimizer.update(g, opt_state, p)
            new_opt = jax.lax.with_sharding_constraint(new_opt, opt_shardings(new_opt, mesh, shard_optimizer))
            return jax.lax.with_sharding_constraint(optax.apply_updates(p, updates), rep), new_state, new_opt

        # A non-finite loss or gradient never reaches the parameters: keep everything as it was. (A
        # conditional, not a select per array: with selects XLA:CPU compiled tiny's step in 46 s, not
        # 27 s, and planned 23% more temporary memory.)
        params, state, opt_state = jax.lax.cond(finite, update, lambda *old: old, params, state, opt_state)
        return params, state, opt_state, dict(logged, finite=finite.astype(jnp.float32))

    return jax.jit(step, donate_argnums=(0, 1, 2))


def step_shapes(mesh, params, state, opt_state, batch_size, image_size, max_len, shard_optimizer=False):
    """The step's arguments as placed shapes, to compile it before any batch exists (`step.lower(...)`)."""
    rep, split = jax.sharding.NamedSharding(mesh, P()), jax.sharding.NamedSharding(mesh, P("data"))

    def placed(tree, shardings):
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s, weak_type=x.weak_type),
                            tree, shardings)
    everywhere = lambda tree: jax.tree.map(lambda _: rep, tree)
    return (placed(params, everywhere(params)), placed(state, everywhere(state)),
            placed(opt_state, opt_shardings(opt_state, mesh, shard_optimizer)),
            jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), jnp.float32, sharding=split),  # as data.py
            *[jax.ShapeDtypeStruct((batch_size, max_len), jnp.int32, sharding=split)] * 2,  # token ids, mask
            jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=rep))


# ----------------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(out, step, params, state, opt_state, cfg, vocab, train_state, keep, pause=False):
    """OUT/ckpt_<step>: written as OUT/.tmp_ckpt_<step> and renamed, so it is whole or absent.

    `pause` is for tests: stop half-way through the write, to be killed there.
    """
    final = os.path.join(out, f"ckpt_{step:09d}")
    tmp = os.path.join(out, f".tmp_ckpt_{step:09d}")
    for stale in (d for d in os.listdir(out) if d.startswith(".tmp_ckpt_")):  # left by a killed run
        shutil.rmtree(os.path.join(out, stale), ignore_errors=True)
    align.save(tmp, jax.device_get(params), jax.device_get(state), cfg, vocab_path=vocab)
    weights.write_safetensors(os.path.join(tmp, "optimizer.safetensors"), weights.tree_to_flat(jax.device_get(opt_state)))
    if pause:
        time.sleep(3600)
    with open(os.path.join(tmp, "train_state.json"), "w") as f:
        json.dump(train_state, f)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in align.checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def gather_data_states(state, size=1 << 16):
    """Every process's loader position, as a list indexed by process (each reads its own shards)."""
    if jax.process_count() == 1:
        return [state]
    from jax.experimental import multihost_utils
    blob = json.dumps(state).encode()
    if len(blob) > size:
        raise RuntimeError(f"data loader state is {len(blob)} bytes, more than {size}")
    rows = multihost_utils.process_allgather(np.frombuffer(blob.ljust(size), np.uint8))
    return [json.loads(bytes(row).rstrip()) for row in np.asarray(rows)]


def to_host(tree):
    """Numpy copies of global arrays, whole on every process; a collective where a leaf is split across
    processes (`--shard-optimizer` on several hosts), which every process must then call."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if x.is_fully_replicated
                        else np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)


def any_process(flag: bool) -> bool:
    """True on every process if `flag` is true on any (a collective: every process must call it)."""
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def load_checkpoint(path, cfg, optimizer):
    """(params, state, optimizer state, train_state.json) of a checkpoint, refused unless it holds `cfg`'s
    model (any model when cfg is None)."""
    params, state, saved_cfg = align.load(path)
    if cfg is not None and saved_cfg != cfg:
        raise UsageError(f"{path} holds a {saved_cfg.name} model ({saved_cfg.image.name} + BERT-{saved_cfg.text.name}, "
                         f"{saved_cfg.embed_dim}-d), not the one asked for; use a new --out or the same --size")
    opt_template = jax.eval_shape(optimizer.init, params)
    try:
        opt_state = weights.flat_to_tree(weights.read_safetensors(os.path.join(path, "optimizer.safetensors")),
                                         opt_template)
    except (KeyError, ValueError) as e:
        raise UsageError(f"{path}: its optimizer state does not fit this optimizer ({str(e).splitlines()[0][:120]}); "
                         f"it was written with another --optimizer or an older train.py: use a new --out, "
                         f"with --init {path} to start from its weights")
    with open(os.path.join(path, "train_state.json")) as f:
        return params, state, opt_state, json.load(f)


# ----------------------------------------------------------------------------------------------------
# Memory


def _nbytes(tree, shardings=None):
    """Bytes of one device's copy of `tree`: all of it, or its slices under `shardings`."""
    if shardings is None:
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
    return sum(jax.tree.leaves(jax.tree.map(lambda x, s: math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize,
                                            tree, shardings)))


def _human(n):
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def step_memory(m):
    """Bytes of a compiled step from XLA's `memory_analysis()`: arguments, outputs, temporaries, total.

    Donated parameters and state are updated in place: those outputs share the arguments' buffers.
    """
    outputs = m.output_size_in_bytes - m.alias_size_in_bytes
    return {"arguments": m.argument_size_in_bytes, "outputs": outputs, "temporaries": m.temp_size_in_bytes,
            "total": m.argument_size_in_bytes + outputs + m.temp_size_in_bytes}


MEMORY_COLUMNS = ["size", "towers", "image", "pairs/device", "dtype", "optimizer", "remat", "parameters",
                  "optimizer state", "BN state", "arguments", "outputs", "temporaries", "total", "compile",
                  "devices", "micro-batch", "optimizer split"]


def memory_report(args):
    """One row of the README's memory table: one device's share of a training step, compiled, never run.

    Sec. 5 trains on 1024 TPUv3 cores (16 GiB each) with 16 pairs per core: that is the default here
    (`--batch-size` is the global batch, 16 x this process's devices unless given). No parameter is
    allocated: their shapes come from jax.eval_shape, and the memory from XLA's analysis of the
    compiled step (arguments: parameters, optimizer and BatchNorm state, the batch; outputs alias the
    donated arguments; temporaries: activations kept for the backward pass and workspace).
    """
    cfg, recipe = resolve(args)
    mesh = data_mesh(args)
    n_dev = mesh.size
    batch = args.batch_size or 16 * n_dev
    check_batch(args, batch, n_dev)
    # The word-embedding table is sized by the vocabulary: --vocab's, else the paper's 100k (Sec. 4.1).
    # Everything else is the program `train` would compile here (on CPU, depthwise convolutions as
    # shifted multiply-adds: efficientnet.Config.depthwise).
    vocab_size = len(wordpiece.Tokenizer(args.vocab).vocab) if args.vocab else cfg.text.vocab_size
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, vocab_size=vocab_size))
    params, state = jax.eval_shape(lambda: align.init(jax.random.key(0), cfg))
    optimizer, _ = make_optimizer(recipe, params)
    opt_state = jax.eval_shape(optimizer.init, params)
    S = recipe.image_size
    t0 = time.perf_counter()
    compiled = make_step(cfg, recipe, optimizer, mesh, args.bn_across_devices, args.micro_batch,
                         args.shard_optimizer).lower(
        *step_shapes(mesh, params, state, opt_state, batch, S, cfg.text.max_len, args.shard_optimizer)).compile()
    seconds = time.perf_counter() - t0
    m = compiled.memory_analysis()
    if m is None:
        raise UsageError(f"XLA gives no memory analysis on this backend ({jax.default_backend()})")
    row = {"size": cfg.name, "towers": f"{cfg.image.name} + BERT-{cfg.text.name}", "image": S,
           "pairs/device": batch // n_dev, "dtype": recipe.dtype, "optimizer": recipe.optimizer,
           "remat": "yes" if args.remat else "no", "parameters": _nbytes(params),
           "optimizer state": _nbytes(opt_state, opt_shardings(opt_state, mesh, args.shard_optimizer)),
           "BN state": _nbytes(state), **step_memory(m), "compile": f"{seconds:.0f} s",
           "devices": n_dev, "micro-batch": args.micro_batch or batch // n_dev, "optimizer split": "yes" if args.shard_optimizer else "no"}
    print("| " + " | ".join(MEMORY_COLUMNS) + " |", file=sys.stderr)
    print("| " + " | ".join(_human(v) if isinstance(v, int) and k not in ("image", "pairs/device", "devices", "micro-batch") else str(v)
                            for k, v in row.items()) + " |")
    return 0


# ----------------------------------------------------------------------------------------------------
# The run: set up, restore, the step loop, checkpoints, the final evaluation


@dataclasses.dataclass
class Run:
    """What a training run holds from one phase to the next. The step loop replaces `params`, `state`
    and `opt_state` (the step donates their buffers) and advances `progress`, the dict saved as a
    checkpoint's train_state.json: step, data loader positions, skipped steps."""
    args: argparse.Namespace
    cfg: align.Config
    recipe: Recipe
    vocab: str
    tokenizer: wordpiece.Tokenizer
    mesh: jax.sharding.Mesh
    optimizer: optax.GradientTransformation
    lr_schedule: optax.Schedule
    eval_data: str | None
    params: dict = None
    state: dict = None
    opt_state: tuple = None
    progress: dict = dataclasses.field(default_factory=lambda: {"step": 0, "data": None, "skipped_steps": 0})
    resumed: bool = False

    @property
    def replicated(self):
        """Parameters, optimizer and BatchNorm state, and the rng are global arrays replicated on every
        device of every process: a plain array on one local device cannot enter a step that spans other
        processes' devices."""
        return jax.sharding.NamedSharding(self.mesh, P())


def data_mesh(args):
    """The `data` axis over every device of every process (tests may take a single process's first few)."""
    return jax.sharding.Mesh(np.array(jax.devices()[:args.devices]), ("data",))


def check_batch(args, batch_size, n_dev):
    """The global batch splits evenly over the devices, and each device's share into --micro-batch pairs."""
    if batch_size % n_dev:
        raise UsageError(f"--batch-size {batch_size} is not divisible by the {n_dev} devices; use a multiple of {n_dev}")
    per_device = batch_size // n_dev
    if args.micro_batch is not None:
        if not 0 < args.micro_batch <= per_device or per_device % args.micro_batch:
            raise UsageError(f"--micro-batch {args.micro_batch} must divide the {per_device} pairs per device "
                             f"(--batch-size {batch_size} over {n_dev} devices)")
        if args.bn_across_devices and args.micro_batch < per_device:
            raise UsageError("--micro-batch with --bn-across-devices is not offered: micro-batches normalise with "
                             "their own BatchNorm statistics, as separate devices do by default")


def start_processes(args):
    """Join the other hosts' processes (jax.distributed): at --coordinator, or as SLURM or a TPU pod says."""
    if args.coordinator:
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    elif any(k in os.environ for k in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "CLOUD_TPU_TASK_ID")) and \
            int(os.environ.get("SLURM_NTASKS", "2")) > 1:
        jax.distributed.initialize()  # JAX detects the cluster


def wait_for_every_process(name):
    """A barrier that waits as long as the slowest process takes (here, to compile the step).

    A device collective cannot be it: on CPU (Gloo) a cross-process collective waits only 30 s for the
    others. JAX's coordination service has such a barrier, which JAX's own multi-process tests use, but
    no public API for it (JAX 0.10): this is the one place that reaches into JAX's internals, and it
    falls back to the public device barrier if they move.
    """
    try:
        from jax._src.distributed import global_state
        global_state.client.wait_at_barrier(name, 60 * 60 * 1000)
    except (ImportError, AttributeError):
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def set_up(args):
    """The run of the command line: the recipe (Sec. 5), the vocabulary, the mesh, the optimizer, and the
    weights, restored from a checkpoint or --init when there is one; OUT/config.json records it all."""
    init = init_model(args)
    cfg, recipe = resolve(args, init and init[2])
    start_processes(args)
    mesh = data_mesh(args)
    n_dev = mesh.size
    check_batch(args, recipe.batch_size, n_dev)
    if not args.data.startswith("synthetic"):
        try:
            paths = [args.data] if args.data.endswith((".tsv", ".csv", ".json")) else data.list_shards(args.data)
        except ValueError as e:
            raise UsageError(str(e))
        if not any(os.path.exists(p) for p in paths):
            raise UsageError(f"--data {args.data!r}: no such file ({len(paths)} path(s) tried, e.g. {paths[0]})")
    if args.data.endswith(".json") and not args.images:
        raise UsageError(f"--data {args.data} is a Karpathy JSON: pass --images, the folder of its images")
    vocab = args.vocab or (init and init[3]) or synthetic.synthetic_vocab()
    if not os.path.exists(vocab):
        raise UsageError(f"--vocab {vocab} does not exist; build one with: python wordpiece.py vocab --data SRC --out vocab.txt")
    tokenizer = wordpiece.Tokenizer(vocab)
    if init and len(tokenizer.vocab) != cfg.text.vocab_size:
        raise UsageError(f"--init {args.init} has a {cfg.text.vocab_size}-word vocabulary but --vocab {vocab} has "
                         f"{len(tokenizer.vocab)}; pass the vocab.txt that came with it")
    # The vocabulary defines the embedding table (ALIGN's is 100k words, built from its data, Sec. 4.1).
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, vocab_size=len(tokenizer.vocab)))
    optimizer, lr_schedule = make_optimizer(recipe, params=None)  # its masks apply to any tree
    # Held-out pairs: --eval-data, or synthetic data's held-out split when training on synthetic data.
    eval_data = args.eval_data or ("synthetic" if args.data.startswith("synthetic") else None)
    run = Run(args, cfg, recipe, vocab, tokenizer, mesh,
              optimizer, lr_schedule, eval_data)
    restore(run, init)
    if jax.process_index() == 0:
        os.makedirs(args.out, exist_ok=True)
        resolved = {"model": align.config_to_dict(run.cfg), "recipe": dataclasses.asdict(recipe),
                    "args": vars(args), "devices": n_dev, "processes": jax.process_count()}
        print(json.dumps({"model": run.cfg.name, "image": run.cfg.image.name, "text": run.cfg.text.name,
                          "embed_dim": run.cfg.embed_dim, **dataclasses.asdict(recipe), "devices": n_dev}))
        with open(os.path.join(args.out, "config.json"), "w") as f:
            json.dump(resolved, f, indent=1)
    return run


def init_model(args):
    """--init's model as (params, state, cfg, vocab.txt or None), or None without --init.

    When --out already holds a checkpoint of this run, the architecture is read from it and the weights
    are left to `restore` (params and state None): the same command resumes whatever --init was, even
    when --init has since moved. An HF directory's model trains at Sec. 5's 64 tokens: its position
    table (512 rows in kakaobrain/align-base) is cut to the first 64, which are all a 64-token text uses.
    """
    if not args.init:
        return None
    if checkpoints := align.checkpoints(args.out):
        with open(os.path.join(checkpoints[-1], "align_config.json")) as f:
            return None, None, align.config_from_dict(json.load(f)), os.path.join(checkpoints[-1], "vocab.txt")
    try:
        path = align.model_dir(args.init)
        params, state, cfg = align.load(path)
    except (FileNotFoundError, KeyError, ValueError) as e:
        raise UsageError(f"--init {e}")
    if not os.path.exists(os.path.join(path, "align_config.json")) and cfg.text.max_len > 64:  # HF's
        cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, max_len=64))
        params["text"]["embeddings"]["position"] = params["text"]["embeddings"]["position"][:64]
    vocab = os.path.join(path, "vocab.txt")
    return params, state, cfg, vocab if os.path.exists(vocab) else None


def restore(run, init=None):
    """The weights to start from: --out's newest checkpoint (resuming the run exactly), else --init's
    model (`init_model`: fine-tuning, Sec. 5.1), else a fresh initialisation; parameters and BatchNorm
    state replicated, the optimizer state as --shard-optimizer says."""
    args, cfg = run.args, run.cfg
    checkpoints = align.checkpoints(args.out)
    if checkpoints:
        # A run from --init took its model from there (its cfg came from this checkpoint, `init_model`).
        params, state, opt_state, run.progress = load_checkpoint(checkpoints[-1], None if args.init else cfg,
                                                                 run.optimizer)
        # Whole arrays in the checkpoint, whichever way the run that wrote it held its optimizer state.
        run.params, run.state = jax.device_put((params, state), run.replicated)
        run.opt_state = jax.device_put(opt_state, opt_shardings(opt_state, run.mesh, args.shard_optimizer))
        run.resumed = True
        return
    if init:
        run.params, run.state = jax.device_put(init[:2], run.replicated)
    else:
        run.params, run.state = jax.jit(align.init, static_argnums=1, out_shardings=run.replicated)(
            jax.random.key(args.seed), cfg)
    run.opt_state = jax.jit(run.optimizer.init, out_shardings=opt_shardings(
        jax.eval_shape(run.optimizer.init, run.params), run.mesh, args.shard_optimizer))(run.params)


def open_loader(run):
    """This process's share of each global batch, from where the checkpoint left the data (data.py)."""
    args, p_id = run.args, jax.process_index()
    workers = args.workers if args.workers is not None else max(0, (os.cpu_count() or 1) - 1)
    return data.make_loader(args.data, tokenizer=run.tokenizer, global_batch=run.recipe.batch_size,
                            image_size=run.recipe.image_size, train=True, seed=args.seed, process_index=p_id,
                            process_count=jax.process_count(), max_len=run.cfg.text.max_len, workers=workers,
                            max_bad_fraction=args.max_bad_fraction, bad_window=args.bad_window, images=args.images,
                            state=run.progress["data"][p_id] if run.progress["data"] else None)


def compile_step(run):
    """`make_step` compiled for this run's shapes, before the first batch; every process waits for all."""
    r = run.recipe
    step_fn = make_step(run.cfg, r, run.optimizer, run.mesh, run.args.bn_across_devices, run.args.micro_batch,
                        run.args.shard_optimizer).lower(
        *step_shapes(run.mesh, run.params, run.state, run.opt_state, r.batch_size, r.image_size,
                     run.cfg.text.max_len, run.args.shard_optimizer)).compile()
    if jax.process_count() > 1:
        wait_for_every_process("train.py: step compiled")
    return step_fn


def checkpoint(run, loader):
    """OUT/ckpt_<step> (`save_checkpoint`). Every process calls it: the data positions are gathered
    collectively, then process 0 writes."""
    run.progress["data"] = gather_data_states(loader.state())
    opt_state = to_host(run.opt_state)  # whole, whether replicated or split over devices (and processes)
    if jax.process_index() == 0:
        save_checkpoint(run.args.out, run.progress["step"], run.params, run.state, opt_state, run.cfg,
                        run.vocab, run.progress, run.args.keep, pause=run.args.pause_in_checkpoint == run.progress["step"])


def _local(tree):
    """Process 0's own copy of replicated arrays: evaluating the global ones would wait for the others."""
    return jax.tree.map(lambda x: x.addressable_data(0), tree)


class Log:
    """The progress bar and OUT/metrics.jsonl (process 0): a row of the step's metrics every --log-every
    steps, with the learning rate, the throughput since the last row and the skip counters."""

    def __init__(self, run, loader):
        from tqdm import tqdm
        self.run, self.loader, self.on = run, loader, jax.process_index() == 0
        self.bar = tqdm(total=run.recipe.steps, initial=run.progress["step"], disable=not self.on, dynamic_ncols=True)
        path = os.path.join(run.args.out, "metrics.jsonl")
        if self.on and run.resumed and os.path.exists(path):
            # Rows after the checkpoint come from steps that a kill undid and that will run again.
            with open(path) as f:
                kept = [line for line in f if line.endswith("\n") and json.loads(line)["step"] <= run.progress["step"]]
            weights.atomic_write(path, lambda f: f.write("".join(kept).encode()))
        self.file = open(path, "a") if self.on else None
        self.t_last, self.images = time.perf_counter(), 0

    def step(self, m):
        step, recipe = self.run.progress["step"], self.run.recipe
        self.bar.update(1)
        self.images += recipe.batch_size
        if step % recipe.log_every and step != recipe.steps:
            return
        now = time.perf_counter()
        row = {"step": step, **{k: float(v) for k, v in m.items()}, "lr": float(self.run.lr_schedule(step - 1)),
               "images_per_s": self.images / (now - self.t_last), "skipped_steps": self.run.progress["skipped_steps"],
               "skipped_samples": self.loader.stats.get("bad", 0), **self.loader.counts()}
        self.t_last, self.images = now, 0
        self.bar.set_postfix(loss=f"{row['loss']:.3f}", T=f"{row['temperature']:.4f}", lr=f"{row['lr']:.2e}",
                             img_s=f"{row['images_per_s']:.0f}")
        if self.file:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()

    def heldout_retrieval(self):
        """Every --eval-every steps: held-out R@1 both ways (evaluate.heldout_retrieval), on process 0; a row
        of R@1/5/10 in OUT/heldout.jsonl."""
        run = self.run
        if not (run.recipe.eval_every and run.progress["step"] % run.recipe.eval_every == 0 and self.on
                and run.eval_data):
            return
        try:
            r, n, m, _ = evaluate.heldout_retrieval(_local(run.params), _local(run.state), run.cfg, run.tokenizer,
                                                    run.eval_data, run.recipe.image_size, run.args.images)
        except (data.TooManyBadSamples, evaluate.UsageError) as e:
            self.bar.write(f"step {run.progress['step']}: no held-out retrieval, --eval-data failed: {e}")
            return
        self.bar.write(f"step {run.progress['step']}: held-out retrieval ({n} images, {m} captions) "
                       f"i2t R@1 {r['i2t']['R@1']:.1f}  t2i R@1 {r['t2i']['R@1']:.1f}")
        with open(os.path.join(run.args.out, "heldout.jsonl"), "a") as f:
            f.write(json.dumps({"step": run.progress["step"], "images": n, "captions": m, **r}) + "\n")

    def close(self):
        self.bar.close()
        if self.file:
            self.file.close()


def step_loop(run, loader, step_fn):
    """Sec. 5's loop to the recipe's last step: a global batch, one step of the optimizer, and, every so
    often, a log row, held-out retrieval and a checkpoint. A SIGTERM (what a preemption sends) or
    --stop-after checkpoints and stops early: returns what stopped it, or None at the last step. Data that
    fails systematically (data.TooManyBadSamples, --max-bad-fraction) checkpoints the last step and raises
    one line (exit 2); single bad samples are only counted, in the log rows and the closing summary."""
    args, recipe, progress = run.args, run.recipe, run.progress
    stop = {"signal": None}
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))
    log = Log(run, loader)
    rng = jax.jit(lambda: jax.random.key(args.seed + 1), out_shardings=run.replicated)()
    to_global = functools.partial(jax.make_array_from_process_local_data, jax.sharding.NamedSharding(run.mesh, P("data")))
    consecutive_bad = 0
    while progress["step"] < recipe.steps:
        step, batch, data_failure = progress["step"], None, None
        try:
            batch = next(loader)
        except data.TooManyBadSamples as e:
            data_failure = e
        if jax.process_count() > 1 and any_process(data_failure is not None) and not data_failure:
            data_failure = "another process's data failed (its own line says why)"
        if data_failure:  # systematic, not a few bad samples: keep the last step's work, then one line
            checkpoint(run, loader)
            log.close()
            raise UsageError(data_failure_line(data_failure, args, step))
        if args.plant_nan_at == step:
            batch = dict(batch, pixels=np.full_like(batch["pixels"], np.nan))
        run.params, run.state, run.opt_state, m = step_fn(
            run.params, run.state, run.opt_state, to_global(batch["pixels"]), to_global(batch["ids"]),
            to_global(batch["mask"]), jax.random.fold_in(rng, step))
        progress["step"] = step + 1
        if bool(m["finite"]):
            consecutive_bad = 0
        else:  # the step kept the weights as they were (make_step)
            consecutive_bad += 1
            progress["skipped_steps"] += 1
        if consecutive_bad >= args.max_skipped_steps:
            raise UsageError(f"{consecutive_bad} consecutive steps had a non-finite loss or gradient (step {step}); "
                             f"stopped, the last good checkpoint is in {args.out}; try a lower --lr")
        log.step(m)
        log.heldout_retrieval()
        if args.stop_after == step + 1:
            stop["signal"] = "--stop-after"
        if jax.process_count() > 1 and any_process(stop["signal"] is not None) and not stop["signal"]:
            # A preemption signal reaches each process at its own moment; all must stop after the same
            # step, or the others would wait forever in the checkpoint's collective.
            stop["signal"] = "a signal to another process"
        if (step + 1) % recipe.ckpt_every == 0 or stop["signal"]:
            checkpoint(run, loader)
        if stop["signal"]:
            log.bar.write(f"stopped by {stop['signal']}: checkpoint written at step {step + 1}; exiting")
            break
    log.close()
    if log.on:
        print(loader.summary() + ("" if jax.process_count() == 1 else " (process 0's share)"))
    return stop["signal"]


def data_failure_line(e, args, step):
    """The one line a run that stopped on bad data ends with: what failed, where, and the flag to change."""
    if not isinstance(e, data.TooManyBadSamples):
        return f"{e}; checkpoint written at step {step} in {args.out}"
    if not e.window:  # an epoch without a readable sample
        return f"{e}; checkpoint written at step {step} in {args.out}; check --data"
    reasons = ", ".join(f"{r} {n}" for r, n in e.reasons.items())
    worst = ", ".join(f"{s} ({n})" for s, n in e.worst)
    return (f"data: {e.failed} of the last {e.window} samples failed, more than --max-bad-fraction "
            f"{args.max_bad_fraction} (--bad-window {args.bad_window}): {reasons}; worst shards: {worst}; "
            f"checkpoint written at step {step} in {args.out}; fix or drop those shards, or raise --max-bad-fraction")


def evaluate_at_end(run):
    """Held-out retrieval of the final weights, and the synthetic attribute table: OUT/retrieval.json."""
    if jax.process_index() != 0 or run.args.skip_final_eval:
        return
    if not run.eval_data:
        print(f"no held-out evaluation: --data {run.args.data} is not synthetic and no --eval-data was given")
        return
    try:
        result = evaluate.heldout_evaluation(_local(run.params), _local(run.state), run.cfg, run.tokenizer,
                                             run.eval_data, run.recipe.image_size, run.args.images)
    except (data.TooManyBadSamples, evaluate.UsageError) as e:
        print(f"no held-out evaluation: --eval-data {run.eval_data} failed: {e}")
        return
    with open(os.path.join(run.args.out, "retrieval.json"), "w") as f:
        json.dump({"step": run.progress["step"], **result}, f)


def train(args):
    """Set up (or restore) the run, step to the end of the recipe, checkpoint, evaluate."""
    run = set_up(args)
    loader = open_loader(run)
    try:
        stopped = step_loop(run, loader, compile_step(run))
        if not stopped and run.progress["step"] % run.recipe.ckpt_every:
            checkpoint(run, loader)  # the last step, when it was not a checkpoint step
    finally:
        loader.close()
    if not stopped:
        evaluate_at_end(run)
    return 0


def main(argv=None):
    args = parse_args(argv)
    try:
        return memory_report(args) if args.memory_report else train(args)
    except (UsageError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # out of memory gets a hint, everything else its traceback
        if "RESOURCE_EXHAUSTED" in str(e) or "Out of memory" in str(e):
            print(f"error: out of memory ({str(e).splitlines()[0][:200]}); try --remat, a smaller --batch-size "
                  "per device, or --dtype bfloat16", file=sys.stderr)
            return 3
        raise


if __name__ == "__main__":
    sys.exit(main())
