"""Evaluating ALIGN (Jia et al., ICML 2021) as the paper does: Sec. 5.1-5.3, the ablations' KNN, Sec. 7.

    python evaluate.py retrieval --checkpoint runs/B7 --karpathy dataset_flickr30k.json --images flickr30k-images
    python evaluate.py zeroshot --checkpoint runs/B7 --images imagenet/val
    python evaluate.py cxc --checkpoint runs/B7 --karpathy dataset_coco.json --coco-images coco --cxc cxc/data
    python evaluate.py knn --checkpoint runs/B7 --train imagenet/train --val imagenet/val
    python evaluate.py linear-probe --checkpoint runs/B7 --train imagenet/train --val imagenet/val
    python evaluate.py search --checkpoint runs/B7 --index photos/ --query "seagull in front of a bridge"
    python evaluate.py embed --checkpoint runs/B7 --images photos/ --out photos.npy   (+ photos.txt: the paths)
    python evaluate.py embed --checkpoint runs/B7 --texts captions.txt --out captions.npy

Three files, as in big_vision's image_text_retrieval evaluator, where the metric maths are apart from the
loops that compute embeddings:
  eval_sets.py   the evaluation sets' files -> paths, captions, labels, CxC pairs (Karpathy JSON, class
                 folders, CxC CSVs, saved .npy embeddings).
  this file      the model (`load_model`); files -> pixels (data.py's evaluation preprocessing) ->
                 embeddings, in batches sharded over every device of a `data` mesh, with a tqdm bar,
                 cached on disk; the linear probe's trainer; one subcommand per protocol (`run_*`),
                 each printing a table laid out like the paper's and writing --json; `embed`, which
                 writes the embeddings themselves (.npy) for other tools; the command line.
  metrics.py     pure numpy over the embeddings: Recall@K, top-k accuracy, KNN, CxC, search.

Dimension key:
  N  images (the candidates of a search, the training set of KNN)    M  captions
  Q  queries                 E  embedding width           D  image features (linear probe)
  C  classes                 T  prompt templates, or texts of a search query
  B  batch                   S  image side

Deviations from the paper and the reference protocols (those of the metric maths and the readers are
listed in metrics.py and eval_sets.py: tie handling, CxC positives, Karpathy's first five captions):
  - Linear probe (Sec. 5.3): features are cached once per image (one central crop), so training sees
    no random-crop or flip augmentation; the last partial batch of an epoch is dropped.
  - Every crop uses data.py's 346/289 resize ratio (also at the probe's 360 evaluation size, where
    the paper uses a 0.875 central crop).
  - Unreadable or corrupt images are skipped and counted; a skipped retrieval image takes its
    captions with it (in CxC, whose judgements name images, it stays as a zero embedding).
"""
import argparse
import concurrent.futures
import hashlib
import json
import os
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image, ImageDraw, ImageOps
from tqdm import tqdm

import align
import data
import efficientnet as en
import eval_sets
import metrics
import synthetic
import wordpiece
from eval_sets import UsageError  # raised here too, for bad flags

SINGLE_PROMPT = "a photo of a {}."  # Sec. 5.2's ablation: one prompt instead of CLIP's 80 (-2.9% top-1)


# ---------------------------------------------------------------------------------------------------
# From files to embeddings: data.py's evaluation preprocessing, sharded batches, an on-disk cache


class Model(NamedTuple):
    cfg: align.Config
    weights: tuple           # (params, state), replicated over the mesh
    tokenizer: wordpiece.Tokenizer
    fingerprint: str         # names the weights in cache keys


def _mesh():
    # One `data` axis over this process's devices: each embedding batch is split over all of them, the
    # weights replicated. Local ones, because train.py's process 0 evaluates alone while the others wait.
    # jax.make_mesh's default axis types reject plain numpy inputs in jax 0.10.
    return Mesh(np.array(jax.local_devices()), ("data",))


def load_model(checkpoint, vocab=None):
    """A model directory, a training run's --out (its newest checkpoint) or an HF AlignModel directory."""
    try:
        path = align.model_dir(checkpoint)
        vocab = vocab or os.path.join(path, "vocab.txt")
        if not os.path.exists(vocab):
            raise UsageError(f"{path} has no vocab.txt; pass --vocab with the model's WordPiece vocabulary")
        params, state, cfg = align.load(path)
    except (FileNotFoundError, KeyError, ValueError) as e:  # align and weights say what is wrong in one line
        raise UsageError(f"--checkpoint {e}" if isinstance(e, FileNotFoundError) else str(e))
    weights_file = os.path.join(path, "model.safetensors")
    stat = os.stat(weights_file) if os.path.exists(weights_file) else None
    fingerprint = json.dumps([os.path.realpath(path), stat and (stat.st_size, stat.st_mtime_ns),
                              os.path.realpath(vocab)])
    weights = jax.device_put((params, state), NamedSharding(_mesh(), P()))
    return Model(cfg, weights, wordpiece.Tokenizer(vocab), fingerprint)


def eval_pixels(path, image_size):
    """An image file -> uint8 [S, S, 3], ALIGN's evaluation preprocessing (Sec. 5: resize to 346x346,
    central 289 crop, scaled with S). Composed from data.py's pieces; raises data.BadSample(reason)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError:
        raise data.BadSample("missing_image")
    img = data.decode_image(raw, data.resize_for(image_size))
    x0, y0, flip = data.crop_params(image_size, None)
    return data.crop_pixels(img, image_size, x0, y0, flip)


def _cached(cache, key, compute):
    """compute() -> (array, ok_N, skipped dict), kept in `cache`/<hash of key>.npz when cache is set."""
    if not cache:
        return compute()
    os.makedirs(cache, exist_ok=True)
    path = os.path.join(cache, hashlib.sha1(json.dumps(key).encode()).hexdigest()[:20] + ".npz")
    if os.path.exists(path):
        with np.load(path) as f:
            return f["x"], f["ok"], json.loads(str(f["skipped"]))
    x, ok, skipped = compute()
    tmp = f"{path}.{os.getpid()}.tmp.npz"
    np.savez(tmp, x=x, ok=ok, skipped=json.dumps(skipped))
    os.replace(tmp, path)  # atomic: a run killed mid-write leaves no half cache
    return x, ok, skipped


def _sharded_batches(fn, weights, n, get_batch, batch, desc):
    """fn(weights, *get_batch(start, stop)) over n rows, each batch split over the devices -> np [n, ...].

    Batches are padded to a multiple of the device count, the last one to the full batch so that jit
    compiles once; the next batch is read (decoded, tokenized) while the devices work on this one.
    """
    mesh = _mesh()
    batch = -(-batch // mesh.size) * mesh.size
    rep, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    run, out = None, []
    blocks = metrics.blocks(n, batch)
    if not blocks:
        return np.zeros((0, 0), np.float32)
    with concurrent.futures.ThreadPoolExecutor(1) as reader, \
            tqdm(total=n, desc=desc, unit="row", disable=None) as bar:
        pending = reader.submit(get_batch, *blocks[0])
        for k, (b0, b1) in enumerate(blocks):
            arrays = pending.result()
            if k + 1 < len(blocks):
                pending = reader.submit(get_batch, *blocks[k + 1])
            if run is None:
                run = jax.jit(fn, in_shardings=(rep,) + (rows,) * len(arrays), out_shardings=rep)
            padded = [np.concatenate([a, np.zeros((batch - len(a),) + a.shape[1:], a.dtype)]) for a in arrays]
            out.append(np.asarray(run(weights, *padded), np.float32)[:b1 - b0])
            bar.update(b1 - b0)
    return np.concatenate(out)


def _image_key(paths):
    h = hashlib.sha1()
    for p in paths:
        st = os.stat(p) if os.path.exists(p) else None
        h.update(json.dumps([os.path.abspath(p), st and (st.st_size, st.st_mtime_ns)]).encode())
    return h.hexdigest()


def embed_image_files(model, paths, image_size, *, batch=64, workers=8, cache=None, features=False):
    """Images -> (embeddings_NE, ok_N, skipped {reason: {"count", "example"}}); unreadable rows are NaN.

    features=True gives the EfficientNet pooled features [N, D] instead: the frozen image encoder of
    Sec. 5.3, before any projection, for the linear probe.
    """
    cfg = model.cfg
    if features:
        fn = lambda w, x: en.apply(w[0]["image"], w[1], x, cfg.image)[0]
    else:
        fn = lambda w, x: align.embed_images(w[0], w[1], x, cfg)

    def compute():
        ok, skipped = np.zeros(len(paths), bool), {}

        def one(i):
            try:
                return eval_pixels(paths[i], image_size), None
            except data.BadSample as bad:
                return None, bad.args[0]

        def get_batch(b0, b1):
            pixels_BSSC = np.zeros((b1 - b0, image_size, image_size, 3), np.uint8)
            for j, (px, reason) in enumerate(decoders.map(one, range(b0, b1))):
                if reason:
                    skipped.setdefault(reason, {"count": 0, "example": paths[b0 + j]})["count"] += 1
                else:
                    ok[b0 + j] = True
                    pixels_BSSC[j] = px
            return [data.model_pixels(pixels_BSSC)]  # [-1, 1], as data.py's loader and HF's ALIGN

        with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as decoders:
            out = _sharded_batches(fn, model.weights, len(paths), get_batch, batch,
                                   "image features" if features else "images")
        out[~ok] = np.nan
        return out, ok, skipped

    key = ["features" if features else "images", model.fingerprint, image_size, _image_key(paths)]
    return _cached(cache, key, compute)


def embed_text_list(model, texts, *, batch=256, cache=None):
    """Texts -> L2-normalised embeddings [M, E], tokenized at the model's max_len (64, Sec. 5)."""
    cfg, max_len = model.cfg, model.cfg.text.max_len
    fn = lambda w, ids, mask: align.embed_texts(w[0], ids, mask, cfg)

    def compute():
        get_batch = lambda b0, b1: list(model.tokenizer.encode(texts[b0:b1], max_len))
        out = _sharded_batches(fn, model.weights, len(texts), get_batch, batch, "texts")
        return out, np.ones(len(texts), bool), {}

    key = ["texts", model.fingerprint, max_len, hashlib.sha1("\n".join(texts).encode()).hexdigest()]
    return _cached(cache, key, compute)[0]


def _report_skipped(skipped, total):
    if skipped:
        reasons = ", ".join(f"{r} {s['count']} (e.g. {s['example']})" for r, s in sorted(skipped.items()))
        print(f"skipped {sum(s['count'] for s in skipped.values())} of {total} images: {reasons}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------
# Held-out scores of a training run (train.py, bench.py learn): retrieval, and per attribute on synthetic data


def heldout_embeddings(params, state, cfg, tokenizer, eval_data, image_size, batch=64):
    """(img_NE, txt_NE): embeddings of the held-out pairs, in order, one caption per image."""
    imgs, txts = [], []
    loader = data.make_loader(eval_data, tokenizer=tokenizer, global_batch=batch, image_size=image_size,
                              train=False, max_len=cfg.text.max_len, workers=0)
    for b in loader:
        v = b["valid"]
        imgs.append(np.asarray(align.embed_images(params, state, b["pixels"], cfg))[v])
        txts.append(np.asarray(align.embed_texts(params, b["ids"], b["mask"], cfg))[v])
    return np.concatenate(imgs), np.concatenate(txts)


def attribute_accuracy(embed_texts, tokenizer, max_len, img_NE, batch=64):
    """What a model learned of each attribute of the synthetic scenes: zero-shot top-1 accuracy in percent
    on the held-out scenes of one group (`synthetic.attribute_probes`), and chance. `embed_texts(ids, mask)`:
    any model's L2-normalised text embeddings as numpy (bench.py's `learn` passes HF's)."""
    probes = synthetic.attribute_probes(len(img_NE))
    texts = sorted({c for _, captions, _ in probes.values() for row in captions for c in row})
    ids, mask = tokenizer.encode(texts + [""] * (-len(texts) % batch), max_len)  # whole batches
    txt_TE = np.concatenate([embed_texts(ids[i:i + batch], mask[i:i + batch]) for i in range(0, len(ids), batch)])
    row = {t: i for i, t in enumerate(texts)}
    table = {}
    for attribute, (index, captions, true) in probes.items():
        cand_NVE = txt_TE[[[row[c] for c in r] for r in captions]]
        table[attribute] = {"accuracy": metrics.probe_accuracy(img_NE[index], cand_NVE, np.array(true)),
                            "chance": 100.0 / len(captions[0]), "images": len(index)}
    return table


def readable_recalls(img_NE, ok_N, txt_ME, txt_to_img_M, **kw):
    """Retrieval recalls over the images that could be read: a skipped image takes its captions with it,
    and the rest are renumbered."""
    keep_M = ok_N[txt_to_img_M]
    new_index = np.cumsum(ok_N) - 1
    return metrics.retrieval_recalls(img_NE[ok_N], txt_ME[keep_M], new_index[txt_to_img_M[keep_M]], **kw)


def heldout_retrieval(params, state, cfg, tokenizer, eval_data, image_size, images=None):
    """(recalls both ways, images, captions, img_NE) on held-out pairs, Sec. 5.1's protocol: a Karpathy
    JSON's val split with every image's captions (`images`: its folder), as `evaluate.py retrieval` scores
    it; or a source's pairs in order, one caption per image (`heldout_embeddings`), whose image
    embeddings come back too (None for a Karpathy JSON)."""
    if not eval_data.endswith(".json"):
        img_NE, txt_NE = heldout_embeddings(params, state, cfg, tokenizer, eval_data, image_size)
        return metrics.retrieval_recalls(img_NE, txt_NE, np.arange(len(img_NE))), len(img_NE), len(txt_NE), img_NE
    paths, captions, txt_to_img, _, _ = eval_sets.read_karpathy(eval_data, "val", images)
    model = Model(cfg, jax.device_put((params, state), NamedSharding(_mesh(), P())), tokenizer, "")
    img_NE, ok, skipped = embed_image_files(model, paths, image_size)
    _report_skipped(skipped, len(paths))
    if not ok.any():
        raise data.TooManyBadSamples(f"none of the {len(paths)} val images of {eval_data} could be read")
    recalls = readable_recalls(img_NE, ok, embed_text_list(model, captions), txt_to_img)
    return recalls, int(ok.sum()), int(ok[txt_to_img].sum()), None


def heldout_evaluation(params, state, cfg, tokenizer, eval_data, image_size, images=None):
    """Held-out retrieval R@1/5/10 both ways (Sec. 5.1's protocol), and per attribute on synthetic data."""
    t0 = time.perf_counter()
    r, n, m, img_NE = heldout_retrieval(params, state, cfg, tokenizer, eval_data, image_size, images)
    what = f"{n} pairs" if n == m else f"{n} images and {m} captions"
    print(f"held-out retrieval on {what} ({time.perf_counter() - t0:.0f} s; chance R@1 = {100 / n:.1f}%):")
    for name, key in (("image->text", "i2t"), ("text->image", "t2i")):
        print(f"  {name} R@1 {r[key]['R@1']:.1f}  R@5 {r[key]['R@5']:.1f}  R@10 {r[key]['R@10']:.1f}")
    result = {"pairs": n, **r} if n == m else {"images": n, "captions": m, **r}
    if eval_data.startswith("synthetic"):
        embed_texts = lambda ids, mask: np.asarray(align.embed_texts(params, ids, mask, cfg))
        result["attributes"] = attribute_accuracy(embed_texts, tokenizer, cfg.text.max_len, img_NE)
        print(f"zero-shot accuracy per attribute, on the {result['attributes']['colour']['images']} held-out scenes "
              "of one group (the true caption against the same caption with that attribute changed):")
        for attribute, row in result["attributes"].items():
            print(f"  {attribute:<9} {row['accuracy']:5.1f}%   (chance {row['chance']:.1f}%)")
    return result


# ---------------------------------------------------------------------------------------------------
# Tables and JSON


def print_table(title, groups, row_name="ours"):
    """Prints {group: {column: value}} as the paper lays out its tables: group names over their columns."""
    cell = lambda v: f"{v:.1f}" if isinstance(v, float) else str(v)
    widths = {g: [max(6, len(c), len(cell(v))) for c, v in cols.items()] for g, cols in groups.items()}
    lines = [" " * 8, " " * 8, f"{row_name:8s}"]
    for g, cols in groups.items():
        span = sum(widths[g]) + 2 * (len(cols) - 1)
        lines[0] += "   " + g.center(span)
        lines[1] += "   " + "  ".join(c.rjust(w) for c, w in zip(cols, widths[g]))
        lines[2] += "   " + "  ".join(cell(v).rjust(w) for v, w in zip(cols.values(), widths[g]))
    print(title)
    print("\n".join(line.rstrip() for line in lines))


def _write_json(path, result):
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


# ---------------------------------------------------------------------------------------------------
# Subcommands


def _need_model(args):
    """The --checkpoint model; also settles --image-size: by default the crop side the model was trained at."""
    if not args.checkpoint:
        raise UsageError("pass --checkpoint (a model directory, a training --out directory or an HF Align directory)")
    model = load_model(args.checkpoint, args.vocab)
    trained = model.cfg.image_size
    if args.image_size is None:
        args.image_size = trained
    elif args.image_size != trained:
        print(f"evaluate.py: warning: --image-size {args.image_size} differs from the {trained} the model was "
              "trained at", file=sys.stderr)
    if getattr(args, "val_image_size", 0) is None:  # linear probe, Sec. 5.3: evaluated at 360 for 289
        args.val_image_size = round(args.image_size * 360 / 289)
    return model


def _image_embeddings(args, model, paths, order):
    """(img_NE, ok_N, skipped): --image-embeddings (rows in `order`), else the model on the files."""
    if args.image_embeddings:
        img_NE = eval_sets.load_npy(args.image_embeddings, len(paths), "--image-embeddings", order)
        return img_NE, np.ones(len(paths), bool), {}
    img_NE, ok, skipped = embed_image_files(model, paths, args.image_size, batch=args.batch_size,
                                            workers=args.workers, cache=args.cache)
    _report_skipped(skipped, len(paths))
    return img_NE, ok, skipped


def run_retrieval(args):
    """Sec. 5.1, Table 1: Flickr30K (1K test) and MSCOCO (5K test) image<->text Recall@1/5/10."""
    paths, captions, txt_to_img, _, _ = eval_sets.read_karpathy(args.karpathy, args.split, args.images,
                                                                args.captions_per_image)
    model = None if (args.image_embeddings and args.text_embeddings) else _need_model(args)
    if not args.image_embeddings and args.images is None:
        raise UsageError("pass --images (the folder of the Karpathy JSON's images) or --image-embeddings")
    img_NE, ok, skipped = _image_embeddings(args, model, paths, f"one per {args.split} image, in the JSON's order")
    if args.text_embeddings:
        txt_ME = eval_sets.load_npy(args.text_embeddings, len(captions), "--text-embeddings",
                                    "one per caption, in the JSON's order")
    else:
        txt_ME = embed_text_list(model, captions, batch=args.batch_size, cache=args.cache)
    if not ok.any():
        raise UsageError(f"--images {args.images}: none of the {len(paths)} images could be read")
    eval_sets.same_width(img_NE, txt_ME)
    result = readable_recalls(img_NE, ok, txt_ME, txt_to_img, ties=args.ties, block=args.block)
    keep_M = ok[txt_to_img]
    result["info"] = {"images": int(ok.sum()), "captions": int(keep_M.sum()), "split": args.split,
                      "image_size": args.image_size, "skipped_images": skipped, "ties": args.ties}
    print_table(f"Image-text retrieval, {args.karpathy} split {args.split!r}: {ok.sum()} images, "
                f"{keep_M.sum()} captions (ALIGN Table 1)",
                {"image -> text": result["i2t"], "text -> image": result["t2i"]})
    return result


def run_zeroshot(args):
    """Sec. 5.2, Table 4: zero-shot classification with CLIP's 80 prompts ensembled per class."""
    paths, labels, dirs = eval_sets.read_class_folders(args.images)
    names = eval_sets.class_names(dirs, args.classnames)
    templates = [SINGLE_PROMPT] if args.single_prompt else \
        eval_sets.read_lines(args.templates or os.path.join(eval_sets.EVAL_DATA, "imagenet_templates.txt"),
                             "--templates")
    if not all("{}" in t for t in templates):
        raise UsageError(f"--templates {args.templates}: every line needs a {{}} where the class name goes")
    model = None if (args.image_embeddings and args.text_embeddings) else _need_model(args)
    img_NE, ok, skipped = _image_embeddings(args, model, paths, "one per image: sorted class folders, sorted files")
    if args.text_embeddings:
        txt = eval_sets.load_npy(args.text_embeddings, len(names), "--text-embeddings",
                                 "one per class ([C, E]) or per class and prompt ([C, T, E])")
        class_CE = metrics.class_embeddings(txt) if txt.ndim == 3 else txt
    else:
        prompts = [t.format(name) for name in names for t in templates]
        txt_CTE = embed_text_list(model, prompts, batch=args.batch_size, cache=args.cache)
        class_CE = metrics.class_embeddings(txt_CTE.reshape(len(names), len(templates), -1))
    eval_sets.same_width(img_NE, class_CE)
    acc = metrics.classification_accuracy(img_NE[ok], class_CE, labels[ok], ks=(1, 5), ties=args.ties,
                                          block=args.block)
    result = {**acc, "info": {"images": int(ok.sum()), "classes": len(names), "prompts": len(templates),
                              "image_size": args.image_size, "skipped_images": skipped, "ties": args.ties}}
    print_table(f"Zero-shot classification, {args.images}: {ok.sum()} images, {len(names)} classes, "
                f"{len(templates)} prompt{'s' * (len(templates) > 1)} per class (ALIGN Table 4)", {"accuracy": acc})
    return result


def run_cxc(args):
    """Sec. 5.1, Tables 2-3: CxC retrieval (i2t, t2i, t2t, i2i) and STS / SIS / SITS correlations."""
    paths, captions, txt_to_img, sentids, names = eval_sets.read_karpathy(args.karpathy, args.split,
                                                                          args.coco_images, args.captions_per_image)
    pairs, dropped = eval_sets.read_cxc(args.cxc, args.split, {n: i for i, n in enumerate(names)},
                                        {s: j for j, s in enumerate(sentids) if s is not None})
    model = _need_model(args)
    img_NE, ok, skipped = embed_image_files(model, paths, args.image_size, batch=args.batch_size,
                                            workers=args.workers, cache=args.cache)
    _report_skipped(skipped, len(paths))
    img_NE = np.where(ok[:, None], img_NE, 0.0)  # CxC names images: a skipped one keeps its row, scoring 0
    txt_ME = embed_text_list(model, captions, batch=args.batch_size, cache=args.cache)
    result = metrics.cxc_scores(img_NE, txt_ME, txt_to_img, pairs, args.cxc_threshold, n_boot=args.bootstrap,
                                seed=args.seed, ties=args.ties, block=args.block)
    result["info"] = {"images": len(paths), "captions": len(captions), "image_size": args.image_size,
                      "pairs": {t: len(p[0]) for t, p in pairs.items()}, "dropped_pairs": dropped,
                      "skipped_images": skipped, "threshold": args.cxc_threshold, "bootstrap": args.bootstrap,
                      "ties": args.ties}
    print_table(f"CxC retrieval, split {args.split!r}: {len(paths)} images, {len(captions)} captions (ALIGN Table 2)",
                {"image -> text": result["i2t"], "text -> image": result["t2i"],
                 "text -> text": result["t2t"], "image -> image": result["i2i"]})
    print_table("CxC Spearman's R bootstrap correlation x 100 (ALIGN Table 3)",
                {t.upper(): {"avg ± std": f"{result[t]['mean']:.1f}±{result[t]['std']:.1f}"}
                 for t in eval_sets.CXC_COLUMNS}
                | {"Mean": {"avg": result["mean_avg"]}})
    return result


def _labelled_images(model, args, folder, image_size, features=False):
    paths, labels, dirs = eval_sets.read_class_folders(folder)
    x, ok, skipped = embed_image_files(model, paths, image_size, batch=args.batch_size, workers=args.workers,
                                       cache=args.cache, features=features)
    _report_skipped(skipped, len(paths))
    return x[ok], labels[ok], dirs, skipped


def _common_classes(train_dirs, val_dirs, val_label):
    """Val labels renumbered into the training folders' classes; a val class unknown to training is an error."""
    missing = sorted(set(val_dirs) - set(train_dirs))
    if missing:
        raise UsageError(f"--val has {len(missing)} class folders that --train lacks (e.g. {missing[0]})")
    return np.array([train_dirs.index(d) for d in val_dirs], np.int64)[val_label]


def run_knn(args):
    """Footnote 3, Tables 8-10: each validation image's nearest training images by ALIGN image embedding."""
    model = _need_model(args)
    train_NE, train_label, train_dirs, _ = _labelled_images(model, args, args.train, args.image_size)
    val_QE, val_label, val_dirs, skipped = _labelled_images(model, args, args.val, args.image_size)
    val_label = _common_classes(train_dirs, val_dirs, val_label)
    recall = metrics.knn_recall(val_QE, train_NE, val_label, train_label, ks=tuple(args.ks), ties=args.ties,
                                block=args.block)
    result = {**recall, "info": {"train_images": len(train_NE), "val_images": len(val_QE), "classes": len(train_dirs),
                                 "image_size": args.image_size,
                                 "skipped_val_images": skipped, "ties": args.ties}}
    print_table(f"KNN: {len(val_QE)} val images against {len(train_NE)} training images (ALIGN Tables 8-10)",
                {"ImageNet KNN": recall})
    return result


def train_linear_probe(x_ND, label_N, num_classes, *, epochs=100, batch_size=1024, lr=0.1, momentum=0.9,
                       decay_every=30, decay=0.2, weight_decay=0.0, seed=0):
    """Sec. 5.3 with frozen features: a linear softmax classifier trained by SGD, momentum 0.9, learning
    rate 0.1 decayed x0.2 every 30 epochs, 100 epochs, batch 1024, no weight decay.
    Returns {"kernel": [D, C], "bias": [C]} (numpy)."""
    x_ND, label_N = np.asarray(x_ND, np.float32), np.asarray(label_N, np.int32)
    batch_size = min(batch_size, len(x_ND))
    steps = len(x_ND) // batch_size  # the last partial batch of each epoch is dropped
    schedule = optax.exponential_decay(lr, decay_every * steps, decay, staircase=True)
    opt = optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(schedule, momentum=momentum))
    w = {"kernel": jnp.zeros((x_ND.shape[1], num_classes)), "bias": jnp.zeros((num_classes,))}
    opt_state = opt.init(w)

    @jax.jit
    def step(w, opt_state, x_BD, y_B):
        def loss(w):
            logits_BC = x_BD @ w["kernel"] + w["bias"]
            return optax.softmax_cross_entropy_with_integer_labels(logits_BC, y_B).mean()
        value, grads = jax.value_and_grad(loss)(w)
        updates, opt_state = opt.update(grads, opt_state, w)
        return optax.apply_updates(w, updates), opt_state, value

    rng = np.random.default_rng(seed)
    with tqdm(range(epochs), desc="linear probe", unit="epoch", disable=None) as bar:
        for _ in bar:
            order = rng.permutation(len(x_ND))
            for s in range(steps):
                idx = order[s * batch_size:(s + 1) * batch_size]
                w, opt_state, value = step(w, opt_state, x_ND[idx], label_N[idx])
            bar.set_postfix(loss=f"{float(value):.3f}")
    return jax.tree.map(np.asarray, w)


def run_linear_probe(args):
    """Sec. 5.3, Table 5 ("w/ frozen features"): train at 289, evaluate at 360."""
    model = _need_model(args)
    train_ND, train_label, train_dirs, _ = _labelled_images(model, args, args.train, args.image_size, features=True)
    val_QD, val_label, val_dirs, skipped = _labelled_images(model, args, args.val, args.val_image_size, features=True)
    val_label = _common_classes(train_dirs, val_dirs, val_label)
    w = train_linear_probe(train_ND, train_label, len(train_dirs), epochs=args.epochs, batch_size=args.probe_batch_size,
                           lr=args.lr, decay_every=args.decay_every, weight_decay=args.weight_decay, seed=args.seed)
    ones = lambda x: np.c_[x, np.ones(len(x), np.float32)]  # logits = [x, 1] . [kernel; bias]
    classes_CD = np.r_[w["kernel"], w["bias"][None]].T
    acc = metrics.classification_accuracy(ones(val_QD), classes_CD, val_label, ks=(1, 5), ties=args.ties,
                                          block=args.block)
    train_acc = metrics.classification_accuracy(ones(train_ND), classes_CD, train_label, ks=(1,), ties=args.ties,
                                                block=args.block)
    result = {**acc, "info": {"train_top1": train_acc["top1"], "train_images": len(train_ND), "val_images": len(val_QD),
                              "classes": len(train_dirs), "features": int(train_ND.shape[1]),
                              "train_size": args.image_size, "val_size": args.val_image_size, "epochs": args.epochs,
                              "skipped_val_images": skipped}}
    print_table(f"Linear probe on frozen features: {len(train_ND)} training images at {args.image_size}, "
                f"{len(val_QD)} val images at {args.val_image_size} (ALIGN Table 5)", {"Acc w/ frozen features": acc})
    return result


def search_grid(query_label, query_image, results, thumb=128):
    """Figures 4-5: the query (its image, if any, first) and the results in one row, scores below."""
    cells = ([(query_image, "query")] if query_image else []) + [(p, f"{s:.3f}") for p, s in results]
    header, footer = 24, 18
    grid = Image.new("RGB", (thumb * len(cells), header + thumb + footer), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((4, 6), query_label, fill="black")
    for c, (path, label) in enumerate(cells):
        try:
            with open(path, "rb") as f:
                img = ImageOps.pad(data.decode_image(f.read(), thumb), (thumb, thumb), color=(235, 235, 235))
        except (OSError, data.BadSample):  # unreadable since it was indexed: leave a grey cell
            img = Image.new("RGB", (thumb, thumb), (200, 200, 200))
        grid.paste(img, (c * thumb, header))
        draw.text((c * thumb + 4, header + thumb + 3), label, fill="black")
    return grid


def run_search(args):
    """Sec. 7, Figures 4-5: text, image, or image +- text queries against an index folder."""
    if not (args.query or args.image):
        raise UsageError("pass --query TEXT, --image PATH, or both (--minus TEXT subtracts a text)")
    model = _need_model(args)
    paths = eval_sets.list_images(args.index)
    index_NE, ok, skipped = embed_image_files(model, paths, args.image_size, batch=args.batch_size,
                                              workers=args.workers, cache=args.cache)
    _report_skipped(skipped, len(paths))
    paths = [p for p, good in zip(paths, ok) if good]
    index_NE = index_NE[ok]
    image_E = None
    if args.image:
        query_1E, query_ok, _ = embed_image_files(model, [args.image], args.image_size, batch=1, workers=1)
        if not query_ok[0]:
            raise UsageError(f"--image {args.image}: not a readable image")
        image_E = query_1E[0]
    texts = [t for t in [args.query] if t] + list(args.minus)
    txt_TE = embed_text_list(model, texts, cache=None) if texts else np.zeros((0, model.cfg.embed_dim))
    plus, minus = txt_TE[:1 if args.query else 0], txt_TE[1 if args.query else 0:]
    query_E = metrics.combine_query(image_E, plus, minus, args.image_weight, args.text_weight)
    scores, idx = metrics.top_k(query_E[None], index_NE, args.top_k + 1, block=args.block)
    same = lambda p: args.image and os.path.realpath(p) == os.path.realpath(args.image)
    hits = [(paths[i], float(s)) for s, i in zip(scores[0], idx[0]) if not same(paths[i])][:args.top_k]
    label = " ".join(([f"[{os.path.basename(args.image)}]"] if args.image else [])
                     + ([("+ " if args.image else "") + repr(args.query)] if args.query else [])
                     + [f"- {t!r}" for t in args.minus])
    print(f"search {label} over {len(paths)} images (ALIGN Sec. 7):")
    for r, (p, s) in enumerate(hits, 1):
        print(f"{r:3d}  {s:.4f}  {p}")
    search_grid(label, args.image, hits, args.thumb).save(args.grid)
    print(f"grid: {args.grid}")
    return {"query": {"text": args.query, "minus": list(args.minus), "image": args.image,
                      "text_weight": args.text_weight, "image_weight": args.image_weight},
            "results": [{"path": p, "score": s} for p, s in hits], "grid": args.grid,
            "info": {"index_images": len(paths), "image_size": args.image_size, "skipped_images": skipped}}


def run_embed(args):
    """Embeddings for other tools: L2-normalised float32 rows, as the other subcommands compute them.

    --images DIR: every image under DIR in sorted order (unreadable ones skipped and reported); --texts FILE:
    one caption a line. Writes OUT (.npy, [rows, E]) and beside it OUT with .txt, what each row is: the image's
    path or the caption, one a line.
    """
    if bool(args.images) == bool(args.texts):
        raise UsageError("pass --images DIR or --texts FILE (one of them)")
    out = args.out if args.out.endswith(".npy") else args.out + ".npy"
    if args.images:
        paths = eval_sets.list_images(args.images)
        model = _need_model(args)
        x, ok, skipped = embed_image_files(model, paths, args.image_size, batch=args.batch_size,
                                           workers=args.workers, cache=args.cache)
        _report_skipped(skipped, len(paths))
        rows, x = [p for p, good in zip(paths, ok) if good], x[ok]
        if not rows:
            raise UsageError(f"--images {args.images}: none of the {len(paths)} images could be read")
    else:
        rows, skipped = eval_sets.read_lines(args.texts, "--texts"), {}
        if not rows:
            raise UsageError(f"--texts {args.texts}: no captions in it")
        model = _need_model(args)
        x = embed_text_list(model, rows, batch=args.batch_size, cache=args.cache)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    np.save(out, np.asarray(x, np.float32))
    listing = out[:-len(".npy")] + ".txt"
    with open(listing, "w", encoding="utf-8") as f:
        f.writelines(r + "\n" for r in rows)
    print(f"{len(rows)} {'images' if args.images else 'texts'} -> {out} [{len(rows)}, {x.shape[1]}] float32, "
          f"rows listed in {listing}")
    return {"out": out, "rows": listing, "shape": [len(rows), int(x.shape[1])],
            "info": {"image_size": args.image_size if args.images else None, "skipped_images": skipped}}


# ---------------------------------------------------------------------------------------------------
# Command line


def _parser():
    ap = argparse.ArgumentParser(description="Evaluate ALIGN as the paper does (Sec. 5-7).")
    sub = ap.add_subparsers(dest="command", required=True)
    default_cache = os.environ.get("ALIGN_EVAL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "align_eval")

    def command(name, fn, help):
        p = sub.add_parser(name, help=help, description=fn.__doc__)
        p.set_defaults(run=fn)
        p.add_argument("--checkpoint",
                       help="model directory, training --out directory (newest ckpt_*) or HF Align directory")
        p.add_argument("--vocab", help="vocab.txt (default: the model directory's)")
        p.add_argument("--json", help="write the results here")
        p.add_argument("--image-size", type=int,
                       help="central crop side (default: the size the model was trained at; Sec. 5: 289 of 346)")
        p.add_argument("--batch-size", type=int, default=64, help="rows per embedding batch (split over all devices)")
        p.add_argument("--workers", type=int, default=8, help="threads decoding images")
        p.add_argument("--cache", default=default_cache, help="embedding cache folder (default %(default)s)")
        p.add_argument("--no-cache", dest="cache", action="store_const", const=None)
        p.add_argument("--block", type=int, default=4096,
                       help="similarity tile side: about 12 x block^2 bytes of memory")
        p.add_argument("--ties", choices=("expected", "pessimistic"), default="expected")
        p.add_argument("--seed", type=int, default=0)
        return p

    p = command("retrieval", run_retrieval, "Flickr30K / MSCOCO image-text retrieval (Table 1)")
    p.add_argument("--karpathy", required=True, help="dataset_flickr30k.json or dataset_coco.json")
    p.add_argument("--images", help="folder of the images (COCO: the folder holding val2014/)")
    p.add_argument("--split", default="test")
    p.add_argument("--captions-per-image", type=int, default=5, help="0: all of them")
    p.add_argument("--image-embeddings", help=".npy [N, E], one row per image of the split in the JSON's order")
    p.add_argument("--text-embeddings", help=".npy [M, E], one row per caption in the JSON's order")

    p = command("zeroshot", run_zeroshot, "zero-shot classification with prompt ensembling (Table 4)")
    p.add_argument("--images", required=True, help="one subfolder per class (ImageNet val, -R, -A, -V2 layouts)")
    p.add_argument("--classnames", help="class names (default: eval_data/imagenet_classnames.txt)")
    p.add_argument("--templates",
                   help="prompt templates with {} (default: CLIP's 80, eval_data/imagenet_templates.txt)")
    p.add_argument("--single-prompt", action="store_true", help=f"the ablation: only {SINGLE_PROMPT!r}")
    p.add_argument("--image-embeddings", help=".npy [N, E]: sorted class folders, sorted files")
    p.add_argument("--text-embeddings", help=".npy [C, E] class embeddings or [C, T, E] prompt embeddings")

    p = command("cxc", run_cxc, "Crisscrossed Captions retrieval and correlations (Tables 2-3)")
    p.add_argument("--coco-images", required=True, help="folder holding val2014/ (or the images themselves)")
    p.add_argument("--karpathy", required=True, help="dataset_coco.json")
    p.add_argument("--cxc", required=True, help="folder with sts/sis/sits_{val,test}.csv")
    p.add_argument("--split", default="test", choices=("val", "test"))
    p.add_argument("--captions-per-image", type=int, default=5)
    p.add_argument("--cxc-threshold", type=float, default=3.0, help="agg_score that makes a CxC pair a positive")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the correlations")

    p = command("knn", run_knn, "ImageNet KNN recall (footnote 3, Tables 8-10)")
    p.add_argument("--train", required=True, help="class folders to retrieve from")
    p.add_argument("--val", required=True, help="class folders of the queries")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10])

    p = command("linear-probe", run_linear_probe, "linear classifier on frozen features (Sec. 5.3, Table 5)")
    p.add_argument("--train", required=True)
    p.add_argument("--val", required=True)
    p.add_argument("--val-image-size", type=int,
                   help="default: 360/289 x --image-size (Sec. 5.3: train/eval resolution 289/360)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--probe-batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--decay-every", type=int, default=30, help="epochs between x0.2 learning-rate decays")
    p.add_argument("--weight-decay", type=float, default=0.0)

    p = command("search", run_search, "text / image / image +- text search over a folder (Sec. 7, Figures 4-5)")
    p.add_argument("--index", required=True, help="folder of images, embedded once and cached")
    p.add_argument("--query", help="text query (added to --image when both are given)")
    p.add_argument("--image", help="image query")
    p.add_argument("--minus", action="append", default=[], help="text to subtract (repeatable)")
    p.add_argument("--text-weight", type=float, default=2.0, help="Sec. 7 footnote 4: 2 for text")
    p.add_argument("--image-weight", type=float, default=1.0, help="and 1 for the image")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--grid", default="search_grid.png", help="PNG of the query and its top results")
    p.add_argument("--thumb", type=int, default=128, help="side of each grid cell")

    p = command("embed", run_embed, "embeddings of a folder of images or a file of captions, for other tools")
    p.add_argument("--images", help="folder: every image in it or below it, in sorted order")
    p.add_argument("--texts", help="text file, one caption a line (blank lines skipped)")
    p.add_argument("--out", required=True, help="OUT.npy, and beside it OUT.txt naming each row")
    return ap


def main(argv=None):
    """Runs one subcommand and returns its result dict (also printed as a table and written to --json)."""
    args = _parser().parse_args(argv)
    try:
        result = args.run(args)
    except (UsageError, data.BadSample) as e:
        print(f"evaluate.py {args.command}: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    _write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
