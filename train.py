"""Train ALIGN: the paper's recipe (Sec. 5) at every size, one CPU to many hosts.

    python train.py                       # tiny model, synthetic data, this CPU, a few minutes
    python train.py --size L2 --data 'shards/{00000..99999}.tar' --vocab vocab.txt --out runs/l2
    python train.py --size L2 --memory-report --remat   # one device's memory for a step: compiled, not run

The step (step.py) is data parallel over one `data` mesh axis spanning every device of every process:
each device holds its slice of the global batch, the parameters are replicated, and the loss is ALIGN's
global-batch contrastive loss (align.py), whose negatives are every pair on every device. This file holds
the recipe and the run around the step: configuration, restoring, the loop. Checkpoints
(`OUT/ckpt_<step>/`, checkpoints.py) are whole or absent, whatever kills the run; the same command
started again resumes from the newest. The memory report is memory.py.

Deviations from the paper's recipe: step.py's docstring.
"""

import argparse
import dataclasses
import json
import os
import signal
import sys
import time

import jax
import numpy as np
import optax

import align
import bert
import checkpoints
import data
import efficientnet as en
import evaluate
import host
import synthetic
import weights
import wordpiece
# The step and its optimizer live in step.py; train.make_optimizer and train.make_step stay where users import them.
from step import make_optimizer, make_step, opt_shardings, step_shapes

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
    ap.add_argument("--momentum-distill", type=float, default=0.0, metavar="ALPHA",
                    help="ALBEF's momentum distillation: soft targets from a moving average of the model, weight "
                         "ALPHA (ALBEF: 0.4), ramped up from 0 over the warm-up; 0 is ALIGN's loss")
    ap.add_argument("--ema-momentum", type=float, default=0.995, help="momentum of the moving average (ALBEF: 0.995)")
    ap.add_argument("--ema", action="store_true",
                    help="keep the moving average of the weights (implied by --momentum-distill) and evaluate it "
                         "instead of the weights; each checkpoint holds it as a model directory ckpt_*/ema")
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
    ap.add_argument("--plant-nan-at", type=int, help=argparse.SUPPRESS)  # tests: NaN weights for this step
    # tests: the image tower's first N stages only (tiny's first 4 compile in 9 s instead of 21 s)
    ap.add_argument("--image-stages", type=int, help=argparse.SUPPRESS)
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
    if init_cfg is not None and (args.image_tower or args.text_tower or args.embed_dim or args.image_stages):
        raise UsageError("--image-tower, --text-tower and --embed-dim do not apply with --init: the model is --init's")
    recipe = Recipe() if args.finetune else RECIPES[args.size]
    if args.finetune:
        recipe = dataclasses.replace(recipe, **FINETUNE[args.finetune])
    if init_cfg is not None:
        recipe = dataclasses.replace(recipe, image_size=init_cfg.image_size)
    recipe = dataclasses.replace(recipe, **{f.name: getattr(args, f.name) for f in dataclasses.fields(Recipe)
                                            if getattr(args, f.name) is not None})
    if not 0 <= args.momentum_distill <= 1 or not 0 <= args.ema_momentum < 1:
        raise UsageError(f"--momentum-distill {args.momentum_distill} must be in [0, 1] (ALBEF: 0.4) and "
                         f"--ema-momentum {args.ema_momentum} in [0, 1) (ALBEF: 0.995)")
    if recipe.optimizer not in ("lamb", "adamw"):
        raise UsageError(f"unknown --optimizer {recipe.optimizer!r}; choose lamb (the paper's) or adamw")
    cfg = align.SIZES[args.size] if init_cfg is None else init_cfg
    if args.image_tower:
        if args.image_tower not in en.CONFIGS:
            raise UsageError(f"unknown --image-tower {args.image_tower!r}; choose one of {list(en.CONFIGS)}")
        cfg = dataclasses.replace(cfg, image=en.CONFIGS[args.image_tower])
    if args.image_stages:
        cfg = dataclasses.replace(cfg, image=dataclasses.replace(cfg.image, stages=cfg.image.stages[:args.image_stages]))
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
    teacher: dict | None = None  # the moving average {"params", "state"} (--ema, --momentum-distill)
    progress: dict = dataclasses.field(default_factory=lambda: {"step": 0, "data": None, "skipped_steps": 0})
    resumed: bool = False
    data_state: dict = None  # this process's data loader state after the last step's batch (`checkpoint`)

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
    ckpts = align.checkpoints(args.out)
    if ckpts:
        # A run from --init took its model from there (its cfg came from this checkpoint, `init_model`).
        params, state, opt_state, run.progress = checkpoints.load(ckpts[-1], None if args.init else cfg, run.optimizer)
        # Whole arrays in the checkpoint, whichever way the run that wrote it held its optimizer state.
        run.params, run.state = jax.device_put((params, state), run.replicated)
        run.opt_state = jax.device_put(opt_state, opt_shardings(opt_state, run.mesh, args.shard_optimizer))
        run.resumed = True
        ema = os.path.join(ckpts[-1], "ema")
        if keeps_ema(args) and os.path.exists(os.path.join(ema, "align_config.json")):
            run.teacher = dict(zip(("params", "state"), jax.device_put(align.load(ema)[:2], run.replicated)))
        elif keeps_ema(args):  # a checkpoint written without the moving average: it starts here
            print(f"{ckpts[-1]} has no moving average of the weights (ema/): it starts from these weights")
            run.teacher = start_teacher(run)
        return
    if init:
        run.params, run.state = jax.device_put(init[:2], run.replicated)
    else:
        run.params, run.state = jax.jit(align.init, static_argnums=1, out_shardings=run.replicated)(
            jax.random.key(args.seed), cfg)
    run.opt_state = jax.jit(run.optimizer.init, out_shardings=opt_shardings(
        jax.eval_shape(run.optimizer.init, run.params), run.mesh, args.shard_optimizer))(run.params)
    if keeps_ema(args):
        run.teacher = start_teacher(run)


def keeps_ema(args):
    return args.ema or args.momentum_distill > 0


def start_teacher(run):
    """The moving average's first value: a copy of the weights (ALBEF's momentum model starts as the model)."""
    return jax.jit(lambda p, s: {"params": p, "state": s}, out_shardings=run.replicated)(run.params, run.state)


def open_loader(run):
    """This process's share of each global batch, from where the checkpoint left the data (data.py)."""
    args, p_id = run.args, jax.process_index()
    workers = args.workers if args.workers is not None else max(0, (os.cpu_count() or 1) - 1)
    try:
        return data.make_loader(args.data, tokenizer=run.tokenizer, global_batch=run.recipe.batch_size,
                                image_size=run.recipe.image_size, train=True, seed=args.seed, process_index=p_id,
                                process_count=jax.process_count(), max_len=run.cfg.text.max_len, workers=workers,
                                max_bad_fraction=args.max_bad_fraction, bad_window=args.bad_window, images=args.images,
                                state=run.progress["data"][p_id] if run.progress["data"] else None,
                                uint8=True)  # normalised on the devices (step.py): a quarter of float32's bytes
    except ValueError as e:  # data.py's one-line reasons: an unreadable source, a saved position that does not fit
        raise UsageError(str(e))


_COMPILED = {}  # this process's compiled steps, by everything that shapes one (`compile_step`)


def step_for(args, cfg, recipe, optimizer, mesh, params, state, opt_state, batch_size):
    """`make_step` as the command line asks for it, compiled for these arguments' shapes (they may be
    abstract, `jax.eval_shape`'s): the run's step, and the program `--memory-report` reads."""
    ema = keeps_ema(args)
    return make_step(cfg, recipe, optimizer, mesh, args.bn_across_devices, args.micro_batch, args.shard_optimizer,
                     args.ema_momentum if ema else None, distill=args.momentum_distill > 0).lower(
        *step_shapes(mesh, params, state, opt_state, batch_size, recipe.image_size, cfg.text.max_len,
                     args.shard_optimizer, ema=ema)).compile()


def compile_step(run):
    """`step_for` this run, before the first batch; every process waits for all.

    Kept for the life of the process: train.main called again with the same model, recipe, devices and
    flags (a sweep in one process, a resumed run in the tests) skips the seconds of tracing and compiling.
    The key is every input of the program; the loop's own settings (log, checkpoint and evaluation
    intervals) are not."""
    args, r = run.args, run.recipe
    key = (run.cfg, dataclasses.replace(r, log_every=0, ckpt_every=0, eval_every=0), tuple(run.mesh.devices.flat),
           args.bn_across_devices, args.micro_batch, args.shard_optimizer,
           args.ema_momentum if keeps_ema(args) else None, args.momentum_distill > 0)
    if key not in _COMPILED:
        _COMPILED[key] = step_for(args, run.cfg, r, run.optimizer, run.mesh, run.params, run.state, run.opt_state,
                                  r.batch_size)
    if jax.process_count() > 1:
        wait_for_every_process("train.py: step compiled")
    return _COMPILED[key]


def checkpoint(run):
    """OUT/ckpt_<step> (`checkpoints.save`). Every process calls it: the data positions (after the last
    step's batch, `run.data_state`) are gathered collectively, then process 0 writes."""
    run.progress["data"] = checkpoints.gather_data_states(run.data_state)
    opt_state = checkpoints.to_host(run.opt_state)  # whole, whether replicated or split over devices (and processes)
    if jax.process_index() == 0:
        checkpoints.save(run.args.out, run.progress["step"], run.params, run.state, opt_state, run.cfg,
                        run.vocab, run.progress, run.args.keep, pause=run.args.pause_in_checkpoint == run.progress["step"],
                        teacher=run.teacher)


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

    def step(self, step, m, data_state):
        """Step `step` (counted from 1) is done; its metrics `m` and the data loader's state after its batch."""
        recipe = self.run.recipe
        self.bar.update(1)
        self.images += recipe.batch_size
        if step % recipe.log_every and step != recipe.steps:
            return
        now = time.perf_counter()
        row = {"step": step, **{k: float(v) for k, v in m.items()}, "lr": float(self.run.lr_schedule(step - 1)),
               "images_per_s": self.images / (now - self.t_last), "skipped_steps": self.run.progress["skipped_steps"],
               "skipped_samples": data_state["stats"].get("bad", 0), **self.loader.counts(data_state["stats"])}
        self.t_last, self.images = now, 0
        self.bar.set_postfix(loss=f"{row['loss']:.3f}", T=f"{row['temperature']:.4f}", lr=f"{row['lr']:.2e}",
                             img_s=f"{row['images_per_s']:.0f}")
        if self.file:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()

    def evaluates(self, step):
        """Whether held-out retrieval runs after `step` (every --eval-every steps, on process 0)."""
        every = self.run.recipe.eval_every
        return bool(every and step % every == 0 and self.on and self.run.eval_data)

    def heldout_retrieval(self):
        """Held-out R@1 both ways of the current weights (evaluate.heldout_retrieval), on process 0; a row
        of R@1/5/10 in OUT/heldout.jsonl."""
        run = self.run
        try:
            r, n, m, _ = evaluate.heldout_retrieval(*eval_weights(run), run.cfg, run.tokenizer, run.eval_data,
                                                    run.recipe.image_size, run.args.images)
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
    one line (exit 2); single bad samples are only counted, in the log rows and the closing summary.

    The host does not wait for a step before preparing the next. A step's call returns at once, while
    the devices run it; meanwhile the host reads the next batch and sends it to the devices (uint8
    pixels, normalised there: step.py), and only then reads the previous step's metrics -- its
    finiteness (the skip count and --max-skipped-steps) and its log row -- a step late, when the devices
    have finished it. It waits for the step itself only where the weights after it are needed: a
    checkpoint, held-out retrieval, a stop, the last step. (With several processes it also waits before
    they agree on stopping, below.)
    """
    args, recipe, progress = run.args, run.recipe, run.progress
    stop = {"signal": None}
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))
    log = Log(run, loader)
    rng = jax.jit(lambda: jax.random.key(args.seed + 1), out_shardings=run.replicated)()
    split = jax.sharding.NamedSharding(run.mesh, P("data"))
    consecutive_bad = 0

    def read():
        """The next batch, already on its way to the devices, and the loader's state after it; or why the data failed."""
        try:
            batch = next(loader)
        except data.TooManyBadSamples as e:
            return None, None, e
        return [jax.make_array_from_process_local_data(split, batch[k]) for k in ("pixels", "ids", "mask")], \
            loader.state(), None

    def finish(step, m, data_state):
        """Step `step` (from 1) is done: count it if it was skipped, and log it (this waits for it)."""
        nonlocal consecutive_bad
        if bool(m["finite"]):
            consecutive_bad = 0
        else:  # the step kept the weights as they were (make_step)
            consecutive_bad += 1
            progress["skipped_steps"] += 1
        if consecutive_bad >= args.max_skipped_steps:
            raise UsageError(f"{consecutive_bad} consecutive steps had a non-finite loss or gradient (step {step - 1}); "
                             f"stopped, the last good checkpoint is in {args.out}; try a lower --lr")
        log.step(step, m, data_state)

    run.data_state = loader.state()
    ahead, unread = read(), None  # the next step's batch; the last step's metrics, not yet read
    try:
        while progress["step"] < recipe.steps:
            step, (batch, data_state, data_failure) = progress["step"], ahead
            if jax.process_count() > 1 and checkpoints.any_process(data_failure is not None) and not data_failure:
                data_failure = "another process's data failed (its own line says why)"
            if data_failure:  # systematic, not a few bad samples: keep the last step's work, then one line
                if unread:
                    finish(*unread)
                checkpoint(run)
                raise UsageError(data_failure_line(data_failure, args, step))
            params = run.params
            if args.plant_nan_at == step:  # tests: NaN weights for this step, so a NaN loss and NaN gradients
                params = jax.tree.map(lambda x: x * np.nan, params)
            out = step_fn(params, run.state, run.opt_state, *batch, jax.random.fold_in(rng, step),
                          *(() if run.teacher is None else (run.teacher, distill_weight(args, recipe, step))))
            (params, run.state, run.opt_state, m), run.teacher = out[:4], out[4] if run.teacher is not None else None
            if args.plant_nan_at != step:  # (a skipped step returns its NaN weights: the run goes on from the real ones)
                run.params = params
            progress["step"], run.data_state = step + 1, data_state
            ahead = read() if step + 1 < recipe.steps else None  # while the step runs
            if unread:
                finish(*unread)
            unread = (step + 1, m, data_state)
            if args.stop_after == step + 1:
                stop["signal"] = "--stop-after"
            if jax.process_count() > 1:
                # On CPU the collectives of two programs in flight at once (this step's and any_process's)
                # can pair up in a different order on each process (Gloo: "collective mismatch"): the
                # step ends first. So with several processes only the reading of the next batch overlaps.
                jax.block_until_ready(m)
                if checkpoints.any_process(stop["signal"] is not None) and not stop["signal"]:
                    # A preemption signal reaches each process at its own moment; all must stop after the
                    # same step, or the others would wait forever in the checkpoint's collective.
                    stop["signal"] = "a signal to another process"
            saves, evaluates = (step + 1) % recipe.ckpt_every == 0 or stop["signal"], log.evaluates(step + 1)
            if saves or evaluates or step + 1 == recipe.steps:  # the weights after this step are needed
                finish(*unread)
                unread = None
                if evaluates:
                    log.heldout_retrieval()
                if saves:
                    checkpoint(run)
            if stop["signal"]:
                log.bar.write(f"stopped by {stop['signal']}: checkpoint written at step {step + 1}; exiting")
                break
    finally:
        log.close()
    if log.on:
        print(loader.summary() + ("" if jax.process_count() == 1 else " (process 0's share)"))
    return stop["signal"]


def distill_weight(args, recipe, step):
    """--momentum-distill's weight at `step`: ramped linearly from 0 over the warm-up (ALBEF ramps it over
    the first epoch, alpha x min(1, i / len(data_loader)))."""
    return np.float32(args.momentum_distill * min(1.0, step / recipe.warmup_steps) if recipe.warmup_steps
                      else args.momentum_distill)


def eval_weights(run):
    """What held-out evaluation scores, process 0's copy: the moving average with --ema, else the weights."""
    params, state = (run.teacher["params"], run.teacher["state"]) if run.args.ema else (run.params, run.state)
    return _local(params), _local(state)


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
        if run.args.ema:
            print("held-out evaluation of the moving average of the weights (--ema)")
        result = evaluate.heldout_evaluation(*eval_weights(run), run.cfg, run.tokenizer, run.eval_data,
                                             run.recipe.image_size, run.args.images)
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
            checkpoint(run)  # the last step, when it was not a checkpoint step
    finally:
        loader.close()
    if not stopped:
        evaluate_at_end(run)
    return 0


def main(argv=None):
    args = parse_args(argv)
    # Before JAX starts its CPU client (host.py). Not where it would only slow compiling: tiny's blocks are
    # small, and --memory-report compiles and never runs.
    if (args.image_tower or args.size) != "tiny" and not args.memory_report:
        host.keep_freed_memory()
    try:
        if args.memory_report:
            import memory  # (it imports this file)
            return memory.memory_report(args)
        return train(args)
    except (UsageError, checkpoints.Mismatch, FileNotFoundError) as e:
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
