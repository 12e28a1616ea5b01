"""Evaluating ALIGN (Jia et al., ICML 2021) as the paper does: Sec. 5.1-5.3, the ablations' KNN, Sec. 7.

    python evaluate.py retrieval --checkpoint runs/B7 --karpathy dataset_flickr30k.json --images flickr30k-images
    python evaluate.py zeroshot --checkpoint runs/B7 --images imagenet/val
    python evaluate.py cxc --checkpoint runs/B7 --karpathy dataset_coco.json --coco-images coco --cxc cxc/data
    python evaluate.py knn --checkpoint runs/B7 --train imagenet/train --val imagenet/val
    python evaluate.py linear-probe --checkpoint runs/B7 --train imagenet/train --val imagenet/val
    python evaluate.py search --checkpoint runs/B7 --index photos/ --query "seagull in front of a bridge"

Two layers, as in big_vision's image_text_retrieval evaluator:
  metric maths   pure numpy over embeddings, each with a tiny example: `retrieval_recalls` (which
                 train.py calls for its held-out retrieval), `classification_accuracy`, `knn_recall`,
                 `spearman_bootstrap`, `cxc_scores`, `top_k`, `class_embeddings`, `combine_query`. Similarities are
                 computed in tiles of `block` x `block`, so 1M images x 5M captions never build the matrix.
  embedding      files -> pixels (data.py's evaluation preprocessing) -> embeddings, in batches sharded
                 over every device of a `data` mesh, with a tqdm bar, cached on disk.
Every subcommand prints a table laid out like the paper's and writes --json.

Dimension key:
  N  images (the candidates of a search, the training set of KNN)    M  captions
  Q  queries                 E  embedding width           D  image features (linear probe)
  C  classes                 T  prompt templates          K  top-k
  P  pairs (CxC judgements, extra positives)              B  batch    S  image side    L  text length

Deviations from the paper and the reference protocols:
  - Ties never count for the query: a positive that ties with negatives gets its expected place in a
    random order of the tie, so a constant model scores exactly chance (an argsort would let the lower
    index win); `--ties pessimistic` puts every tied negative first instead.
  - Karpathy MSCOCO gives a few images 6 or 7 captions; like the paper's "5K test set" (25K captions)
    we keep the first five of each (`--captions-per-image`, 0 keeps all).
  - CxC retrieval positives: the original COCO pairs plus CxC pairs with agg_score >= 3 (our reading
    of Parekh et al. 2021; `--cxc-threshold`); text->text and image->image ask only the queries with a
    positive, over all other captions / images. The correlations use a plain bootstrap of the pairs.
  - Linear probe (Sec. 5.3): features are cached once per image (one central crop), so training sees
    no random-crop or flip augmentation; the last partial batch of an epoch is dropped.
  - Every crop uses data.py's 346/289 resize ratio (also at the probe's 360 evaluation size, where
    the paper uses a 0.875 central crop).
  - Unreadable or corrupt images are skipped and counted; a skipped retrieval image takes its
    captions with it (in CxC, whose judgements name images, it stays as a zero embedding).
"""
import argparse
import concurrent.futures
import csv
import hashlib
import json
import os
import sys
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

EVAL_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "eval_data")
SINGLE_PROMPT = "a photo of a {}."  # Sec. 5.2's ablation: one prompt instead of CLIP's 80 (-2.9% top-1)


class UsageError(ValueError):
    """Bad input, reported as one line that says what is wrong and how to fix it."""


# ---------------------------------------------------------------------------------------------------
# Metric maths: pure numpy, blocked


def _blocks(n, size):
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def _sorted_pairs(pairs):
    """(query row, candidate column) pairs as int64 [P, 2], sorted by row so a block of rows is one slice."""
    if pairs is None:
        return np.zeros((0, 2), np.int64)
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]


def _pairs_in_tile(pairs_P2, q0, q1, n0, n1):
    lo, hi = np.searchsorted(pairs_P2[:, 0], [q0, q1])
    sub = pairs_P2[lo:hi]
    sub = sub[(sub[:, 1] >= n0) & (sub[:, 1] < n1)]
    return sub[:, 0] - q0, sub[:, 1] - n0


def positive_rank_stats(query_QE, cand_NE, query_label_Q=None, cand_label_N=None, positive_pairs=None,
                        exclude_pairs=None, block=4096):
    """Where each query's best-scoring positive stands among the candidates, by dot product.

    Candidate n is a positive of query q when query_label_Q[q] == cand_label_N[n], or when (q, n) is
    one of `positive_pairs`; `exclude_pairs` are neither positive nor negative (a query itself in
    text->text retrieval). Returns int64 arrays (above_Q, tied_neg_Q, tied_pos_Q): the negatives
    scoring strictly above the best positive, and the negatives and positives scoring exactly as much.
    Queries without a positive get tied_pos 0. Two passes over [block, block] tiles (the best positive,
    then the counts), so memory is O(block^2) whatever Q and N are.

    >>> q = np.array([[1., 0.], [0., 1.]]); c = np.array([[1., 0.], [0.6, 0.8], [0., 1.]])
    >>> positive_rank_stats(q, c, np.array([1, 0]), np.array([0, 1, 0]))
    (array([1, 0]), array([0, 0]), array([1, 1]))
    """
    query_QE, cand_NE = np.asarray(query_QE, np.float32), np.asarray(cand_NE, np.float32)
    num_q, num_n = len(query_QE), len(cand_NE)
    labelled = query_label_Q is not None and cand_label_N is not None
    pos_P2, excl_P2 = _sorted_pairs(positive_pairs), _sorted_pairs(exclude_pairs)
    above, tied_neg, tied_pos = (np.zeros(num_q, np.int64) for _ in range(3))

    def tile(q0, q1, n0, n1):
        sim = query_QE[q0:q1] @ cand_NE[n0:n1].T  # recomputed identically in both passes: ties stay exact
        pos = (np.asarray(query_label_Q)[q0:q1, None] == np.asarray(cand_label_N)[None, n0:n1]) if labelled \
            else np.zeros(sim.shape, bool)
        pos[_pairs_in_tile(pos_P2, q0, q1, n0, n1)] = True
        valid = np.ones(sim.shape, bool)
        valid[_pairs_in_tile(excl_P2, q0, q1, n0, n1)] = False
        return sim, pos & valid, valid & ~pos

    for q0, q1 in _blocks(num_q, block):
        best = np.full(q1 - q0, -np.inf, np.float32)
        for n0, n1 in _blocks(num_n, block):
            sim, pos, _ = tile(q0, q1, n0, n1)
            best = np.maximum(best, np.where(pos, sim, -np.inf).max(axis=1))
        for n0, n1 in _blocks(num_n, block):
            sim, pos, neg = tile(q0, q1, n0, n1)
            above[q0:q1] += (neg & (sim > best[:, None])).sum(axis=1)
            tied_neg[q0:q1] += (neg & (sim == best[:, None])).sum(axis=1)
            tied_pos[q0:q1] += (pos & (sim == best[:, None])).sum(axis=1)
        # The best positive ties with itself, even if a BLAS that is not bit-reproducible rounds it
        # differently the second time.
        tied_pos[q0:q1] = np.where(np.isfinite(best), np.maximum(tied_pos[q0:q1], 1), 0)
    return above, tied_neg, tied_pos


def hit_probability(above_Q, tied_neg_Q, tied_pos_Q, k, ties="expected"):
    """Per query, the probability that a positive is among the top k (from `positive_rank_stats`).

    ties="expected": the tied group (tied_neg negatives, tied_pos positives) is in random order, so a
    constant model scores chance; "pessimistic": every tied negative comes first.

    >>> hit_probability(np.array([0, 1, 2]), np.array([3, 0, 0]), np.array([1, 2, 1]), k=2)
    array([0.5, 1. , 0. ])
    >>> hit_probability(np.array([0]), np.array([3]), np.array([1]), k=2, ties="pessimistic")
    array([0.])
    """
    above_Q, tn, tp = (np.asarray(a, np.int64) for a in (above_Q, tied_neg_Q, tied_pos_Q))
    slots = k - above_Q  # places left in the top k for the tied group
    if ties == "pessimistic":
        return ((tp > 0) & (tn < slots)).astype(np.float64)
    if ties != "expected":
        raise ValueError(f"ties={ties!r}: use 'expected' or 'pessimistic'")
    # P(the first j of the tied group are all negatives) = prod_{i<j} (tn - i) / (tn + tp - i)
    all_neg = np.ones(len(above_Q))
    for i in range(k):
        factor = np.maximum(tn - i, 0) / np.maximum(tn + tp - i, 1)
        all_neg = np.where(i < slots, all_neg * factor, all_neg)
    return np.where((slots > 0) & (tp > 0), 1.0 - all_neg, 0.0)


def _recalls(stats, ks, ties, name="R@{}"):
    return {name.format(k): 100.0 * float(np.mean(hit_probability(*stats, k, ties))) for k in ks}


def retrieval_recalls(img_NE, txt_ME, txt_to_img_M, ks=(1, 5, 10), ties="expected", block=4096):
    """Image->text and text->image Recall@K in percent (ALIGN Sec. 5.1, Table 1).

    img_NE, txt_ME: embeddings (cosine when L2-normalised); txt_to_img_M: the image of each caption.
    An image scores a hit at K when any of its captions is in its top K texts, a caption when its
    image is in its top K images. Returns {"i2t": {"R@1": ..}, "t2i": {"R@1": ..}}.

    >>> img = np.array([[1., 0.], [0., 1.]]); txt = np.array([[1., 0.], [0., 1.], [0.8, 0.6]])
    >>> r = retrieval_recalls(img, txt, np.array([0, 1, 1]), ks=(1,))
    >>> r["i2t"]["R@1"], round(r["t2i"]["R@1"], 2)
    (100.0, 66.67)
    """
    txt_to_img_M = np.asarray(txt_to_img_M)
    n = len(img_NE)
    i2t = positive_rank_stats(img_NE, txt_ME, np.arange(n), txt_to_img_M, block=block)
    t2i = positive_rank_stats(txt_ME, img_NE, txt_to_img_M, np.arange(n), block=block)
    return {"i2t": _recalls(i2t, ks, ties), "t2i": _recalls(t2i, ks, ties)}


def class_embeddings(prompt_CTE):
    """Sec. 5.2 prompt ensembling: each class is the mean of its T prompt embeddings, L2-normalised.

    >>> class_embeddings(np.array([[[1., 0.], [0., 1.]]]))
    array([[0.70710678, 0.70710678]])
    """
    mean_CE = np.asarray(prompt_CTE).mean(axis=1)
    return mean_CE / np.maximum(np.linalg.norm(mean_CE, axis=-1, keepdims=True), 1e-12)


def classification_accuracy(x_QE, class_CE, label_Q, ks=(1, 5), ties="expected", block=4096):
    """Top-k accuracy in percent of classifying each row by its highest dot product with a class row.

    Zero-shot (Sec. 5.2, Table 4) with class_CE from `class_embeddings`; a linear probe with
    x = [features, 1] and class_CE = [kernel; bias]^T.

    >>> x = np.array([[1., 0.], [0., 1.], [1., 1.]]); classes = np.array([[1., 0.], [0., 1.], [-1., 0.]])
    >>> classification_accuracy(x, classes, np.array([0, 2, 1]), ks=(1, 2))
    {'top1': 50.0, 'top2': 83.33333333333334}
    """
    stats = positive_rank_stats(x_QE, class_CE, np.asarray(label_Q), np.arange(len(class_CE)), block=block)
    return _recalls(stats, ks, ties, name="top{}")


def probe_accuracy(x_NE, cand_NVE, true_N, ties="expected"):
    """Top-1 accuracy in percent when each row picks among V candidates of its own (the true one at true_N):
    the synthetic data's per-attribute zero-shot probes (`data.attribute_probes`).

    >>> x = np.array([[1., 0.], [0., 1.]]); cand = np.array([[[1., 0.], [0., 1.]], [[1., 0.], [1., 0.]]])
    >>> probe_accuracy(x, cand, np.array([0, 1]))  # the second row's candidates tie: half a hit
    75.0
    """
    score_NV = np.einsum("ne,nve->nv", x_NE, cand_NVE)
    true_N1 = np.take_along_axis(score_NV, np.asarray(true_N)[:, None], axis=1)
    above_N, tied_N = (score_NV > true_N1).sum(1), (score_NV == true_N1).sum(1) - 1
    return 100.0 * float(np.mean(hit_probability(above_N, tied_N, np.ones_like(above_N), 1, ties)))


def knn_recall(query_QE, index_NE, query_label_Q, index_label_N, ks=(1, 5, 10), ties="expected", block=4096):
    """ImageNet KNN (footnote 3, Tables 8-10): Recall@K in percent, a hit when the query's label is
    among the labels of its K nearest index images.

    >>> index = np.array([[1., 0.], [0.8, 0.6], [0., 1.]])
    >>> knn_recall(np.array([[1., 0.1], [0., 1.]]), index, np.array([7, 5]), np.array([3, 7, 5]), ks=(1, 2))
    {'R@1': 50.0, 'R@2': 100.0}
    """
    stats = positive_rank_stats(query_QE, index_NE, np.asarray(query_label_Q), np.asarray(index_label_N), block=block)
    return _recalls(stats, ks, ties)


def rank_average(x_P):
    """1-based ranks, ties sharing their average rank (scipy's rankdata 'average').

    >>> rank_average(np.array([10., 20., 10., 30.]))
    array([1.5, 3. , 1.5, 4. ])
    """
    x_P = np.asarray(x_P)
    order = np.argsort(x_P, kind="stable")
    sorted_x = x_P[order]
    new = np.r_[True, sorted_x[1:] != sorted_x[:-1]]
    starts = np.flatnonzero(new)
    ends = np.r_[starts[1:], len(x_P)]
    ranks = np.empty(len(x_P))
    ranks[order] = ((starts + ends + 1) / 2)[np.cumsum(new) - 1]
    return ranks


def spearman(x_P, y_P):
    """Spearman's rank correlation with average ranks for ties; NaN when either side is constant.

    >>> spearman(np.array([1., 2., 2., 3.]), np.array([1., 3., 2., 4.]))
    0.9486832980505138
    """
    rx, ry = rank_average(x_P) - (len(x_P) + 1) / 2, rank_average(y_P) - (len(y_P) + 1) / 2
    denom = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


def spearman_bootstrap(x_P, y_P, n_boot=1000, seed=0):
    """CxC's "Spearman's R bootstrap correlation" (Table 3): (mean, std) over n_boot resamples of the
    P pairs, drawn with replacement.

    >>> mean, std = spearman_bootstrap(np.arange(50.), np.arange(50.) ** 2, n_boot=20)
    >>> mean, std
    (1.0, 0.0)
    """
    x_P, y_P = np.asarray(x_P), np.asarray(y_P)
    rng = np.random.default_rng(seed)
    rhos = np.array([spearman(x_P[i], y_P[i]) for i in (rng.integers(0, len(x_P), len(x_P)) for _ in range(n_boot))])
    rhos = rhos[~np.isnan(rhos)]  # a resample with one side constant has no rank correlation
    return (float(rhos.mean()), float(rhos.std())) if len(rhos) else (float("nan"), float("nan"))


def cxc_scores(img_NE, txt_ME, txt_to_img_M, pairs, threshold=3.0, ks=(1, 5, 10), n_boot=1000, seed=0,
               ties="expected", block=4096):
    """Crisscrossed Captions (Parekh et al. 2021; ALIGN Tables 2-3) from embeddings and judgements.

    pairs: {"sts": (caption_P, caption_P, score_P), "sis": (image_P, image_P, score_P),
            "sits": (caption_P, image_P, score_P)}, row indices into txt_ME / img_NE, scores 0-5.
    Retrieval, Recall@K in percent: image<->text positives are each image's own captions plus the SITS
    pairs scoring >= threshold; text->text and image->image ask each item with an STS / SIS pair
    >= threshold (either side) for those partners, among all other captions / images. Correlations:
    Spearman's R x 100 of cosine against agg_score over all pairs, bootstrap mean and std.
    """
    keep = lambda task: [x[pairs[task][2] >= threshold] for x in pairs[task][:2]]

    def intra(emb, task):
        a, b = keep(task)
        a, b = np.r_[a, b], np.r_[b, a]  # a judgement goes both ways
        queries = np.unique(a)
        stats = positive_rank_stats(emb[queries], emb, positive_pairs=np.c_[np.searchsorted(queries, a), b],
                                    exclude_pairs=np.c_[np.arange(len(queries)), queries], block=block)
        return _recalls(stats, ks, ties)

    cap, img = keep("sits")
    n = len(img_NE)
    result = {
        "i2t": _recalls(positive_rank_stats(img_NE, txt_ME, np.arange(n), txt_to_img_M,
                                            positive_pairs=np.c_[img, cap], block=block), ks, ties),
        "t2i": _recalls(positive_rank_stats(txt_ME, img_NE, txt_to_img_M, np.arange(n),
                                            positive_pairs=np.c_[cap, img], block=block), ks, ties),
        "t2t": intra(txt_ME, "sts"),
        "i2i": intra(img_NE, "sis"),
    }
    for task, (x, y) in {"sts": (txt_ME, txt_ME), "sis": (img_NE, img_NE), "sits": (txt_ME, img_NE)}.items():
        a, b, score = pairs[task][:3]
        mean, std = spearman_bootstrap(np.einsum("pe,pe->p", x[a], y[b]), score, n_boot, seed)
        result[task] = {"mean": 100 * mean, "std": 100 * std}
    result["mean_avg"] = float(np.mean([result[t]["mean"] for t in ("sts", "sis", "sits")]))
    return result


def top_k(query_QE, index_NE, k, block=4096):
    """The k highest dot products of each query over the index, best first (ties: lower index first),
    one block of the index at a time -> (scores_QK, indices_QK).

    >>> top_k(np.array([[1., 0.]]), np.array([[0., 1.], [1., 0.], [0.6, 0.8]]), k=2)
    (array([[1. , 0.6]], dtype=float32), array([[1, 2]]))
    """
    query_QE, index_NE = np.asarray(query_QE, np.float32), np.asarray(index_NE, np.float32)
    k = min(k, len(index_NE))
    best_s = np.full((len(query_QE), 0), -np.inf, np.float32)
    best_i = np.zeros((len(query_QE), 0), np.int64)
    for n0, n1 in _blocks(len(index_NE), block):
        s = np.concatenate([best_s, query_QE @ index_NE[n0:n1].T], axis=1)
        i = np.concatenate([best_i, np.broadcast_to(np.arange(n0, n1), (len(query_QE), n1 - n0))], axis=1)
        keep = np.lexsort((i, -s), axis=1)[:, :k]  # sort by score, descending, then by index
        best_s, best_i = np.take_along_axis(s, keep, 1), np.take_along_axis(i, keep, 1)
    return best_s, best_i


def combine_query(image_E=None, plus_TE=(), minus_TE=(), image_weight=1.0, text_weight=2.0):
    """Sec. 7 image +- text queries (Figure 5): unit image and text embeddings weighted 1 and 2
    (footnote 4), texts added or subtracted, the sum L2-normalised for cosine retrieval.

    >>> combine_query(np.array([1., 0.]), plus_TE=[np.array([0., 1.])], text_weight=1.0)
    array([0.70710678, 0.70710678])
    """
    unit = lambda v: np.asarray(v, np.float64) / max(np.linalg.norm(v), 1e-12)
    parts = [image_weight * unit(image_E)] if image_E is not None else []
    parts += [text_weight * unit(t) for t in plus_TE] + [-text_weight * unit(t) for t in minus_TE]
    if not parts:
        raise ValueError("combine_query needs an image or a text")
    return unit(np.sum(parts, axis=0))


# ---------------------------------------------------------------------------------------------------
# From files to embeddings: data.py's evaluation preprocessing, sharded batches, an on-disk cache


class Model(NamedTuple):
    cfg: align.Config
    weights: tuple           # (params, state), replicated over the mesh
    tokenizer: data.Tokenizer
    fingerprint: str         # names the weights in cache keys


def _mesh():
    # One `data` axis over every device (STYLE.md habit 8); jax.make_mesh's default axis types reject
    # plain numpy inputs in jax 0.10.
    return Mesh(np.array(jax.devices()), ("data",))


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
    return Model(cfg, weights, data.Tokenizer(vocab), fingerprint)


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
    blocks = _blocks(n, batch)
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
            pixels_BSSC = np.zeros((b1 - b0, image_size, image_size, 3), np.float32)
            for j, (px, reason) in enumerate(decoders.map(one, range(b0, b1))):
                if reason:
                    skipped.setdefault(reason, {"count": 0, "example": paths[b0 + j]})["count"] += 1
                else:
                    ok[b0 + j] = True
                    pixels_BSSC[j] = px  # uint8 -> float32, then [-1, 1] as data.py's loader and HF's ALIGN
            return [pixels_BSSC / np.float32(127.5) - np.float32(1.0)]

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
# Datasets: Karpathy JSON, class folders, CxC CSVs


def _load_json(path, flag):
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{flag} {path}: not valid JSON ({e})")


def read_karpathy(path, split, images_dir, captions_per_image=5):
    """A Karpathy-split JSON -> (image paths [N], captions [M], txt_to_img [M], sentids [M], filenames [N]).

    Format (Flickr30K 1K test, MSCOCO 5K test): {"images": [{"filename", "filepath"?, "split",
    "sentids"?, "sentences": [{"raw", "sentid"?}, ...]}, ...]}. An image is looked for at
    images_dir/filepath/filename, then at images_dir/filename.
    """
    ann = _load_json(path, "--karpathy")
    if not isinstance(ann, dict) or not isinstance(ann.get("images"), list):
        raise UsageError(f"--karpathy {path}: expected a Karpathy-split JSON with an 'images' list")
    chosen = [im for im in ann["images"] if im.get("split") == split]
    if not chosen:
        splits = sorted({str(im.get("split")) for im in ann["images"]})
        raise UsageError(f"--karpathy {path}: no image has split {split!r} (it has {', '.join(splits)}); pass --split")
    paths, captions, txt_to_img, sentids, names = [], [], [], [], []
    try:
        for i, im in enumerate(chosen):
            nested = os.path.join(images_dir or "", im.get("filepath", ""), im["filename"])
            paths.append(nested if os.path.exists(nested) else os.path.join(images_dir or "", im["filename"]))
            names.append(im["filename"])
            sents = im["sentences"]
            for j, s in enumerate(sents[:captions_per_image or None]):
                captions.append(s["raw"])
                txt_to_img.append(i)
                sentids.append(s.get("sentid", (im.get("sentids") or [None] * len(sents))[j]))
    except KeyError as e:
        raise UsageError(f"--karpathy {path}: an image of split {split!r} has no {e}; expected filename and "
                         "sentences [{raw}] (Karpathy's dataset_*.json)")
    if images_dir is not None and not any(os.path.exists(p) for p in paths):
        raise UsageError(f"--images {images_dir}: none of the {len(paths)} {split} images is there "
                         f"(looked for DIR/filepath/filename and DIR/filename, e.g. {paths[0]})")
    return paths, captions, np.array(txt_to_img, np.int64), sentids, names


def _is_image(name):
    return name.lower().rsplit(".", 1)[-1] in data.IMAGE_EXTS


def list_images(folder):
    """Every image file under `folder`, recursively, in sorted order."""
    if not os.path.isdir(folder):
        raise UsageError(f"{folder}: no such folder")
    found = sorted(os.path.join(root, f) for root, _, files in os.walk(folder) for f in files if _is_image(f))
    if not found:
        raise UsageError(f"{folder}: no images ({', '.join(data.IMAGE_EXTS)}) in it or below it")
    return found


def read_class_folders(folder):
    """One subfolder per class (ImageNet's layout) -> (paths [N], labels [N], class folder names [C]).

    Classes are the subfolders in sorted order (numerically when all are integers, as ImageNetV2's
    0..999); images are sorted within each. This is the row order of --image-embeddings.
    """
    if not os.path.isdir(folder):
        raise UsageError(f"{folder}: no such folder")
    dirs = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    if dirs and all(d.isdigit() for d in dirs):
        dirs.sort(key=int)
    paths, labels = [], []
    for c, d in enumerate(dirs):
        files = sorted(f for f in os.listdir(os.path.join(folder, d)) if _is_image(f))
        paths += [os.path.join(folder, d, f) for f in files]
        labels += [c] * len(files)
    if not paths:
        raise UsageError(f"{folder}: expected one subfolder of images per class, found no image in "
                         f"{len(dirs)} subfolders")
    return paths, np.array(labels, np.int64), dirs


def _read_lines(path, flag):
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path}: no such file")
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def class_names(dirs, classnames_file=None):
    """Readable names for class folders: a file listing them in folder order, or a list indexed by
    ImageNet synset (n01440764 ...: the 1000 in sorted order, or a subset such as ImageNet-R/A's 200) or
    by integer folder names (ImageNetV2); with no file, the shipped ImageNet names (CLIP's cleaned list)
    for synset or integer folders, else the folder names themselves."""
    wnids = _read_lines(os.path.join(EVAL_DATA, "imagenet_wnids.txt"), "eval_data")
    synsets = all(d in set(wnids) for d in dirs)
    numbered = all(d.isdigit() for d in dirs)
    if classnames_file is None and not (synsets or numbered):
        return [d.replace("_", " ") for d in dirs]
    flag = "--classnames"
    names = _read_lines(classnames_file or os.path.join(EVAL_DATA, "imagenet_classnames.txt"), flag)
    if len(names) == len(dirs):
        return names
    if synsets and len(names) == len(wnids):
        return [names[wnids.index(d)] for d in dirs]
    if numbered and all(int(d) < len(names) for d in dirs):
        return [names[int(d)] for d in dirs]
    raise UsageError(f"{flag} {classnames_file}: {len(names)} names for {len(dirs)} class folders; give one "
                     "name per folder in sorted folder order (or 1000 ImageNet names for synset folders)")


def _load_npy(path, rows, flag, what):
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path}: no such file")
    x = np.load(path)
    if len(x) != rows:
        raise UsageError(f"{flag} {path}: {len(x)} rows, expected {rows} ({what})")
    return x.astype(np.float32)


def _same_width(img, txt):
    if img.shape[-1] != txt.shape[-1]:
        raise UsageError(f"image embeddings are {img.shape[-1]} wide but text embeddings {txt.shape[-1]}: "
                         "they must come from the same model")


CXC_COLUMNS = {"sts": ("caption1", "caption2"), "sis": ("image1", "image2"), "sits": ("caption", "image")}


def read_cxc(cxc_dir, split, image_index, caption_index):
    """CxC's released CSVs (github.com/google-research-datasets/Crisscrossed-Captions, data/):
    {sts,sis,sits}_{val,test}.csv with a header and columns caption1,caption2 / image1,image2 /
    caption,image, then agg_score (0-5) and sampling_method. Images are COCO file names
    (COCO_val2014_000000391895.jpg), captions are Karpathy sentids written COCO_val2014:sentid:770337.

    Returns ({task: (a_P, b_P, score_P)}, {task: dropped}): row indices into the images or captions
    (image_index and caption_index map file names and sentids to rows), and how many rows named an id
    outside the split.
    """
    out, dropped = {}, {}
    for task, cols in CXC_COLUMNS.items():
        path = os.path.join(cxc_dir, f"{task}_{split}.csv")
        if not os.path.isfile(path):
            raise UsageError(f"--cxc {cxc_dir}: no {task}_{split}.csv; download data/ from "
                             "github.com/google-research-datasets/Crisscrossed-Captions")
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        if rows and not all(c in rows[0] for c in cols + ("agg_score",)):
            raise UsageError(f"--cxc {path}: expected columns {', '.join(cols)}, agg_score; found {', '.join(rows[0])}")

        def index(col, value):
            if col.startswith("image"):
                return image_index.get(value)
            sentid = value.rsplit(":", 1)[-1]
            return caption_index.get(int(sentid)) if sentid.isdigit() else None

        a, b, score, dropped[task] = [], [], [], 0
        for r in rows:
            i, j = index(cols[0], r[cols[0]]), index(cols[1], r[cols[1]])
            if i is None or j is None:
                dropped[task] += 1
                continue
            a.append(i), b.append(j), score.append(float(r["agg_score"]))
        out[task] = (np.array(a, np.int64), np.array(b, np.int64), np.array(score))
    return out, dropped


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
        return _load_npy(args.image_embeddings, len(paths), "--image-embeddings", order), np.ones(len(paths), bool), {}
    img_NE, ok, skipped = embed_image_files(model, paths, args.image_size, batch=args.batch_size,
                                            workers=args.workers, cache=args.cache)
    _report_skipped(skipped, len(paths))
    return img_NE, ok, skipped


def run_retrieval(args):
    """Sec. 5.1, Table 1: Flickr30K (1K test) and MSCOCO (5K test) image<->text Recall@1/5/10."""
    paths, captions, txt_to_img, _, _ = read_karpathy(args.karpathy, args.split, args.images, args.captions_per_image)
    model = None if (args.image_embeddings and args.text_embeddings) else _need_model(args)
    if not args.image_embeddings and args.images is None:
        raise UsageError("pass --images (the folder of the Karpathy JSON's images) or --image-embeddings")
    img_NE, ok, skipped = _image_embeddings(args, model, paths, f"one per {args.split} image, in the JSON's order")
    if args.text_embeddings:
        txt_ME = _load_npy(args.text_embeddings, len(captions), "--text-embeddings",
                           "one per caption, in the JSON's order")
    else:
        txt_ME = embed_text_list(model, captions, batch=args.batch_size, cache=args.cache)
    if not ok.any():
        raise UsageError(f"--images {args.images}: none of the {len(paths)} images could be read")
    _same_width(img_NE, txt_ME)
    # A skipped image takes its captions with it; the rest are renumbered.
    keep_M = ok[txt_to_img]
    new_index = np.cumsum(ok) - 1
    result = retrieval_recalls(img_NE[ok], txt_ME[keep_M], new_index[txt_to_img[keep_M]], ties=args.ties,
                               block=args.block)
    result["info"] = {"images": int(ok.sum()), "captions": int(keep_M.sum()), "split": args.split,
                      "image_size": args.image_size, "skipped_images": skipped, "ties": args.ties}
    print_table(f"Image-text retrieval, {args.karpathy} split {args.split!r}: {ok.sum()} images, "
                f"{keep_M.sum()} captions (ALIGN Table 1)",
                {"image -> text": result["i2t"], "text -> image": result["t2i"]})
    return result


def run_zeroshot(args):
    """Sec. 5.2, Table 4: zero-shot classification with CLIP's 80 prompts ensembled per class."""
    paths, labels, dirs = read_class_folders(args.images)
    names = class_names(dirs, args.classnames)
    templates = [SINGLE_PROMPT] if args.single_prompt else \
        _read_lines(args.templates or os.path.join(EVAL_DATA, "imagenet_templates.txt"), "--templates")
    if not all("{}" in t for t in templates):
        raise UsageError(f"--templates {args.templates}: every line needs a {{}} where the class name goes")
    model = None if (args.image_embeddings and args.text_embeddings) else _need_model(args)
    img_NE, ok, skipped = _image_embeddings(args, model, paths, "one per image: sorted class folders, sorted files")
    if args.text_embeddings:
        txt = _load_npy(args.text_embeddings, len(names), "--text-embeddings",
                        "one per class ([C, E]) or per class and prompt ([C, T, E])")
        class_CE = class_embeddings(txt) if txt.ndim == 3 else txt
    else:
        prompts = [t.format(name) for name in names for t in templates]
        txt_CTE = embed_text_list(model, prompts, batch=args.batch_size, cache=args.cache)
        class_CE = class_embeddings(txt_CTE.reshape(len(names), len(templates), -1))
    _same_width(img_NE, class_CE)
    acc = classification_accuracy(img_NE[ok], class_CE, labels[ok], ks=(1, 5), ties=args.ties, block=args.block)
    result = {**acc, "info": {"images": int(ok.sum()), "classes": len(names), "prompts": len(templates),
                              "image_size": args.image_size, "skipped_images": skipped, "ties": args.ties}}
    print_table(f"Zero-shot classification, {args.images}: {ok.sum()} images, {len(names)} classes, "
                f"{len(templates)} prompt{'s' * (len(templates) > 1)} per class (ALIGN Table 4)", {"accuracy": acc})
    return result


def run_cxc(args):
    """Sec. 5.1, Tables 2-3: CxC retrieval (i2t, t2i, t2t, i2i) and STS / SIS / SITS correlations."""
    paths, captions, txt_to_img, sentids, names = read_karpathy(args.karpathy, args.split, args.coco_images,
                                                                args.captions_per_image)
    pairs, dropped = read_cxc(args.cxc, args.split, {n: i for i, n in enumerate(names)},
                              {s: j for j, s in enumerate(sentids) if s is not None})
    model = _need_model(args)
    img_NE, ok, skipped = embed_image_files(model, paths, args.image_size, batch=args.batch_size,
                                            workers=args.workers, cache=args.cache)
    _report_skipped(skipped, len(paths))
    img_NE = np.where(ok[:, None], img_NE, 0.0)  # CxC names images: a skipped one keeps its row, scoring 0
    txt_ME = embed_text_list(model, captions, batch=args.batch_size, cache=args.cache)
    result = cxc_scores(img_NE, txt_ME, txt_to_img, pairs, args.cxc_threshold, n_boot=args.bootstrap,
                        seed=args.seed, ties=args.ties, block=args.block)
    result["info"] = {"images": len(paths), "captions": len(captions), "image_size": args.image_size,
                      "pairs": {t: len(p[0]) for t, p in pairs.items()}, "dropped_pairs": dropped,
                      "skipped_images": skipped, "threshold": args.cxc_threshold, "bootstrap": args.bootstrap,
                      "ties": args.ties}
    print_table(f"CxC retrieval, split {args.split!r}: {len(paths)} images, {len(captions)} captions (ALIGN Table 2)",
                {"image -> text": result["i2t"], "text -> image": result["t2i"],
                 "text -> text": result["t2t"], "image -> image": result["i2i"]})
    print_table("CxC Spearman's R bootstrap correlation x 100 (ALIGN Table 3)",
                {t.upper(): {"avg ± std": f"{result[t]['mean']:.1f}±{result[t]['std']:.1f}"} for t in CXC_COLUMNS}
                | {"Mean": {"avg": result["mean_avg"]}})
    return result


def _labelled_images(model, args, folder, image_size, features=False):
    paths, labels, dirs = read_class_folders(folder)
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
    recall = knn_recall(val_QE, train_NE, val_label, train_label, ks=tuple(args.ks), ties=args.ties, block=args.block)
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
    acc = classification_accuracy(ones(val_QD), classes_CD, val_label, ks=(1, 5), ties=args.ties, block=args.block)
    train_acc = classification_accuracy(ones(train_ND), classes_CD, train_label, ks=(1,), ties=args.ties,
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
    paths = list_images(args.index)
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
    query_E = combine_query(image_E, plus, minus, args.image_weight, args.text_weight)
    scores, idx = top_k(query_E[None], index_NE, args.top_k + 1, block=args.block)
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
