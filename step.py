"""One training step of ALIGN: the paper's optimizer (Sec. 5) and the data-parallel step that train.py runs.

    optimizer, lr = make_optimizer(recipe, params)     # LAMB (or AdamW), warm-up then linear decay
    step = make_step(cfg, recipe, optimizer, mesh, bn_across=False)
    params, state, opt_state, metrics = step(params, state, opt_state, pixels, ids, mask, rng)

The step is data parallel over one `data` mesh axis spanning every device of every process: each device
holds its slice of the global batch and the loss is ALIGN's global-batch contrastive loss (align.py),
whose negatives are every pair on every device (`batch_gradients`). Beyond the paper's 1024 cores of 16
pairs, for the same batch on few devices: exact micro-batching (`micro_batch`, GradCache) and the
optimizer state split over the devices (`shard_optimizer`, ZeRO stage 1); and ALBEF's momentum model
(`ema_momentum`, `distill`). train.py holds the recipe and the run around it.

Deviations from the paper's recipe, and details it leaves open:
- LAMB's trust ratio applies only to the parameters that get weight decay (matrices, kernels, embedding
  tables), as in TF Model Garden's and timm's LAMB; biases, BatchNorm/LayerNorm parameters and the
  log-temperature take Adam's step. The paper names LAMB and nothing finer.
- BatchNorm running averages are averaged over devices after each step, so the state stays replicated
  (the batch statistics used in the forward pass stay per device, as on the paper's TPUs).
"""
import functools

import jax
import jax.numpy as jnp
import optax

import align
import data

P = jax.sharding.PartitionSpec


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


def make_optimizer(recipe, params):
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


def teacher_embeddings(teacher, pixels, ids, mask, cfg, rng):
    """The momentum model's L2-normalised embeddings of a batch (`--momentum-distill`), without gradient:
    BatchNorm in training mode (its batch statistics, as the student's are) and the student's draws of
    stochastic depth, as ALBEF's momentum model runs in training mode beside the model."""
    (img_BE, txt_BE), _ = align.train_features(teacher["params"], teacher["state"], pixels, ids, mask, cfg, rng)
    return jax.lax.stop_gradient((align.l2_normalise(img_BE), align.l2_normalise(txt_BE)))


def model_pixels(pixels):
    """The towers' float32 pixels in [-1, 1]: uint8 as data.py reads them (train.py sends them so, a quarter
    of float32's bytes) are normalised here, on the device (`data.model_pixels`); float32 pass through."""
    return data.model_pixels(pixels) if pixels.dtype == jnp.uint8 else pixels


def batch_gradients(params, state, pixels, ids, mask, rng, teacher=None, alpha=0.0, *, cfg, recipe, bn_axis=None,
                    micro_batch=None):
    """One device's part of a step, inside shard_map over `data`: (gradients of the global-batch loss,
    new BatchNorm state, metrics), all replicated. With `teacher` ({"params", "state"} of the momentum
    model) the loss is momentum-distilled with weight `alpha` (`align.contrastive_loss`, ALBEF).

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
        rng, pixels = jax.random.fold_in(rng, d), model_pixels(pixels)
        if teacher is not None:
            loss_kw.update(teacher=teacher_embeddings(teacher, pixels, ids, mask, cfg, rng), distill_alpha=alpha)
        (loss, (logged, new_state)), grads = jax.value_and_grad(align.train_loss, has_aux=True)(
            params, state, pixels, ids, mask, cfg, rng, bn_axis_name=bn_axis, **loss_kw)
        grads = jax.lax.pmean(grads, "data")  # align.contrastive_loss's contract: pmean, never psum
        return grads, jax.lax.pmean(new_state, "data"), logged  # keep BatchNorm's running averages replicated

    def micro(x):  # [B, ...] -> [K, M, ...]: micro-batch k holds the device's rows k*M ... (k+1)*M - 1
        return x.reshape(k_micro, micro_batch, *x.shape[1:])

    batches = (micro(pixels), micro(ids), micro(mask), jax.vmap(lambda k: jax.random.fold_in(rng, d * k_micro + k))(
        jnp.arange(k_micro)))

    def towers(p, batch):  # (one micro-batch's pixels normalised at a time: uint8 until here)
        pixels, ids, mask, rng = batch
        return align.train_features(p, state, model_pixels(pixels), ids, mask, cfg, rng)

    def forward(batch):  # the student's features, and the teacher's embeddings when distilling
        batch = (model_pixels(batch[0]), *batch[1:])  # once for both models (`towers` passes float32 through)
        return towers(params, batch), None if teacher is None else teacher_embeddings(teacher, *batch[:3], cfg, batch[3])

    # 1. Features of every micro-batch; a loop keeps one micro-batch's activations at a time.
    ((img_KME, txt_KME), states), teacher_KME = jax.lax.map(forward, batches)
    flat = lambda x_KME: x_KME.reshape(-1, x_KME.shape[-1])
    if teacher is not None:
        loss_kw.update(teacher=jax.tree.map(flat, teacher_KME), distill_alpha=alpha)
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


def make_step(cfg, recipe, optimizer, mesh, bn_across, micro_batch=None, shard_optimizer=False, ema_momentum=None,
              distill=False):
    """The jitted data-parallel training step over the mesh's `data` axis:
    step(params, state, opt_state, pixels, ids, mask, rng) -> (params, state, opt_state, metrics).
    The pixels are uint8 as read (normalised here, `data.model_pixels`) or float32 in [-1, 1].

    The gradients come from `batch_gradients` (shard_map: the batch split over devices, parameters
    replicated); the optimizer's update follows outside the shard_map. With `shard_optimizer` the
    optimizer state is split over the devices (`shard_over_devices`, ZeRO stage 1): each device updates
    its slice of every parameter from its slice of the moments, and the new parameters are gathered back
    to every device. The arithmetic is the replicated update's; XLA's partitioner adds the collectives
    (LAMB's per-layer norms become partial sums added over devices).

    With `ema_momentum` m the step also takes and returns the momentum model (`--ema`, ALBEF):
    step(..., rng, teacher, alpha) -> (..., metrics, teacher), teacher = {"params", "state"}, updated after
    each applied step to m x teacher + (1 - m) x the new weights; with `distill` its embeddings are
    the soft targets of the loss, weighted by alpha (`batch_gradients`).
    """
    rep = jax.sharding.NamedSharding(mesh, P())
    grads_fn = jax.shard_map(
        functools.partial(batch_gradients, cfg=cfg, recipe=recipe, bn_axis="data" if bn_across else None,
                          micro_batch=micro_batch),
        mesh=mesh, in_specs=(P(), P(), P("data"), P("data"), P("data"), P(), P(), P()), out_specs=(P(), P(), P()))

    def step(params, state, opt_state, pixels, ids, mask, rng, teacher=None, alpha=0.0):
        grads, new_state, logged = grads_fn(params, state, pixels, ids, mask, rng, teacher if distill else None,
                                            alpha)
        finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in [logged["loss"], *jax.tree.leaves(grads)]]))

        def update(params, state, opt_state, teacher):
            sliced = shard_over_devices(params, mesh) if shard_optimizer else jax.tree.map(lambda _: rep, params)
            p, g = jax.lax.with_sharding_constraint((params, grads), (sliced, sliced))
            updates, new_opt = optimizer.update(g, opt_state, p)
            new_opt = jax.lax.with_sharding_constraint(new_opt, opt_shardings(new_opt, mesh, shard_optimizer))
            params = jax.lax.with_sharding_constraint(optax.apply_updates(p, updates), rep)
            if teacher is not None:  # the exponential moving average of the weights
                teacher = jax.tree.map(lambda t, x: ema_momentum * t + (1 - ema_momentum) * x, teacher,
                                       {"params": params, "state": new_state})
            return params, new_state, new_opt, teacher

        # A non-finite loss or gradient never reaches the parameters: keep everything as it was. (A
        # conditional, not a select per array: with selects XLA:CPU compiled tiny's step in 46 s, not
        # 27 s, and planned 23% more temporary memory.)
        params, state, opt_state, teacher = jax.lax.cond(finite, update, lambda *old: old, params, state, opt_state,
                                                         teacher)
        logged = dict(logged, finite=finite.astype(jnp.float32))
        return (params, state, opt_state, logged) + (() if teacher is None else (teacher,))

    return jax.jit(step, donate_argnums=(0, 1, 2, 7))


def step_shapes(mesh, params, state, opt_state, batch_size, image_size, max_len, shard_optimizer=False,
                ema=False, pixels=jnp.uint8):
    """The step's arguments as placed shapes, to compile it before any batch exists (`step.lower(...)`);
    the pixels uint8 as data.py reads them (`data.make_loader(..., uint8=True)`), or float32 in [-1, 1]."""
    rep, split = jax.sharding.NamedSharding(mesh, P()), jax.sharding.NamedSharding(mesh, P("data"))

    def placed(tree, shardings):
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s, weak_type=x.weak_type),
                            tree, shardings)
    everywhere = lambda tree: jax.tree.map(lambda _: rep, tree)
    return (placed(params, everywhere(params)), placed(state, everywhere(state)),
            placed(opt_state, opt_shardings(opt_state, mesh, shard_optimizer)),
            jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), pixels, sharding=split),
            *[jax.ShapeDtypeStruct((batch_size, max_len), jnp.int32, sharding=split)] * 2,  # token ids, mask
            jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=rep),
            *((placed({"params": params, "state": state}, everywhere({"params": params, "state": state})),
               jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)) if ema else ()))
