"""Tests for synthetic.py: captions that describe their images, the vocabulary that covers them, and the
written held-out folder that reads back as the `synthetic:N` evaluation stream."""
import os

import numpy as np
import pytest

import data
import synthetic
import wordpiece


@pytest.fixture(scope='module')
def tok():
    return wordpiece.Tokenizer(synthetic.synthetic_vocab())


def test_synthetic_vocab_covers_synthetic_captions_and_loads_in_hf():
    path = synthetic.synthetic_vocab()
    assert path == synthetic.synthetic_vocab()  # deterministic: same content, same file
    tokens = open(path, encoding='utf-8').read().split('\n')
    assert tokens[:5] == list(wordpiece.SPECIAL_TOKENS)
    tok = wordpiece.Tokenizer(path)
    captions = [synthetic._synthetic_scene(np.random.default_rng([3, 0, i]))[1] for i in range(2000)]
    ids, _ = tok.encode(captions, 64)
    assert not (ids == tok.unk_id).any()
    transformers = pytest.importorskip('transformers')
    ref = transformers.BertTokenizer(path, do_lower_case=True)(captions[:200], truncation=True, max_length=64,
                                                                 padding='max_length')['input_ids']
    assert ids[:200].tolist() == ref


def test_synthetic_captions_describe_images():
    resize = data.resize_for(64)
    named = noisy = 0
    for i in range(200):
        pixels, caption = synthetic.synthetic_example(0, i, resize)
        assert pixels.shape == (resize, resize, 3) and pixels.dtype == np.uint8
        assert 3 <= len(caption.split()) <= 20
        colours = [w for w in caption.split() if w in synthetic.SYN_COLOURS]
        if not any(s in caption for s in synthetic.SYN_SHAPES):
            noisy += 1
            continue
        named += 1
        for colour in colours:  # each named colour is painted on at least a small object's area
            distance = np.abs(pixels.astype(int) - synthetic.SYN_COLOURS[colour]).sum(-1)
            assert (distance < 100).sum() >= 15, (i, caption, colour)
    assert 0.02 < noisy / 200 < 0.15 and named > 150
    a, b = synthetic.synthetic_example(0, 5, resize), synthetic.synthetic_example(0, 5, resize)
    assert (a[0] == b[0]).all() and a[1] == b[1]
    assert synthetic.synthetic_example(0, 5, resize, split=1)[0].tobytes() != a[0].tobytes()


def test_written_synthetic_folder_is_the_eval_split(tok, tmp_path):
    """`synthetic.py` writes the held-out pairs; read back as a TSV they are the `synthetic:N` batch."""
    assert synthetic.RESIZE == data.RESIZE  # written twice: data.py imports synthetic.py, not the reverse
    assert synthetic.main(['--out', str(tmp_path), '--count', '4', '--size', str(data.resize_for(32))]) is None
    assert sorted(os.listdir(tmp_path)) == ['000000.png', '000001.png', '000002.png', '000003.png', 'pairs.tsv']
    want = next(data.make_loader('synthetic:4', tokenizer=tok, global_batch=4, image_size=32, train=False))
    got = next(data.make_loader(str(tmp_path / 'pairs.tsv'), tokenizer=tok, global_batch=4, image_size=32,
                                train=False))
    np.testing.assert_array_equal(got['ids'], want['ids'])
    np.testing.assert_allclose(got['pixels'], want['pixels'], atol=1e-6)  # PNG is lossless

