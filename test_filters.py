"""Tests for filters.py: each Sec. 3 rule removes the pairs it should, through the function and the command line;
captions without spaces are several unigrams; the n-gram table counts like a Counter."""
import json

import pytest

import data
import filters
import synthetic
import wordpiece
from test_data import colour_image, pair_members, write_tar


@pytest.fixture(scope='module')
def tok():
    return wordpiece.Tokenizer(synthetic.synthetic_vocab())


def test_filter_removes_known_counts_per_rule(tmp_path, tok):
    """Each rule removes a known number of pairs; thresholds 3 (images per text, texts per image) for size."""
    common = ['red circle on grass', 'blue sky over the sea', 'a dog runs in the park', 'old town by the river',
              'green tree near a house', 'yellow car on the road']
    samples, n = [], 0

    def add(caption, image=None, size=(240, 210)):
        nonlocal n
        samples.extend(pair_members(f'{n:04d}', caption, image or colour_image(n, size)))
        n += 1
    for c in common * 2:                             # kept: 12, every n-gram seen at least twice
        add(c)
    add(common[0], size=(200, 300))                  # image_too_small: a shorter side of 200 is not > 200
    add(common[1], size=(201, 300))                  # kept
    add(common[2], size=(900, 300))                  # image_aspect_ratio: 3 is not < 3
    add(common[3], size=(897, 300))                  # kept
    add(common[4], b'broken')                        # unreadable
    shared = colour_image(999)
    for c in common[:4]:                             # image_many_texts: one image with 4 alt-texts > 3
        add(c + ' at noon', shared)
    for _ in range(4):                               # text_many_images: one alt-text on 4 images > 3
        add('a dog runs')
    add('red circle')                                # text_length: 2 unigrams
    add(' '.join(['red'] * 21))                      # text_length: 21 unigrams
    add(' '.join(['red'] * 20))                      # kept: 20 unigrams
    add('red circle on zyzzyva')                     # text_rare_token: 'zyzzyva' occurs once
    add('red circle over grass')                     # text_rare_token: the bigram 'circle over' occurs once
    write_tar(tmp_path / 'raw.tar', samples)
    counts = {}
    for caption in [m[1].decode() for m in samples if m[0].endswith('.txt')]:
        w = filters.unigrams(caption)
        for g in w + [f'{a} {b}' for a, b in zip(w, w[1:])]:
            counts[g] = counts.get(g, 0) + 1
    top = sum(v >= 2 for v in counts.values())  # so the vocabulary is exactly the n-grams seen twice or more
    out = tmp_path / 'out'
    report = filters.filter_pairs(str(tmp_path / 'raw.tar'), str(out), max_texts_per_image=3, max_images_per_text=3,
                               top_ngrams=top, shard_size=5)
    assert report['removed'] == {'unreadable': 1, 'image_too_small': 1, 'image_aspect_ratio': 1,
                                 'image_many_texts': 4, 'text_many_images': 4, 'text_length': 2, 'text_rare_token': 2}
    assert report['kept'] == 15 and report['input_pairs'] == 30 and report['shards'] == 3
    assert json.loads((out / 'report.json').read_text()) == report
    loader = data.make_loader(str(out / '*.tar'), tokenizer=tok, global_batch=4, image_size=32, train=False)
    assert sum(b['valid'].sum() for b in loader) == 15 and loader.stats['bad'] == 0
    filters.main(['--data', str(tmp_path / 'raw.tar'), '--out', str(tmp_path / 'cli'),
                  '--max-texts-per-image', '3', '--max-images-per-text', '3', '--top-ngrams', str(top)])
    assert json.loads((tmp_path / 'cli' / 'report.json').read_text())['removed'] == report['removed']
    # With the paper's thresholds (1000 texts per image, 10 images per text, 100M n-grams) only the
    # image-size, length and unreadable rules fire on this data.
    paper = filters.filter_pairs(str(tmp_path / 'raw.tar'), str(tmp_path / 'paper'))
    assert paper['kept'] == 30 - 1 - 1 - 1 - 2
    # The n-gram table holds the top-K it is asked for, from the function and from the command line.
    assert paper['thresholds']['table_size'] == paper['thresholds']['top_ngrams'] == 100_000_000
    assert json.loads((tmp_path / 'cli' / 'report.json').read_text())['thresholds']['table_size'] == top


@pytest.mark.parametrize('caption,words', [
    ('A red circle, on grass!', ['a', 'red', 'circle', 'on', 'grass']),     # punctuation is not a word
    # CJK ideographs and kana; BERT uncased strips voicing marks as it strips accents (が -> か, で -> て)
    ('猫がソファで寝ている', ['猫', 'か', 'ソ', 'フ', 'ァ', 'て', '寝', 'て', 'い', 'る']),
    ('一只猫在沙发上', ['一', '只', '猫', '在', '沙', '发', '上']),
    ('แมวดำนอนบนโซฟา', ['แ', 'ม', 'ว', 'ด', 'ำ', 'น', 'อ', 'น', 'บ', 'น', 'โ', 'ซ', 'ฟ', 'า']),  # Thai
    ('Café au lait ☕ in 東京', ['cafe', 'au', 'lait', 'in', '東', '京']),  # mixed scripts; an emoji is no word
])
def test_unigrams_split_scripts_without_spaces(caption, words):
    """Sec. 8: "none of the filters are language specific": a Chinese, Japanese or Thai caption, written
    without spaces, is several unigrams (one a character), not one, so the length and rare-token rules see it."""
    assert filters.unigrams(caption) == words


def test_ngram_table_counts_exactly_when_it_fits_and_keeps_the_most_frequent():
    """NgramCounts against collections.Counter: the same top-K when the table holds every n-gram (over
    several merges), and the most frequent ones when it must drop some."""
    import collections
    import random
    rng = random.Random(0)
    captions = [[f'w{min(int(rng.expovariate(0.05)), 99)}' for _ in range(rng.randint(3, 8))] for _ in range(2000)]
    exact, table = collections.Counter(), filters.NgramCounts(size=10_000)
    for i, words in enumerate(captions):
        exact.update(filters.ngrams(words))
        table.add(filters.ngrams(words))
        if i % 500 == 499:
            table._merge()  # as every millionth hash does
    assert table.counts.sum() == sum(exact.values()) and len(table.keys) == len(exact)
    ranked = exact.most_common()
    k = next(k for k in range(20, len(ranked)) if ranked[k - 1][1] > ranked[k][1])  # no tie at the cut-off
    assert set(table.top(k).tolist()) == {filters._hash64(g.encode()) for g, _ in ranked[:k]}
    small = filters.NgramCounts(size=k)  # pruned on the merge in top(): more than 2k n-grams
    for words in captions:
        small.add(filters.ngrams(words))
    assert set(small.top(k).tolist()) == set(table.top(k).tolist())

