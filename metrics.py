"""The metric maths of evaluating ALIGN (Jia et al., ICML 2021): pure numpy over embeddings, no JAX, no files.

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
  - CxC retrieval positives: the original COCO pairs plus CxC pairs with agg_score >= 3 (our reading
    of Parekh et al. 2021; evaluate.py's `--cxc-threshold`); text->text and image->image ask only the
    queries with a positive, over all other captions / images. The correlations use a plain bootstrap
    of the pairs.
"""
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
    the synthetic data's per-attribute zero-shot probes (`synthetic.attribute_probes`).

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
    for n0, n1 in blocks(len(index_NE), block):
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
