"""ALIGN's noisy-pair filters (Sec. 3): raw image/alt-text pairs -> the training set, in two streaming passes.

ALIGN (Jia et al., ICML 2021) keeps its 1.8B pairs "noisy" on purpose, with only frequency-based filters:
image size and aspect ratio, images with too many alt-texts, alt-texts shared by too many images, alt-texts
too short, too long or with a rare token. Top to bottom:
  FILTER_RULES                 the rules, in the order each pair is checked (the first broken one counts)
  unigrams                     the words of an alt-text
  filter_pairs                 pass 1 counts (hashes, n-grams); pass 2 drops, writes tar shards + report.json
  print_report                 pairs removed per rule, and kept

Command line (every threshold a flag; the defaults are the paper's):
  python filters.py --data 'raw/{00000..00999}.tar' --out filtered/

Deviations from the paper:
- Pornographic-image removal and test-set near-duplicate removal (Sec. 3) are not implemented.
- Unigrams are lower-cased runs of letters and digits (`\\w+`); the paper does not say how it split alt-text.
- The n-gram counter is bounded: when full it keeps its most frequent entries, so counts near the cut-off
  are approximate (exact when the table fits).
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

FILTER_RULES = ('unreadable', 'image_too_small', 'image_aspect_ratio', 'image_many_texts',
                'text_many_images', 'text_length', 'text_rare_token')


def unigrams(text: str) -> list[str]:
    """The words of an alt-text for the Sec. 3 filters: lower-cased runs of letters and digits."""
    return re.findall(r'\w+', text.lower())


def _hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), 'little')



def filter_pairs(data: str, out_dir: str, *, min_side: int = 200, max_aspect: float = 3.0,
                 max_texts_per_image: int = 1000, max_images_per_text: int = 10, min_words: int = 3,
                 max_words: int = 20, top_ngrams: int = 100_000_000, table_size: int = 10_000_000,
                 shard_size: int = 10_000, limit: int | None = None) -> dict:
    """ALIGN Sec. 3 in two streaming passes; writes DIR/NNNNN.tar and DIR/report.json, returns the report.

    Pass 1 counts: a (image hash, alt-text hash) pair per sample (16 bytes each, made distinct with
    np.unique) and the unigram + bigram frequencies (a counter bounded by table_size). Pass 2 drops
    each pair at the first rule it breaks, in the order of FILTER_RULES, and writes the rest.
    """
    if data.startswith('synthetic'):
        raise ValueError('filters.py: synthetic data is clean by construction; filter tar shards or a TSV')
    chunks, pairs, ngrams = [], [], collections.Counter()
    for raw in read_samples(data, limit):
        if raw.reason or not raw.image or raw.caption is None:
            continue
        words = unigrams(raw.caption.decode('utf-8', 'replace'))
        pairs.append((_hash64(raw.image), _hash64(' '.join(words).encode())))
        ngrams.update(words + [f'{a} {b}' for a, b in zip(words, words[1:])])
        if len(ngrams) > 2 * table_size:
            ngrams = collections.Counter(dict(ngrams.most_common(table_size)))
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
    vocab = {w for w, _ in ngrams.most_common(top_ngrams)}
    del chunks, pairs, distinct_pairs, ngrams

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
        if any(n not in vocab for n in words + [f'{a} {b}' for a, b in zip(words, words[1:])]):
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
    p.add_argument('--table-size', type=int, default=10_000_000, help='bound on the n-gram counter')
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
