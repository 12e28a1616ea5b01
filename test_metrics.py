"""Tests for metrics.py: the metric maths on hand-built embeddings with known answers, and its docstring examples."""
import doctest
import itertools
import math

import jax
import numpy as np
import pytest

import metrics


def sims_as_embeddings(sim_NM):
    """Image and text embeddings whose dot products are exactly sim_NM: images one-hot, texts sim^T."""
    sim_NM = np.asarray(sim_NM, np.float32)
    return np.eye(len(sim_NM), dtype=np.float32), sim_NM.T.copy()


# big_vision's image_text_retrieval_test: distance matrices (4 images x 8 texts, texts 2k and 2k+1 of
# image k) and their recalls. Similarity = -distance.
BV_CAPTION_TO_IMAGE = np.array([0, 0, 1, 1, 2, 2, 3, 3])
BV_CASES = [
    ("i2t", [[0.0, 0.0, 0.1, 0.5, 0.1, 0.2, 0.5, 0.1], [0.5, 0.4, 0.0, 0.0, 0.4, 0.2, 0.6, 0.4],
             [0.5, 0.4, 0.1, 0.5, 0.0, 0.0, 0.8, 0.3], [0.5, 0.4, 0.1, 0.5, 0.3, 0.2, 0.0, 0.0]], (100, 100, 100)),
    ("i2t", [[0.8, 0.8, 0.1, 0.5, 0.1, 0.2, 0.5, 0.1], [0.5, 0.4, 0.0, 0.0, 0.4, 0.2, 0.6, 0.4],
             [0.5, 0.4, 0.1, 0.5, 0.0, 0.8, 0.8, 0.3], [0.5, 0.4, 0.1, 0.5, 0.4, 0.2, 0.3, 0.3]], (50, 75, 100)),
    ("t2i", [[0.8, 0.8, 0.1, 0.5, 0.1, 0.2, 0.1, 0.1], [0.5, 0.4, 0.0, 0.0, 0.4, 0.2, 0.6, 0.4],
             [0.5, 0.4, 0.1, 0.5, 0.0, 0.8, 0.8, 0.3], [0.5, 0.4, 0.1, 0.5, 0.4, 0.2, 0.3, 0.3]], (37.5, 100, 100)),
]


@pytest.mark.parametrize("direction, dist, expected", BV_CASES)
def test_multi_caption_retrieval_matches_big_vision_cases(direction, dist, expected):
    img, txt = sims_as_embeddings(-np.array(dist))
    r = metrics.retrieval_recalls(img, txt, BV_CAPTION_TO_IMAGE, ks=(1, 5, 10))[direction]
    assert [r["R@1"], r["R@5"], r["R@10"]] == pytest.approx(expected)


def test_an_image_hits_when_any_of_its_captions_does():
    # Image 0's best caption ranks first; image 1's best two rank 2nd and 3rd, behind a caption of image 0.
    sim = np.array([[0.9, 0.1, 0.2, 0.3, 0.4], [0.3, 0.8, 0.7, 0.1, 0.9]])
    img, txt = sims_as_embeddings(sim)
    r = metrics.retrieval_recalls(img, txt, np.array([0, 1, 1, 0, 0]), ks=(1, 2))
    assert r["i2t"] == {"R@1": 50.0, "R@2": 100.0}
    # captions: 0 -> image 0 (0.9 > 0.3) hit; 1, 2 -> image 1 hit; 3 -> image 0 (0.3 > 0.1) hit; 4 -> image 1 miss
    assert r["t2i"]["R@1"] == pytest.approx(80.0)


@pytest.mark.parametrize("n, per_image", [(20, 5), (7, 1)])
def test_constant_embeddings_score_chance_never_100(n, per_image):
    m = n * per_image
    img, txt = np.ones((n, 4), np.float32), np.ones((m, 4), np.float32)
    caption_image = np.repeat(np.arange(n), per_image)
    r = metrics.retrieval_recalls(img, txt, caption_image, ks=(1, 5, 10))
    for k in (1, 5, 10):
        # A random order of the m captions: P(one of the image's captions is in the top k).
        chance_i2t = 1 - math.comb(m - per_image, min(k, m)) / math.comb(m, min(k, m))
        assert r["i2t"][f"R@{k}"] == pytest.approx(100 * chance_i2t)
        assert r["t2i"][f"R@{k}"] == pytest.approx(100 * min(k, n) / n)
    pessimistic = metrics.retrieval_recalls(img, txt, caption_image, ks=(1,), ties="pessimistic")
    assert pessimistic == {"i2t": {"R@1": 0.0}, "t2i": {"R@1": 0.0}}


def test_expected_ties_equal_the_average_over_every_tie_order():
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = rng.integers(0, 3, 6).astype(np.float32)  # many ties
        positive = rng.random(6) < 0.4
        positive[rng.integers(6)] = True
        query, cands = np.ones((1, 1), np.float32), scores[:, None]
        stats = metrics.positive_rank_stats(query, cands, positive_pairs=np.c_[np.zeros(positive.sum()),
                                                                              np.flatnonzero(positive)])
        for k in (1, 2, 4):
            hits = []
            for order in itertools.permutations(range(6)):  # every way of breaking the ties
                ranked = sorted(range(6), key=lambda i: (-scores[i], order[i]))
                hits.append(positive[ranked[:k]].any())
            assert metrics.hit_probability(*stats, k)[0] == pytest.approx(np.mean(hits))


def test_classification_top1_top5_and_ties():
    # 3 images, 6 classes; image 2 ties its class with one other class at the top.
    scores = np.array([[9, 8, 7, 6, 5, 4], [1, 2, 3, 4, 5, 6], [5, 5, 0, 0, 0, 0]], np.float32)
    x, classes = sims_as_embeddings(scores)
    acc = metrics.classification_accuracy(x, classes, np.array([0, 0, 1]), ks=(1, 5))
    # image 0: class 0 first; image 1: class 0 last (6th); image 2: class 1 tied first -> 0.5 at top-1
    assert acc == {"top1": pytest.approx(100 * 1.5 / 3), "top5": pytest.approx(100 * 2 / 3)}


def test_zero_shot_prompt_ensemble_is_the_renormalised_mean():
    prompts = np.random.default_rng(0).normal(size=(5, 3, 8))
    prompts /= np.linalg.norm(prompts, axis=-1, keepdims=True)
    classes = metrics.class_embeddings(prompts)
    np.testing.assert_allclose(np.linalg.norm(classes, axis=-1), 1, rtol=1e-6)
    np.testing.assert_allclose(classes * np.linalg.norm(prompts.mean(1), axis=-1, keepdims=True), prompts.mean(1),
                               rtol=1e-6)


def test_knn_recall_hand_built():
    # index: two cats, two dogs, one bird on a line; queries: near a cat, near the bird, near a dog.
    index = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [0.7, 0.7]], np.float32)
    index_label = np.array([0, 0, 1, 1, 2])
    queries = np.array([[1, 0.05], [0.72, 0.69], [0.05, 1]], np.float32)
    r = metrics.knn_recall(queries, index, np.array([0, 2, 0]), index_label, ks=(1, 3, 5))
    # query 0 (cat): nearest is a cat; query 1 (bird): nearest the bird; query 2 (cat near the dogs): cats are
    # ranked 4th and 5th (behind two dogs and the bird)
    assert r == {"R@1": pytest.approx(200 / 3), "R@3": pytest.approx(200 / 3), "R@5": 100.0}


def test_spearman_with_tied_ranks():
    np.testing.assert_array_equal(metrics.rank_average([3, 1, 3, 3, 0]), [4, 2, 4, 4, 1])
    x, y = np.array([1, 2, 2, 3, 5.]), np.array([2, 1, 4, 4, 9.])
    rx, ry = np.array([1, 2.5, 2.5, 4, 5]), np.array([2, 1, 3.5, 3.5, 5])  # by hand
    expected = np.corrcoef(rx, ry)[0, 1]
    assert metrics.spearman(x, y) == pytest.approx(expected)
    assert metrics.spearman(x, -y) == pytest.approx(-expected)
    scipy_stats = pytest.importorskip("scipy.stats")
    big = np.random.default_rng(0).integers(0, 6, (2, 300)).astype(float)  # heavy ties, like agg_score
    assert metrics.spearman(*big) == pytest.approx(scipy_stats.spearmanr(*big)[0], abs=1e-12)


def test_spearman_bootstrap_mean_and_spread():
    rng = np.random.default_rng(1)
    x = rng.normal(size=2000)
    y = x + rng.normal(size=2000)
    full = metrics.spearman(x, y)
    mean, std = metrics.spearman_bootstrap(x, y, n_boot=200, seed=0)
    assert mean == pytest.approx(full, abs=0.01)
    # the bootstrap spread of a correlation estimated from n pairs shrinks like 1 / sqrt(n)
    _, std_small = metrics.spearman_bootstrap(x[:200], y[:200], n_boot=200, seed=0)
    assert 0.005 < std < 0.03 and std_small / std == pytest.approx(math.sqrt(10), rel=0.35)
    assert metrics.spearman_bootstrap(x, y, n_boot=50, seed=3) == metrics.spearman_bootstrap(x, y, n_boot=50, seed=3)


def test_blocked_equals_unblocked():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(23, 6)).astype(np.float32)
    txt = np.repeat(img, 3, axis=0) + rng.normal(scale=0.8, size=(69, 6)).astype(np.float32)
    txt[::7] = txt[0]  # exact ties across blocks
    caption_image = np.repeat(np.arange(23), 3)
    full = metrics.retrieval_recalls(img, txt, caption_image, block=10_000)
    assert metrics.retrieval_recalls(img, txt, caption_image, block=4) == full
    extra = np.c_[rng.integers(0, 23, 30), rng.integers(0, 69, 30)]
    stats = [metrics.positive_rank_stats(img, txt, np.arange(23), caption_image, positive_pairs=extra,
                                          exclude_pairs=extra[:5] + [0, 1], block=b) for b in (3, 10_000)]
    for a, b in zip(*stats):
        np.testing.assert_array_equal(a, b)
    scores, idx = metrics.top_k(img, txt, k=7, block=5)
    full_scores = img @ txt.T
    expected = np.lexsort((np.broadcast_to(np.arange(69), full_scores.shape), -full_scores), axis=1)[:, :7]
    np.testing.assert_array_equal(idx, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(full_scores, expected, 1), rtol=1e-6)


def tied_embeddings(seed):
    """Images and captions of small integers, so every dot product is exact in float32 whatever the order of
    the sums, with many exact ties (repeated rows, a constant row); 23 images and 69 captions leave a partial
    last block at every block size below."""
    rng = np.random.default_rng(seed)
    img = rng.integers(-2, 3, (23, 6)).astype(np.float32)
    txt = np.repeat(img, 3, axis=0) + rng.integers(-1, 2, (69, 6)).astype(np.float32)
    txt[::7], img[::5], txt[3] = txt[0], img[1], 1.0
    return img, txt, np.repeat(np.arange(23), 3)


@pytest.mark.parametrize("block", [4, 10, 4096])
def test_jax_backend_ranks_exactly_as_numpy(block):
    img, txt, caption_image = tied_embeddings(block)
    extra = np.c_[np.random.default_rng(1).integers(0, 23, 30), np.random.default_rng(2).integers(0, 69, 30)]
    for kwargs in ({"query_label_Q": np.arange(23), "cand_label_N": caption_image},  # labels
                   {"positive_pairs": extra, "exclude_pairs": extra[:5] + [0, 1]},  # pairs only
                   {"query_label_Q": np.arange(23), "cand_label_N": caption_image, "positive_pairs": extra,
                    "exclude_pairs": extra[5:9]}):
        by_backend = [metrics.positive_rank_stats(img, txt, **kwargs, block=block, backend=b)
                      for b in ("numpy", "jax")]
        for stat_numpy, stat_jax in zip(*by_backend):
            assert stat_jax.dtype == np.int64
            np.testing.assert_array_equal(stat_numpy, stat_jax)
    # the callers, ties counted as the numpy path counts them
    for ties in ("expected", "pessimistic"):
        assert (metrics.retrieval_recalls(img, txt, caption_image, ties=ties, block=block, backend="jax")
                == metrics.retrieval_recalls(img, txt, caption_image, ties=ties, block=block, backend="numpy"))
    labels = np.arange(69) % 4
    assert (metrics.knn_recall(txt, txt[::-1], labels, labels, block=block, backend="jax")
            == metrics.knn_recall(txt, txt[::-1], labels, labels, block=block, backend="numpy"))
    # top_k: ties (and 0.0 against -0.0) go to the lower index on both paths
    scores_numpy, idx_numpy = metrics.top_k(img, -txt, k=9, block=block, backend="numpy")
    scores_jax, idx_jax = metrics.top_k(img, -txt, k=9, block=block, backend="jax")
    assert idx_jax.dtype == np.int64
    np.testing.assert_array_equal(idx_jax, idx_numpy)
    np.testing.assert_array_equal(scores_jax, scores_numpy)


@pytest.mark.parametrize("backend", ["numpy", "jax"])
def test_top_k_ties_go_to_the_lower_index(backend):
    # scores [0, 0, 0, 0, -0.5] and all zeros (some -0.0); blocks of 2 pad the index with a sixth row, which
    # must not take the last place at score 0
    index = np.array([[0, 1], [-0.0, -5], [0, 5], [-0.0, -1], [0.5, 0]], np.float32)
    scores, idx = metrics.top_k(np.array([[-1, 0], [0, 0]], np.float32), index, k=5, block=2, backend=backend)
    np.testing.assert_array_equal(idx, [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]])
    np.testing.assert_array_equal(scores, [[0, 0, 0, 0, -0.5], [0, 0, 0, 0, 0]])


def test_jax_backend_equals_numpy_on_unit_embeddings():
    # Float32 sums that round: the two paths agree on these (and on the exact ties of repeated rows), though
    # a near-tie within the last bit could in principle go either way.
    rng = np.random.default_rng(3)
    img = rng.normal(size=(37, 24)).astype(np.float32)
    txt = np.repeat(img, 3, axis=0) + rng.normal(scale=0.8, size=(111, 24)).astype(np.float32)
    img, txt = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (img, txt))
    txt[::7], img[::5] = txt[0], img[1]
    caption_image = np.repeat(np.arange(37), 3)
    for direction in ((img, txt, np.arange(37), caption_image), (txt, img, caption_image, np.arange(37))):
        for stat_numpy, stat_jax in zip(*[metrics.positive_rank_stats(*direction, block=16, backend=b)
                                          for b in ("numpy", "jax")]):
            np.testing.assert_array_equal(stat_numpy, stat_jax)
    np.testing.assert_array_equal(metrics.top_k(txt, img, 9, block=16, backend="jax")[1],
                                  metrics.top_k(txt, img, 9, block=16, backend="numpy")[1])


def test_jax_backend_compiles_once_per_block_shape():
    img, txt, caption_image = tied_embeddings(0)
    img, txt = np.pad(img, ((0, 0), (0, 5))), np.pad(txt, ((0, 0), (0, 5)))  # width 11: not compiled before
    before = metrics._rank_tile_jax._cache_size()
    metrics.positive_rank_stats(txt, img, caption_image, np.arange(23), block=10, backend="jax")  # 7 x 3 blocks
    assert metrics._rank_tile_jax._cache_size() == before + 1  # the partial last blocks are padded, not new shapes
    assert metrics.use_jax("jax") and not metrics.use_jax("numpy")
    assert metrics.use_jax("auto") == (jax.default_backend() != "cpu")
    with pytest.raises(ValueError):
        metrics.use_jax("gpu")


def test_cxc_scores_positives_and_correlations():
    # 3 images with 2 captions each; image / caption embeddings on a circle so that every ranking is known.
    angle = lambda a: np.array([np.cos(a), np.sin(a)], np.float32)
    img = np.stack([angle(0.0), angle(1.0), angle(2.0)])
    txt = np.stack([angle(a) for a in (0.05, 0.9, 1.05, 1.95, 2.1, 0.1)])
    caption_image = np.array([0, 0, 1, 1, 2, 2])
    pairs = {"sts": (np.array([0, 2]), np.array([5, 4]), np.array([4.0, 1.0])),
             "sis": (np.array([0, 0]), np.array([1, 2]), np.array([3.5, 0.5])),
             "sits": (np.array([5, 3]), np.array([0, 0]), np.array([3.0, 2.0]))}
    r = metrics.cxc_scores(img, txt, caption_image, pairs, threshold=3.0, n_boot=10)
    # caption 5 (angle 0.1) belongs to image 2 but CxC makes image 0, its nearest, a positive too (score 3);
    # captions 1 and 3 are nearest to another image; caption 3 to image 0 scores 2, below the threshold
    assert r["t2i"]["R@1"] == pytest.approx(100 * 4 / 6)
    # image 2's nearest caption is caption 3, of image 1
    assert r["i2t"]["R@1"] == pytest.approx(100 * 2 / 3) and r["i2t"]["R@5"] == 100.0
    # text->text: caption 0 and 5 are positives of each other (score 4); 2-4 is below the threshold
    assert r["t2t"] == {"R@1": 100.0, "R@5": 100.0, "R@10": 100.0}
    # image->image: 0 and 1 are positives (3.5): image 0's nearest other image is 1, image 1's is 0 or 2 (tie)
    assert r["i2i"]["R@1"] == pytest.approx(75.0)
    # correlations over all pairs (two per task), each ordered as the scores
    for task in ("sts", "sis", "sits"):
        assert r[task] == {"mean": pytest.approx(100.0), "std": pytest.approx(0.0)}
    assert r["mean_avg"] == pytest.approx(100.0)


def test_combine_query_weights_text_two_to_one():
    img, red, cars = np.array([3.0, 0, 0]), np.array([0, 0.5, 0]), np.array([0, 0, 2.0])
    q = metrics.combine_query(img, [red], [cars])
    expected = np.array([1.0, 2.0, -2.0]) / 3.0  # unit vectors, image x1, +text x2, -text x2
    np.testing.assert_allclose(q, expected)


def test_docstring_examples():
    results = doctest.testmod(metrics, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert results.failed == 0 and results.attempted > 0
