"""ALIGN's noisy-pair filters (Sec. 3): raw image/alt-text pairs -> the training set, in two streaming passes.

ALIGN (Jia et al., ICML 2021) keeps its 1.8B pairs "noisy" on purpose, with only frequency-based filters:
image size and aspect ratio, images with too many alt-texts, alt-texts shared by too many images, alt-texts
too short, too long or with a rare token. Top to bottom:
  FILTER_RULES                 the rules, in the order each pair is checked (the first broken one counts)
  unigrams, ngrams             the words of an alt-text; its unigrams and bigrams
  NgramCounts                  the bounded n-gram counter: 64-bit hashes and counts in numpy, 16 bytes an entry
  filter_pairs                 pass 1 counts (hashes, n-grams); pass 2 drops, writes tar shards + report.json
  print_report                 pairs removed per rule, and kept

Command line (every threshold a flag; the defaults are the paper's):
  python filters.py --data 'raw/{00000..00999}.tar' --out filtered/

Deviations from the paper:
- Pornographic-image removal and test-set near-duplicate removal (Sec. 3) are not implemented.
- The paper does not say how it split alt-text into unigrams. Here they are the BERT tokenizer's basic
  tokens (`wordpiece.basic_tokenize`: lower-cased, accents stripped, punctuation split off) that hold a
  letter or digit, so that "none of the filters are language specific" (Sec. 8) holds for scripts written
  without spaces too: CJK ideographs (split by basic_tokenize) and kana, Thai, Lao, Khmer and Myanmar
  (split here) count one unigram per character. For ideographs that is about a morpheme; for the
  alphabets (Thai, Lao, Khmer, Myanmar) it is a letter, so there the length rule's 3-20 counts letters and
  keeps only short captions: words would need a dictionary segmenter (as PyThaiNLP's for Thai), which is
  language specific. (Basic tokenisation also drops combining marks: Thai vowel signs, kana voicing marks.)
- N-grams are counted by a 64-bit hash, not by their text: two n-grams whose hashes collide (odds about
  1e-3 for all of 200M distinct n-grams together) share a count. Ties at the top-K cut-off are broken by hash.
- The n-gram counter is bounded (`table_size`, by default the top-K itself): when it holds twice that it
  keeps its most frequent entries, so counts near the cut-off are approximate (exact when the table fits).
"""
import argparse
import collections
import hashlib
import io
import json
import math
import os
import re
import tarfile

import numpy as np
from PIL import Image

from data import Raw, _add_member, read_samples  # by name: filter_pairs calls its source `data`, as make_loader does
from wordpiece import basic_tokenize

FILTER_RULES = ('unreadable', 'image_too_small', 'image_aspect_ratio', 'image_many_texts',
                'text_many_images', 'text_length', 'text_rare_token')


# Scripts written without spaces between words whose characters basic_tokenize leaves joined (it splits
# CJK ideographs only): Hiragana, Katakana (and its half-width forms), Thai, Lao, Myanmar, Khmer.
_UNSPACED = re.compile('([\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9f\u0e00-\u0e7f\u0e80-\u0eff'
                       '\u1000-\u109f\ua9e0-\ua9ff\uaa60-\uaa7f\u1780-\u17ff\u19e0-\u19ff])')


def unigrams(text: str) -> list[str]:
    """The words of an alt-text for the Sec. 3 filters: the tokenizer's basic tokens that hold a letter or
    digit, with scripts written without spaces split into characters (see the deviations above).

    >>> unigrams('A cat, on the mat!'), unigrams('東京タワー'), unigrams('แมวดำ')
    (['a', 'cat', 'on', 'the', 'mat'], ['東', '京', 'タ', 'ワ', 'ー'], ['แ', 'ม', 'ว', 'ด', 'ำ'])
    """
    words = []
    for token in basic_tokenize(text):
        words += [w for w in _UNSPACED.split(token) if w] if _UNSPACED.search(token) else [token]
    return [w for w in words if any(ch.isalnum() for ch in w)]


def ngrams(words: list[str]) -> list[str]:
    """The unigrams and bigrams whose frequencies the rare-token rule uses (Sec. 3)."""
    return words + [f'{a} {b}' for a, b in zip(words, words[1:])]


def _hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), 'little')


class NgramCounts:
    """Frequencies of n-grams by 64-bit hash: sorted uint64 keys and int64 counts, 16 bytes an entry
    (a collections.Counter of the strings costs about 108: measured, 1M n-grams of 4 to 19 characters).

    New hashes wait in a list and join the sorted table a million at a time; when the table then holds
    more than 2 x `size` entries it keeps the `size` most frequent (counts near that cut-off are then
    approximate). Memory: up to 2 x `size` entries, and a merge copies them (README, "Filtering").
    """

    def __init__(self, size: int):
        self.size, self.keys, self.counts, self.pending = size, np.zeros(0, np.uint64), np.zeros(0, np.int64), []

    def add(self, grams: list[str]):
        self.pending += [_hash64(g.encode()) for g in grams]
        if len(self.pending) >= 1_000_000:
            self._merge()

    def _merge(self):
        new, n = np.unique(np.array(self.pending, np.uint64), return_counts=True)
        self.pending = []
        at = np.searchsorted(self.keys, new)
        seen = at < len(self.keys)
        seen[seen] = self.keys[at[seen]] == new[seen]
        self.counts[at[seen]] += n[seen]
        # np.insert keeps the keys sorted: each new key goes in front of the first larger one.
        self.keys = np.insert(self.keys, at[~seen], new[~seen])
        self.counts = np.insert(self.counts, at[~seen], n[~seen])
        if len(self.keys) > 2 * self.size:
            cut = len(self.counts) - self.size
            keep = np.sort(np.argpartition(self.counts, cut)[cut:])  # in key order: the keys stay sorted
            self.keys, self.counts = self.keys[keep], self.counts[keep]

    def top(self, k: int) -> np.ndarray:
        """The hashes of the k most frequent n-grams, sorted (for `np.searchsorted`)."""
        self._merge()
        if k >= len(self.keys):
            return self.keys
        return np.sort(self.keys[np.argpartition(self.counts, len(self.counts) - k)[len(self.counts) - k:]])


def _all_in(sorted_keys: np.ndarray, values: np.ndarray) -> bool:
    """Whether every one of `values` is in `sorted_keys` (the top-K hashes): a binary search each."""
    at = np.searchsorted(sorted_keys, values).clip(max=max(len(sorted_keys) - 1, 0))
    return len(values) == 0 or (len(sorted_keys) > 0 and bool(np.all(sorted_keys[at] == values)))


def filter_pairs(data: str, out_dir: str, *, min_side: int = 200, max_aspect: float = 3.0,
                 max_texts_per_image: int = 1000, max_images_per_text: int = 10, min_words: int = 3,
                 max_words: int = 20, top_ngrams: int = 100_000_000, table_size: int | None = None,
                 shard_size: int = 10_000, limit: int | None = None) -> dict:
    """ALIGN Sec. 3 in two streaming passes; writes DIR/NNNNN.tar and DIR/report.json, returns the report.

    Pass 1 counts: a (image hash, alt-text hash) pair per sample (16 bytes each, made distinct with
    np.unique) and the unigram + bigram frequencies (NgramCounts, bounded by table_size, by default
    top_ngrams: 16 bytes an entry, up to 2 x 100M of them, 3.2 GB). Pass 2 drops each pair at the first
    rule it breaks, in the order of FILTER_RULES, and writes the rest.
    """
    if data.startswith('synthetic'):
        raise ValueError('filters.py: synthetic data is clean by construction; filter tar shards or a TSV')
    table_size = table_size or top_ngrams
    chunks, pairs, counts = [], [], NgramCounts(table_size)
    for raw in read_samples(data, limit):
        if raw.reason or not raw.image or raw.caption is None:
            continue
        words = unigrams(raw.caption.decode('utf-8', 'replace'))
        pairs.append((_hash64(raw.image), _hash64(' '.join(words).encode())))
        counts.add(ngrams(words))
        if len(pairs) == 1_000_000:
            chunks, pairs = chunks + [np.array(pairs, np.uint64)], []
    distinct_pairs = np.unique(np.concatenate(chunks + [np.array(pairs, np.uint64).reshape(-1, 2)]), axis=0)
    images, texts_per_image = np.unique(distinct_pairs[:, 0], return_counts=True)
    texts, images_per_text = np.unique(distinct_pairs[:, 1], return_counts=True)
    # Sec. 3: "Images with more than 1000 associated alt-texts are discarded."
    bad_images = set(images[texts_per_image > max_texts_per_image].tolist())
    # Sec. 3: "We exclude alt-texts that are shared by more than 10 images."
    bad_texts = set(texts[images_per_text > max_images_per_text].tolist())
    # Sec. 3: "... discard alt-texts that contain any rare token (outside of 100 million most frequent
    # unigrams and bigrams from the raw dataset)."
    vocab = counts.top(top_ngrams)
    del chunks, pairs, distinct_pairs, counts

    def broken_rule(raw: Raw) -> str | None:
        if raw.reason or not raw.image or raw.caption is None:
            return 'unreadable'
        try:
            w, h = Image.open(io.BytesIO(raw.image)).size  # the header is enough
        except Exception:
            return 'unreadable'
        if min(w, h) <= min_side:  # Sec. 3: keep images whose shorter side is larger than 200 pixels
            return 'image_too_small'
        if max(w, h) / min(w, h) >= max_aspect:  # Sec. 3: ... and whose aspect ratio is smaller than 3
            return 'image_aspect_ratio'
        words = unigrams(raw.caption.decode('utf-8', 'replace'))
        if _hash64(raw.image) in bad_images:
            return 'image_many_texts'
        if _hash64(' '.join(words).encode()) in bad_texts:
            return 'text_many_images'
        if not min_words <= len(words) <= max_words:  # Sec. 3: fewer than 3 or more than 20 unigrams
            return 'text_length'
        if not _all_in(vocab, np.array([_hash64(g.encode()) for g in ngrams(words)], np.uint64)):
            return 'text_rare_token'
        return None

    os.makedirs(out_dir, exist_ok=True)
    removed, kept, tar = collections.Counter({r: 0 for r in FILTER_RULES}), 0, None
    for raw in read_samples(data, limit):
        rule = broken_rule(raw)
        if rule:
            removed[rule] += 1
            continue
        if kept % shard_size == 0:
            tar = tar.close() or None if tar else None
            tar = tarfile.open(os.path.join(out_dir, f'{kept // shard_size:05d}.tar'), 'w')
        _add_member(tar, f'{kept:09d}.{raw.ext or "jpg"}', raw.image)
        _add_member(tar, f'{kept:09d}.txt', raw.caption)
        kept += 1
    if tar:
        tar.close()
    total = kept + sum(removed.values())
    report = {'data': data, 'input_pairs': total, 'kept': kept, 'removed': dict(removed),
              'shards': math.ceil(kept / shard_size),
              'thresholds': {'min_side': min_side, 'max_aspect': max_aspect, 'max_texts_per_image': max_texts_per_image,
                             'max_images_per_text': max_images_per_text, 'min_words': min_words,
                             'max_words': max_words, 'top_ngrams': top_ngrams, 'table_size': table_size}}
    with open(os.path.join(out_dir, 'report.json'), 'w') as f:
        json.dump(report, f, indent=2)
    return report


def print_report(report: dict):
    total = max(report['input_pairs'], 1)
    print(f'{"rule (first broken, in order)":32s} {"removed":>10s} {"share":>7s}')
    for rule, n in report['removed'].items():
        print(f'{rule:32s} {n:10d} {n / total:7.1%}')
    print(f'{"kept":32s} {report["kept"]:10d} {report["kept"] / total:7.1%}   of {report["input_pairs"]} pairs,'
          f' in {report["shards"]} shards')


# ---------------------------------------------------------------- command line

def main(argv=None):
    p = argparse.ArgumentParser(description='apply the Sec. 3 filters and write tar shards + report.json')
    p.add_argument('--data', required=True)
    p.add_argument('--out', required=True)
    p.add_argument('--min-side', type=int, default=200)
    p.add_argument('--max-aspect', type=float, default=3.0)
    p.add_argument('--max-texts-per-image', type=int, default=1000)
    p.add_argument('--max-images-per-text', type=int, default=10)
    p.add_argument('--min-words', type=int, default=3)
    p.add_argument('--max-words', type=int, default=20)
    p.add_argument('--top-ngrams', type=int, default=100_000_000)
    p.add_argument('--table-size', type=int, help='bound on the n-gram counter (default: --top-ngrams; '
                   '16 bytes an entry, up to twice this many entries)')
    p.add_argument('--shard-size', type=int, default=10_000)
    p.add_argument('--limit', type=int)
    args = p.parse_args(argv)
    report = filter_pairs(args.data, args.out, min_side=args.min_side, max_aspect=args.max_aspect,
                          max_texts_per_image=args.max_texts_per_image,
                          max_images_per_text=args.max_images_per_text, min_words=args.min_words,
                          max_words=args.max_words, top_ngrams=args.top_ngrams, table_size=args.table_size,
                          shard_size=args.shard_size, limit=args.limit)
    print_report(report)


if __name__ == '__main__':
    main()
