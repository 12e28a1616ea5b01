"""The metric maths of evaluating ALIGN (Jia et al., ICML 2021): numpy over embeddings, no files; the blocked
similarity kernels also in jax, for an accelerator.

evaluate.py computes the embeddings and reads the evaluation sets, then scores them here; train.py and
bench.py call `retrieval_recalls` and `probe_accuracy` on their held-out embeddings. Each public function
shows a tiny example in its docstring (run as doctests by test_metrics.py).

  retrieval_recalls        image <-> text Recall@K                          Sec. 5.1, Table 1
  cxc_scores               Crisscrossed Captions: retrieval, Spearman's R   Sec. 5.1, Tables 2-3
  class_embeddings         zero-shot prompt ensembling                      Sec. 5.2, Table 4
  classification_accuracy  top-k: zero-shot, and the linear probe's        Sec. 5.2, 5.3, Tables 4-5
  knn_recall               ImageNet KNN of the ablations                    Sec. 6, footnote 3, Tables 8-10
  top_k, combine_query     image +- text search                             Sec. 7, Figures 4-5
  probe_accuracy           the synthetic data's per-attribute zero-shot probes (train.py; not in the paper)

Every recall and accuracy goes through `positive_rank_stats`, which computes similarities in tiles of
`block` x `block`, twice (the best positive, then the counts), so 1M images x 5M captions never build the
matrix: memory is O(block^2) whatever the sizes.

Backends. `positive_rank_stats` and `top_k` (and every function above built on them) take
backend="auto" | "numpy" | "jax". "jax" runs the same tiles as one jitted program per tile shape (the last
block is padded, not compiled anew) on jax's default device, in float32 at Precision.HIGHEST, so that it
ranks exactly as numpy does; "auto" picks jax when that device is an accelerator and numpy on a CPU, where
numpy measured as fast or faster (BENCHMARKS.md, "Evaluation kernels").

Ties never count for the query: a positive that ties with negatives gets its expected place in a random
order of the tie, so a model that outputs one constant embedding scores exactly chance (an argsort would
let the lower index win); ties="pessimistic" puts every tied negative first instead. `top_k`, which
returns places rather than a score, puts the lower index first.

Dimension key:
  N  images (the candidates of a search, the training set of KNN)    M  captions
  Q  queries                 E  embedding width           C  classes            T  prompt templates
  K  top-k                   V  candidates of one row (probe_accuracy)
  P  pairs (CxC judgements, extra positives)

Deviations from the paper and the reference protocols:
  - Ties: expected place in a random order of the tie (above); big_vision's argsort breaks them by index.
    Scores tie when they are equal in float32. The numpy and jax backends sum the products in different
    orders, so a score can differ in its last bit between them and a near-tie can go either way; exact ties
    (identical rows, exactly representable sums) are the same on both (test_metrics.py).
  - CxC retrieval positives: the original COCO pairs plus CxC pairs with agg_score >= 3 (our reading
    of Parekh et al. 2021; evaluate.py's `--cxc-threshold`); text->text and image->image ask only the
    queries with a positive, over all other captions / images. The correlations use a plain bootstrap
    of the pairs.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np


def blocks(n, size):
    """[(start, stop)] covering range(n) in steps of size: the tiles of the similarity matrix, the
    embedding batches of evaluate.py.

    >>> blocks(5, 2)
    [(0, 2), (2, 4), (4, 5)]
    """
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


def use_jax(backend="auto"):
    """Whether the blocked kernels run in jax: "auto" on an accelerator only (on a CPU numpy measured as fast
    for retrieval, 1.3x faster for KNN, 3x for top_k, and needs no compile)."""
    if backend not in ("auto", "numpy", "jax"):
        raise ValueError(f"backend={backend!r}: use 'auto', 'numpy' or 'jax'")
    return backend == "jax" or (backend == "auto" and jax.default_backend() != "cpu")


def positive_rank_stats(query_QE, cand_NE, query_label_Q=None, cand_label_N=None, positive_pairs=None,
                        exclude_pairs=None, block=4096, backend="auto"):
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
    if use_jax(backend):
        return _positive_rank_stats_jax(query_QE, cand_NE, query_label_Q if labelled else None,
                                        cand_label_N if labelled else None, pos_P2, excl_P2, block)
    above, tied_neg, tied_pos = (np.zeros(num_q, np.int64) for _ in range(3))

    def tile(q0, q1, n0, n1):
        sim = query_QE[q0:q1] @ cand_NE[n0:n1].T  # recomputed identically in both passes: ties stay exact
        pos = (np.asarray(query_label_Q)[q0:q1, None] == np.asarray(cand_label_N)[None, n0:n1]) if labelled \
            else np.zeros(sim.shape, bool)
        pos[_pairs_in_tile(pos_P2, q0, q1, n0, n1)] = True
        valid = np.ones(sim.shape, bool)
        valid[_pairs_in_tile(excl_P2, q0, q1, n0, n1)] = False
        return sim, pos & valid, valid & ~pos

    for q0, q1 in blocks(num_q, block):
        best = np.full(q1 - q0, -np.inf, np.float32)
        for n0, n1 in blocks(num_n, block):
            sim, pos, _ = tile(q0, q1, n0, n1)
            best = np.maximum(best, np.where(pos, sim, -np.inf).max(axis=1))
        for n0, n1 in blocks(num_n, block):
            sim, pos, neg = tile(q0, q1, n0, n1)
            above[q0:q1] += (neg & (sim > best[:, None])).sum(axis=1)
            tied_neg[q0:q1] += (neg & (sim == best[:, None])).sum(axis=1)
            tied_pos[q0:q1] += (pos & (sim == best[:, None])).sum(axis=1)
        # The best positive ties with itself, even if a BLAS that is not bit-reproducible rounds it
        # differently the second time.
        tied_pos[q0:q1] = np.where(np.isfinite(best), np.maximum(tied_pos[q0:q1], 1), 0)
    return above, tied_neg, tied_pos


def _block_size(n, block):
    """The side of jax's blocks over n rows: as many blocks as numpy's, of one size (one compile), at most
    `block`, evened out so that padding the last block wastes little (a multiple of 8 where it can)."""
    num_blocks = max(-(-n // block), 1)  # -(-a // b): ceil(a / b)
    size = -(-n // num_blocks)
    return max(min(-(-size // 8) * 8, block), 1)


def _padded(x, rows, fill=0):
    """x with rows appended (fill) up to `rows`: the last block gets the shape of the others, so one compile."""
    return np.concatenate([x, np.full((rows - len(x),) + x.shape[1:], fill, x.dtype)]) if rows > len(x) else x


def _pairs_padded(pairs_P2, q0, q1, rows):
    """The pairs of query rows [q0, q1) as (local row, candidate) int32, padded to a power of two (few
    compiles) with row `rows`, which the scatter drops. None gives [0, 2]: no scatter, so the masks fuse."""
    lo, hi = np.searchsorted(pairs_P2[:, 0], [q0, q1])
    sub = pairs_P2[lo:hi]
    size = 1 << int(hi - lo - 1).bit_length() if hi > lo else 0
    out = np.full((size, 2), rows, np.int32)
    out[:len(sub), 0], out[:len(sub), 1] = sub[:, 0] - q0, sub[:, 1]
    return out


@jax.jit
def _rank_tile_jax(query_BE, cand_KBE, query_code_B, cand_code_KB, num_n, k, pos_P2, excl_P2, best_B):
    """The tile of a query block and the k-th candidate block, for either pass of `positive_rank_stats`:
    its best positive per query, and (above, tied_neg, tied_pos) [3, B] against best_B. Both passes run
    this one program so that the similarities are bitwise the same in each."""
    bq, bn = query_BE.shape[0], cand_KBE.shape[1]
    # HIGHEST: true float32 products as numpy's; TF32 or bfloat16 passes would move near-ties.
    sim_BB = jnp.dot(query_BE, cand_KBE[k].T, precision=jax.lax.Precision.HIGHEST)
    col_B = k * bn + jnp.arange(bn)
    in_tile = lambda cols: jnp.where((cols >= k * bn) & (cols < (k + 1) * bn), cols - k * bn, bn)  # bn: dropped
    pos = query_code_B[:, None] == cand_code_KB[k][None, :]
    pos = pos.at[pos_P2[:, 0], in_tile(pos_P2[:, 1])].set(True, mode="drop")
    valid = jnp.broadcast_to(col_B < num_n, (bq, bn))  # the last block's padding is neither
    valid = valid.at[excl_P2[:, 0], in_tile(excl_P2[:, 1])].set(False, mode="drop")
    pos, neg = pos & valid, valid & ~pos
    above, at = sim_BB > best_B[:, None], sim_BB == best_B[:, None]
    # One reduction of four operands reads the tile once: as four reductions XLA:CPU took 5-20x longer.
    best, *counts = jax.lax.reduce(
        (jnp.where(pos, sim_BB, -jnp.inf), (neg & above).astype(jnp.int32), (neg & at).astype(jnp.int32),
         (pos & at).astype(jnp.int32)), (-jnp.inf, 0, 0, 0),
        lambda x, y: (jax.lax.max(x[0], y[0]), x[1] + y[1], x[2] + y[2], x[3] + y[3]), (1,))
    return best, jnp.stack(counts)


def _positive_rank_stats_jax(query_QE, cand_NE, query_label_Q, cand_label_N, pos_P2, excl_P2, block):
    """`positive_rank_stats` on jax's default device, the candidates moved there once as [K, B, E] blocks."""
    num_q, (num_n, width) = len(query_QE), cand_NE.shape
    bq, bn = _block_size(num_q, block), _block_size(num_n, block)
    num_k = -(-num_n // bn)
    if query_label_Q is None:  # codes that never match: only the pairs are positives
        query_code_Q, cand_code_N = np.full(num_q, -1, np.int32), np.full(num_n, -2, np.int32)
    else:  # labels of any dtype as int32 codes (jax's default integers)
        _, codes = np.unique(np.r_[np.asarray(query_label_Q), np.asarray(cand_label_N)], return_inverse=True)
        query_code_Q, cand_code_N = codes[:num_q].astype(np.int32), codes[num_q:].astype(np.int32)
    cand_KBE = jnp.asarray(_padded(cand_NE, num_k * bn).reshape(num_k, bn, width))
    cand_code_KB = jnp.asarray(_padded(cand_code_N, num_k * bn, -3).reshape(num_k, bn))
    above, tied_neg, tied_pos = (np.zeros(num_q, np.int64) for _ in range(3))
    for q0, q1 in blocks(num_q, bq):
        query_BE, query_code_B = _padded(query_QE[q0:q1], bq), _padded(query_code_Q[q0:q1], bq)
        tile_inputs = jnp.asarray(query_BE), cand_KBE, jnp.asarray(query_code_B), cand_code_KB, num_n
        pairs = _pairs_padded(pos_P2, q0, q1, bq), _pairs_padded(excl_P2, q0, q1, bq)
        best_B, counts_3B = jnp.full(bq, -jnp.inf, jnp.float32), jnp.zeros((3, bq), jnp.int32)
        for k in range(num_k):
            best_B = jnp.maximum(best_B, _rank_tile_jax(*tile_inputs, k, *pairs, best_B)[0])
        for k in range(num_k):
            counts_3B += _rank_tile_jax(*tile_inputs, k, *pairs, best_B)[1]
        best, counts_3Q = np.asarray(best_B)[:q1 - q0], np.asarray(counts_3B)[:, :q1 - q0]
        above[q0:q1], tied_neg[q0:q1] = counts_3Q[0], counts_3Q[1]
        tied_pos[q0:q1] = np.where(np.isfinite(best), np.maximum(counts_3Q[2], 1), 0)  # as the numpy path does
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


def retrieval_recalls(img_NE, txt_ME, txt_to_img_M, ks=(1, 5, 10), ties="expected", block=4096, backend="auto"):
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
    i2t = positive_rank_stats(img_NE, txt_ME, np.arange(n), txt_to_img_M, block=block, backend=backend)
    t2i = positive_rank_stats(txt_ME, img_NE, txt_to_img_M, np.arange(n), block=block, backend=backend)
    return {"i2t": _recalls(i2t, ks, ties), "t2i": _recalls(t2i, ks, ties)}


def class_embeddings(prompt_CTE):
    """Sec. 5.2 prompt ensembling: each class is the mean of its T prompt embeddings, L2-normalised.

    >>> class_embeddings(np.array([[[1., 0.], [0., 1.]]]))
    array([[0.70710678, 0.70710678]])
    """
    mean_CE = np.asarray(prompt_CTE).mean(axis=1)
    return mean_CE / np.maximum(np.linalg.norm(mean_CE, axis=-1, keepdims=True), 1e-12)


def classification_accuracy(x_QE, class_CE, label_Q, ks=(1, 5), ties="expected", block=4096, backend="auto"):
    """Top-k accuracy in percent of classifying each row by its highest dot product with a class row.

    Zero-shot (Sec. 5.2, Table 4) with class_CE from `class_embeddings`; a linear probe with
    x = [features, 1] and class_CE = [kernel; bias]^T.

    >>> x = np.array([[1., 0.], [0., 1.], [1., 1.]]); classes = np.array([[1., 0.], [0., 1.], [-1., 0.]])
    >>> classification_accuracy(x, classes, np.array([0, 2, 1]), ks=(1, 2))
    {'top1': 50.0, 'top2': 83.33333333333334}
    """
    stats = positive_rank_stats(x_QE, class_CE, np.asarray(label_Q), np.arange(len(class_CE)), block=block,
                                backend=backend)
    return _recalls(stats, ks, ties, name="top{}")


def probe_accuracy(x_NE, cand_NVE, true_N, ties="expected"):
    """Top-1 accuracy in percent when each row picks among V candidates of its own (the true one at true_N):
    the synthetic data's per-attribute zero-shot probes (`synthetic.attribute_probes`).

    >>> x = np.array([[1., 0.], [0., 1.]]); cand = np.array([[[1., 0.], [0., 1.]], [[1., 0.], [1., 0.]]])
    >>> probe_accuracy(x, cand, np.array([0, 1]))  # the second row's candidates tie: half a hit
    75.0
    """
    score_NV = np.einsum("ne,nve->nv", x_NE, cand_NVE)
    true_N1 = np.take_along_axis(score_NV, np.asarray(true_N)[:, None], axis=1)
    above_N, tied_N = (score_NV > true_N1).sum(1), (score_NV == true_N1).sum(1) - 1
    return 100.0 * float(np.mean(hit_probability(above_N, tied_N, np.ones_like(above_N), 1, ties)))


def knn_recall(query_QE, index_NE, query_label_Q, index_label_N, ks=(1, 5, 10), ties="expected", block=4096,
               backend="auto"):
    """ImageNet KNN (footnote 3, Tables 8-10): Recall@K in percent, a hit when the query's label is
    among the labels of its K nearest index images.

    >>> index = np.array([[1., 0.], [0.8, 0.6], [0., 1.]])
    >>> knn_recall(np.array([[1., 0.1], [0., 1.]]), index, np.array([7, 5]), np.array([3, 7, 5]), ks=(1, 2))
    {'R@1': 50.0, 'R@2': 100.0}
    """
    stats = positive_rank_stats(query_QE, index_NE, np.asarray(query_label_Q), np.asarray(index_label_N),
                                block=block, backend=backend)
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
               ties="expected", block=4096, backend="auto"):
    """Crisscrossed Captions (Parekh et al. 2021; ALIGN Tables 2-3) from embeddings and judgements.

    pairs: {"sts": (caption_P, caption_P, score_P), "sis": (image_P, image_P, score_P),
            "sits": (caption_P, image_P, score_P)}, row indices into txt_ME / img_NE, scores 0-5.
    Retrieval, Recall@K in percent: image<->text positives are each image's own captions plus the SITS
    pairs scoring >= threshold; text->text and image->image ask each item with an STS / SIS pair
    >= threshold (either side) for those partners, among all other captions / images. Correlations:
    Spearman's R x 100 of cosine against agg_score over all pairs, bootstrap mean and std.
    """
    keep = lambda task: [x[pairs[task][2] >= threshold] for x in pairs[task][:2]]
    rank_stats = functools.partial(positive_rank_stats, block=block, backend=backend)

    def intra(emb, task):
        a, b = keep(task)
        a, b = np.r_[a, b], np.r_[b, a]  # a judgement goes both ways
        queries = np.unique(a)
        stats = rank_stats(emb[queries], emb, positive_pairs=np.c_[np.searchsorted(queries, a), b],
                           exclude_pairs=np.c_[np.arange(len(queries)), queries])
        return _recalls(stats, ks, ties)

    cap, img = keep("sits")
    n = len(img_NE)
    i2t = rank_stats(img_NE, txt_ME, np.arange(n), txt_to_img_M, positive_pairs=np.c_[img, cap])
    t2i = rank_stats(txt_ME, img_NE, txt_to_img_M, np.arange(n), positive_pairs=np.c_[cap, img])
    result = {
        "i2t": _recalls(i2t, ks, ties),
        "t2i": _recalls(t2i, ks, ties),
        "t2t": intra(txt_ME, "sts"),
        "i2i": intra(img_NE, "sis"),
    }
    for task, (x, y) in {"sts": (txt_ME, txt_ME), "sis": (img_NE, img_NE), "sits": (txt_ME, img_NE)}.items():
        a, b, score = pairs[task][:3]
        mean, std = spearman_bootstrap(np.einsum("pe,pe->p", x[a], y[b]), score, n_boot, seed)
        result[task] = {"mean": 100 * mean, "std": 100 * std}
    result["mean_avg"] = float(np.mean([result[t]["mean"] for t in ("sts", "sis", "sits")]))
    return result


def top_k(query_QE, index_NE, k, block=4096, backend="auto"):
    """The k highest dot products of each query over the index, best first (ties: lower index first),
    one block of the index at a time -> (scores_QK, indices_QK).

    >>> top_k(np.array([[1., 0.]]), np.array([[0., 1.], [1., 0.], [0.6, 0.8]]), k=2)
    (array([[1. , 0.6]], dtype=float32), array([[1, 2]]))
    """
    query_QE, index_NE = np.asarray(query_QE, np.float32), np.asarray(index_NE, np.float32)
    k = min(k, len(index_NE))
    if use_jax(backend):
        return _top_k_jax(query_QE, index_NE, k, block)
    best_s = np.full((len(query_QE), 0), -np.inf, np.float32)
    best_i = np.zeros((len(query_QE), 0), np.int64)
    for n0, n1 in blocks(len(index_NE), block):
        s = np.concatenate([best_s, query_QE @ index_NE[n0:n1].T], axis=1)
        i = np.concatenate([best_i, np.broadcast_to(np.arange(n0, n1), (len(query_QE), n1 - n0))], axis=1)
        keep = np.lexsort((i, -s), axis=1)[:, :k]  # sort by score, descending, then by index
        best_s, best_i = np.take_along_axis(s, keep, 1), np.take_along_axis(i, keep, 1)
    return best_s, best_i


@functools.partial(jax.jit, static_argnames="k")
def _top_k_tile_jax(query_BE, index_KBE, num_n, j, best_BK, best_index_BK, k):
    """`top_k`'s merge of the j-th index block into the running best, on jax's default device."""
    bn = index_KBE.shape[1]
    sim_BB = jnp.dot(query_BE, index_KBE[j].T, precision=jax.lax.Precision.HIGHEST)  # float32, as numpy's
    col_B = j * bn + jnp.arange(bn)
    score = jnp.concatenate([best_BK, jnp.where(col_B < num_n, sim_BB, -jnp.inf)], axis=1)
    index = jnp.concatenate([best_index_BK, jnp.broadcast_to(col_B, sim_BB.shape)], axis=1)
    # The tie rule spelled out as a two-key sort (-score, index), as numpy's lexsort, rather than left to
    # whichever kernel lax.top_k gets on a device.
    _, index, score = jax.lax.sort((-score, index, score), dimension=1, num_keys=2)
    return score[:, :k], index[:, :k]


def _top_k_jax(query_QE, index_NE, k, block):
    num_q, num_n = len(query_QE), len(index_NE)
    bq, bn = _block_size(num_q, block), _block_size(num_n, block)
    num_k = -(-num_n // bn)
    index_KBE = jnp.asarray(_padded(index_NE, num_k * bn).reshape(num_k, bn, index_NE.shape[1]))
    scores_QK, indices_QK = np.zeros((num_q, k), np.float32), np.zeros((num_q, k), np.int64)
    for q0, q1 in blocks(num_q, bq):
        query_BE = jnp.asarray(_padded(query_QE[q0:q1], bq))
        # Placeholders that lose every tie, even with a real -inf or a padded column.
        best_BK, best_index_BK = jnp.full((bq, k), -jnp.inf, jnp.float32), jnp.full((bq, k), 2**31 - 1, jnp.int32)
        for j in range(num_k):
            best_BK, best_index_BK = _top_k_tile_jax(query_BE, index_KBE, num_n, j, best_BK, best_index_BK, k)
        scores_QK[q0:q1], indices_QK[q0:q1] = np.asarray(best_BK)[:q1 - q0], np.asarray(best_index_BK)[:q1 - q0]
    return scores_QK, indices_QK


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
