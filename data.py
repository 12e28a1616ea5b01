"""ALIGN input pipeline: noisy image-text pairs -> batches of pixels and WordPiece ids.

The data side of ALIGN (Jia et al., ICML 2021), top to bottom:
  Tokenizer, learn_wordpiece   BERT uncased WordPiece; `data.py vocab` builds the vocabulary (Sec. 4.1)
  synthetic_example            images drawn on the fly with captions that describe them (the default data)
  decode_image, crop_pixels    resize to 346, random 289 crop + flip / central crop (Sec. 5)
  list_shards, read_shard      tar shards (webdataset layout) and TSV/CSV files, read as streams
  make_loader, Loader          worker processes, shuffling, multi-host split, exact resume, bad-input counts
  filter_pairs                 the Sec. 3 filters, `data.py filter`
  bench                        `data.py bench`: decode + augment throughput

Sources (`data` / `--data`):
  synthetic, synthetic:N        generated pairs (N: a finite set; evaluation uses N=1000 by default)
  dir/{00000..00127}.tar        tar shards: brace range, glob (dir/*.tar), or a text file listing shards
  pairs.tsv, pairs.csv          image path <tab|comma> caption; relative paths are relative to the file

Dimension key: B batch rows on this process, L text length (max_len), H = W image size, C = 3 channels,
N rows of one chunk of work sent to a worker process.

Deviations from the paper and from the reference tools:
- Pornographic-image removal and test-set near-duplicate removal (Sec. 3) are not implemented.
- Unigrams for the Sec. 3 text filters are lower-cased runs of letters and digits (`\\w+`); the paper
  does not say how it split alt-text.
- The n-gram and word counters are bounded: when full they keep their most frequent entries, so counts
  near the cut-off are approximate (exact when the table fits).
- The vocabulary is learnt with BPE-style merges of the most frequent adjacent pair under the `##`
  continuation prefix (as HF tokenizers' WordPieceTrainer does), not with Google's internal tool.
- Resize + crop is one bilinear resample of the matching source box (equal to resizing to 346 then
  cropping 289, up to rounding), and the resize squashes the aspect ratio, as the paper's 346x346 says.
- Synthetic images are never flipped: their captions say "left" and "right".
- The tokenizer matches HF `BertTokenizer` (Rust tokenizers), whose accent and punctuation tables
  are older than Python 3.11's: ~560 of 1.1M code points differ, all added to Unicode after 3.2.
"""
import argparse
import collections
import concurrent.futures
import csv
import glob
import hashlib
import heapq
import io
import itertools
import json
import math
import multiprocessing
import os
import re
import tarfile
import tempfile
import time
import unicodedata
import warnings
import zlib
from multiprocessing import shared_memory
from typing import Iterator, NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

RESIZE, CROP = 346, 289          # ALIGN Sec. 5: resize to 346x346, crop 289x289
MAX_PIXELS = 89_478_485          # PIL's own decompression-bomb limit (1024**3 // 4 // 3 pixels)
IMAGE_EXTS = ('jpg', 'jpeg', 'png', 'webp')
SPECIAL_TOKENS = ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]')  # BERT's order: [PAD] is id 0
SYNTHETIC_EVAL_SIZE = 1000


def resize_for(image_size: int) -> int:
    """The resize side that goes with a crop side: 346 for 289 (ALIGN Sec. 5), scaled together."""
    return round(image_size * RESIZE / CROP)


# ---------------------------------------------------------------- tokenizer (Sec. 4.1)

# HF tokenizers' BertNormalizer treats these as CJK; its range reads 0x2B920 where BERT's reads
# 0x2B820 (a typo upstream). We follow HF so that ids match.
_CJK = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
        (0x2B740, 0x2B81F), (0x2B920, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))
_ASCII_CONTROL = re.compile(r'[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]')
_ASCII_WORDS = re.compile(r'[a-z0-9]+|[^a-z0-9\s]')  # every printable ASCII non-alnum is BERT punctuation


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)  # BERT counts ASCII symbols such as $ + < = > ^ ` | ~ as punctuation too
    return 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126 or \
        unicodedata.category(ch).startswith('P')


def basic_tokenize(text: str) -> list[str]:
    """BERT uncased pre-tokenisation: clean, split CJK, strip accents, lower-case, split punctuation.

    >>> basic_tokenize('Héllo,  WORLD!\\x00 東京')
    ['hello', ',', 'world', '!', '東', '京']
    """
    if text.isascii():  # fast path for most alt-text; same result as the general path below
        return _ASCII_WORDS.findall(_ASCII_CONTROL.sub('', text).lower())
    chars = []
    for ch in text:
        # Unassigned code points (Cn) are kept, as HF's Rust normaliser does: Python 3.11 calls emoji
        # newer than Unicode 14 unassigned, and they must become [UNK], not vanish.
        if ch in '\0\ufffd' or (ch not in '\t\n\r' and unicodedata.category(ch) in ('Cc', 'Cf', 'Co', 'Cs')):
            continue
        if ch.isspace():
            chars.append(' ')
        elif any(lo <= ord(ch) <= hi for lo, hi in _CJK):
            chars += [' ', ch, ' ']
        else:
            chars.append(ch)
    text = unicodedata.normalize('NFD', ''.join(chars))
    # Accents are stripped before lower-casing, character by character, as HF's Rust normaliser does
    # (so a final capital sigma becomes 'σ', not Python's context-aware 'ς').
    text = ''.join(ch.lower() for ch in text if unicodedata.category(ch) != 'Mn')
    words = []
    for word in text.split():
        start = 0
        for i, ch in enumerate(word):
            if _is_punctuation(ch):
                words += [word[start:i], ch] if start < i else [ch]
                start = i + 1
        if start < len(word):
            words.append(word[start:])
    return words


class Tokenizer:
    """BERT uncased WordPiece over a vocab.txt; ids equal HF `BertTokenizer(vocab, do_lower_case=True)`."""

    def __init__(self, vocab_path: str):
        with open(vocab_path, encoding='utf-8') as f:
            self.vocab = {line.rstrip('\n'): i for i, line in enumerate(f)}
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (self.vocab[t] for t in SPECIAL_TOKENS)
        # Like HF, special tokens written literally in the text ('[SEP]') are matched before normalising.
        self._special = re.compile('(' + '|'.join(re.escape(t) for t in SPECIAL_TOKENS) + ')')
        self._cache: dict[str, list[int]] = {}

    def wordpiece(self, word: str) -> list[int]:
        """Greedy longest-match-first split into pieces, continuations prefixed with ##."""
        if len(word) > 100:  # BERT's max_input_chars_per_word
            return [self.unk_id]
        ids, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = word[start:end] if start == 0 else '##' + word[start:end]
                if piece in self.vocab:
                    break
            else:
                return [self.unk_id]  # one unmatched piece makes the whole word unknown
            ids.append(self.vocab[piece])
            start = end
        return ids

    def token_ids(self, text: str) -> list[int]:
        ids = []
        for i, part in enumerate(self._special.split(text)):
            if i % 2:
                ids.append(self.vocab[part])
                continue
            for word in basic_tokenize(part):
                if word not in self._cache:
                    if len(self._cache) > 200_000:
                        self._cache.clear()
                    self._cache[word] = self.wordpiece(word)
                ids += self._cache[word]
        return ids

    def encode(self, texts: list[str], max_len: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """[CLS] text [SEP], truncated to max_len with [SEP] kept last, [PAD]-padded -> (ids_BL, mask_BL)."""
        ids_BL = np.full((len(texts), max_len), self.pad_id, np.int32)
        mask_BL = np.zeros((len(texts), max_len), np.int32)
        for b, text in enumerate(texts):
            ids = [self.cls_id] + self.token_ids(text)[:max_len - 2] + [self.sep_id]
            ids_BL[b, :len(ids)] = ids
            mask_BL[b, :len(ids)] = 1
        return ids_BL, mask_BL


def count_words(captions, max_words: int = 2_000_000) -> collections.Counter:
    """Counts of pre-tokenised words in a stream of captions, in memory bounded by 2 * max_words."""
    counts = collections.Counter()
    for caption in captions:
        counts.update(basic_tokenize(caption))
        if len(counts) > 2 * max_words:  # prune: keep the most frequent (lossy for words near the cut)
            counts = collections.Counter(dict(counts.most_common(max_words)))
    return counts


def learn_wordpiece(word_counts: dict, vocab_size: int, limit_alphabet: int = 1000, min_count: int = 2) -> list[str]:
    """A WordPiece vocabulary from word counts by merging the most frequent adjacent pair (BPE-style).

    Words start as characters, continuations prefixed with '##' ('cat' -> c ##a ##t); each step
    merges the most frequent adjacent pair across all words (c + ##a -> ca), until vocab_size
    tokens or no pair occurs min_count times. Pair counts are kept up to date incrementally
    (only words containing the merged pair are touched), with a lazy max-heap.
    """
    chars = collections.Counter()
    for word, n in word_counts.items():
        for ch in word:
            chars[ch] += n
    alphabet = {ch for ch, _ in sorted(chars.items(), key=lambda kv: (-kv[1], kv[0]))[:limit_alphabet]}
    words, counts = [], []
    for word, n in sorted(word_counts.items()):
        if set(word) <= alphabet:  # words with a rare character stay [UNK]
            words.append([word[0]] + ['##' + ch for ch in word[1:]])
            counts.append(n)
    symbols = collections.Counter()
    for w, n in zip(words, counts):
        for s in w:
            symbols[s] += n
    vocab = list(SPECIAL_TOKENS) + sorted(symbols, key=lambda s: (-symbols[s], s))
    seen = set(vocab)
    pairs, where = collections.Counter(), collections.defaultdict(set)
    for i, (w, n) in enumerate(zip(words, counts)):
        for a, b in zip(w, w[1:]):
            pairs[a, b] += n
            where[a, b].add(i)
    heap = [(-n, a, b) for (a, b), n in pairs.items()]
    heapq.heapify(heap)
    while len(vocab) < vocab_size and heap:
        n, a, b = heapq.heappop(heap)
        if -n != pairs.get((a, b), 0):
            continue  # stale heap entry: the pair's count changed since it was pushed
        if -n < min_count:
            break
        merged = a + b[2:]
        if merged not in seen:
            vocab.append(merged)
            seen.add(merged)
        changed = set()
        for i in sorted(where.pop((a, b))):
            w, c = words[i], counts[i]
            for x, y in zip(w, w[1:]):
                pairs[x, y] -= c
                changed.add((x, y))
            out, j = [], 0
            while j < len(w):
                pair = w[j:j + 2] == [a, b]
                out.append(merged if pair else w[j])
                j += 2 if pair else 1
            words[i] = out
            for x, y in zip(out, out[1:]):
                pairs[x, y] += c
                where[x, y].add(i)
                changed.add((x, y))
        for p in changed:
            if pairs[p] > 0:
                heapq.heappush(heap, (-pairs[p], *p))
            else:
                pairs.pop(p, None)
    return vocab


def write_vocab(tokens: list[str], path: str) -> str:
    """Writes one token per line, atomically (several processes may race to write the same file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
        f.write(''.join(t + '\n' for t in tokens))
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------- synthetic data

SYN_COLOURS = {'red': (220, 40, 40), 'green': (40, 170, 60), 'blue': (40, 80, 230), 'yellow': (245, 215, 40),
               'purple': (140, 50, 180), 'orange': (250, 140, 20), 'black': (15, 15, 15), 'white': (250, 250, 250)}
SYN_SHAPES = ('circle', 'square', 'triangle')
# Object sides as a fraction of the image: 7 and 11 pixels in tiny's 32x32 crops (at 0.12 and 0.24, a small
# triangle was 4 pixels and the model told shapes apart at 45%, chance 33%).
SYN_SIZES = {'small': (0.18, ('small', 'little', 'tiny')), 'large': (0.30, ('large', 'big', 'huge'))}
# Regions as (x0, y0, x1, y1) fractions, inside the part of the image that every 289/346 crop keeps.
SYN_REGIONS = {'left': (.17, .17, .5, .83), 'right': (.5, .17, .83, .83), 'top': (.17, .17, .83, .5),
               'bottom': (.17, .5, .83, .83), 'center': (.2, .2, .8, .8)}
SYN_WHERE = {'left': ('on the left', 'at the left'), 'right': ('on the right', 'at the right'),
             'top': ('at the top', 'on top'), 'bottom': ('at the bottom', 'below'),
             'center': ('in the middle', 'in the center')}
SYN_PREFIXES = ('a photo of', 'an image of', 'picture of', 'a drawing of', 'stock image of', 'there is')
SYN_NOISE = ('image {n} jpg', 'dsc {n} jpg file', 'thumbnail for version as of {n} {m}', 'click to enlarge {n}',
             'stock photo {n}x{m} wallpaper', 'free download hd wallpaper {n}', 'untitled design {n} png',
             'photo by user{n} on flickr', 'screenshot {n} {m} at home', 'copy of img {n} final')
SYN_NOISY_RELEVANT = ('{c} {s} wallpaper hd free download', '{c} {s} clipart png {n}', 'vector {s} icon {c} color',
                      'buy {c} {s} online best price')


def _synthetic_scene(rng: np.random.Generator) -> tuple[list, str]:
    """Draws 1-2 groups of 1-3 identical shapes and a caption naming counts, sizes, colours, places."""
    places = [list(SYN_REGIONS)[rng.integers(5)]] if rng.random() < 0.5 else \
        [('left', 'right'), ('top', 'bottom')][rng.integers(2)]
    colours = rng.permutation(len(SYN_COLOURS))
    groups, phrases = [], []
    for g, place in enumerate(places):
        count = int(rng.integers(1, 4))
        size = 'large' if count <= 2 and rng.random() < 0.5 else 'small'
        colour, shape = list(SYN_COLOURS)[colours[g]], SYN_SHAPES[rng.integers(3)]
        groups.append((count, size, colour, shape, place))
        # Every attribute is named (in one of its synonyms): when a fifth of the captions left out the size or
        # the place, one caption fitted several held-out images and R@1 could reach at most 66%.
        words = [('a' if rng.random() < 0.7 else 'one') if count == 1 else ('two', 'three')[count - 2],
                 SYN_SIZES[size][1][rng.integers(3)], colour, shape + ('s' if count > 1 else ''),
                 SYN_WHERE[place][rng.integers(2)]]
        phrases.append(' '.join(words))
    caption = ' and '.join(phrases)
    prefix, suffix = SYN_PREFIXES[rng.integers(len(SYN_PREFIXES))], ' on a grey background'
    if rng.random() < 0.3 and len(caption.split()) + 3 <= 20:  # ALIGN Sec. 3 keeps 3-20 unigrams
        caption = prefix + ' ' + caption
    if rng.random() < 0.1 and len(caption.split()) + 4 <= 20:
        caption += suffix
    if rng.random() < 0.1:  # like web alt-text (ALIGN Fig. 2): unrelated, or only loosely related
        n, m = int(rng.integers(10, 9999)), int(rng.integers(10, 99))
        noisy = SYN_NOISE if rng.random() < 0.5 else SYN_NOISY_RELEVANT
        caption = noisy[rng.integers(len(noisy))].format(n=n, m=m, c=groups[0][2], s=groups[0][3])
    return groups, caption



def synthetic_example(seed: int, index: int, resize: int, split: int = 0) -> tuple[np.ndarray, str]:
    """Sample `index` of the synthetic set: (pixels_HWC uint8 of side `resize`, caption).

    Deterministic in (seed, split, index); split 0 is training, 1 is evaluation (never trained on).
    """
    rng = np.random.default_rng([seed, split, index])
    groups, caption = _synthetic_scene(rng)
    grey = int(rng.integers(90, 170))
    img = Image.new('RGB', (resize, resize), (grey, grey, grey + int(rng.integers(-20, 20))))
    draw = ImageDraw.Draw(img)
    for count, size, colour, shape, place in groups:
        x0, y0, x1, y1 = (v * resize for v in SYN_REGIONS[place])
        wide = x1 - x0 >= y1 - y0  # objects of a group sit in a row along the region's long side
        for k in range(count):
            sx0, sy0 = (x0 + k * (x1 - x0) / count, y0) if wide else (x0, y0 + k * (y1 - y0) / count)
            sw, sh = ((x1 - x0) / count, y1 - y0) if wide else (x1 - x0, (y1 - y0) / count)
            d = SYN_SIZES[size][0] * resize * rng.uniform(0.9, 1.1)
            cx = sx0 + sw / 2 + rng.uniform(-1, 1) * max(0, sw - d) / 2
            cy = sy0 + sh / 2 + rng.uniform(-1, 1) * max(0, sh - d) / 2
            fill = tuple(min(255, max(0, v + int(rng.integers(-25, 26)))) for v in SYN_COLOURS[colour])
            box = (cx - d / 2, cy - d / 2, cx + d / 2, cy + d / 2)
            if shape == 'circle':
                draw.ellipse(box, fill=fill)
            elif shape == 'square':
                draw.rectangle(box, fill=fill)
            else:
                draw.polygon([(cx, box[1]), (box[0], box[3]), (box[2], box[3])], fill=fill)
    noise = rng.normal(0, 6, (resize, resize, 3))
    return np.clip(np.asarray(img) + noise, 0, 255).astype(np.uint8), caption


# What a synthetic group can vary in (`attribute_probes`): its field in the group tuple (count, size, colour,
# shape, place) of `_synthetic_scene`, and the values it takes.
SYN_ATTRIBUTES = {'colour': (2, tuple(SYN_COLOURS)), 'shape': (3, SYN_SHAPES), 'count': (0, (1, 2, 3)),
                  'size': (1, tuple(SYN_SIZES)), 'position': (4, tuple(SYN_REGIONS))}


def describe_group(count: int, size: str, colour: str, shape: str, place: str) -> str:
    """One group's plain caption, every attribute named: 'two small red circles on the left'."""
    return f"{('a', 'two', 'three')[count - 1]} {size} {colour} {shape}{'s' * (count > 1)} {SYN_WHERE[place][0]}"


def attribute_probes(count: int = SYNTHETIC_EVAL_SIZE, seed: int = 0, split: int = 1) -> dict:
    """Zero-shot probes of each attribute on the held-out scenes of one group (about half of them).

    For each attribute, each such scene gets one caption per value of that attribute, the others kept
    true ('a small red circle on the left' against '... green circle ...', '... blue circle ...'): a model
    that knows colour picks the true one among 8, whatever else it knows. Returns {attribute: (image
    indices [N], captions [N][V], index of the true caption [N])}; the indices are those of
    `synthetic_example(seed, index, ..., split)` and of the `synthetic:count` evaluation stream.
    """
    probes = {}
    scenes = [(i, _synthetic_scene(np.random.default_rng([seed, split, i]))[0]) for i in range(count)]
    scenes = [(i, groups[0]) for i, groups in scenes if len(groups) == 1]
    for a, (field, values) in SYN_ATTRIBUTES.items():
        captions = [[describe_group(*g[:field], v, *g[field + 1:]) for v in values] for _, g in scenes]
        probes[a] = ([i for i, _ in scenes], captions, [values.index(g[field]) for _, g in scenes])
    return probes


def write_synthetic(out: str, count: int, split: int = 1, size: int = RESIZE, seed: int = 0) -> str:
    """Writes samples 0..count-1 of a split as OUT/000000.png ... and OUT/pairs.tsv (path<TAB>caption).

    The same pairs the loader draws (`synthetic:N` evaluation uses split 1): a folder to look at, to
    index with `evaluate.py search`, or to read back as a TSV source.
    """
    os.makedirs(out, exist_ok=True)
    rows = []
    for i in range(count):
        pixels, caption = synthetic_example(seed, i, size, split)
        Image.fromarray(pixels).save(os.path.join(out, f'{i:06d}.png'))
        rows.append(f'{i:06d}.png\t{caption}\n')
    with open(os.path.join(out, 'pairs.tsv'), 'w', encoding='utf-8') as f:
        f.writelines(rows)
    return out


def synthetic_vocab(path: str | None = None) -> str:
    """Writes the vocab.txt that covers every synthetic caption (and any ASCII text) and returns its path.

    [PAD]=0, [UNK], [CLS], [SEP], [MASK], then the caption words, then single characters and their
    ## forms, so that numbers and unseen ASCII words split into pieces instead of [UNK].
    """
    words = {w for table in (SYN_COLOURS, SYN_SHAPES, SYN_PREFIXES, SYN_NOISE, SYN_NOISY_RELEVANT)
             for phrase in table for w in basic_tokenize(phrase.replace('{', ' ').replace('}', ' '))}
    words |= {s + 's' for s in SYN_SHAPES} | {w for _, ws in SYN_SIZES.values() for w in ws}
    words |= {w for ps in SYN_WHERE.values() for p in ps for w in p.split()}
    words |= {'a', 'one', 'two', 'three', 'and', 'grey', 'background'}
    chars = [chr(c) for c in range(33, 127) if not chr(c).isupper()]
    tokens = list(SPECIAL_TOKENS) + sorted(words - set(chars)) + chars + ['##' + c for c in chars if c.isalnum()]
    digest = hashlib.sha1('\n'.join(tokens).encode()).hexdigest()[:10]
    path = path or os.path.join(tempfile.gettempdir(), f'align_synthetic_vocab_{digest}.txt')
    if not os.path.exists(path) or open(path, encoding='utf-8').read() != ''.join(t + '\n' for t in tokens):
        write_vocab(tokens, path)
    return path


# ---------------------------------------------------------------- image preprocessing (Sec. 5)

CHUNK = 16  # samples per task sent to a worker: large enough to amortise the hand-off


class BadSample(Exception):
    """A sample to skip; args[0] is the reason it is counted under."""


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency composited on white, 16-bit greys scaled rather than clipped."""
    if img.mode == 'RGB':
        return img
    if img.mode.startswith('I'):  # 'I;16' / 'I' from 16-bit PNGs: 65535 is white, so divide by 257
        grey = np.clip(np.asarray(img, dtype=np.float32) / 257.0, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, 'L').convert('RGB')
    if 'transparency' in img.info or img.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La'):
        img = img.convert('RGBA')
        return Image.alpha_composite(Image.new('RGBA', img.size, (255, 255, 255, 255)), img).convert('RGB')
    return img.convert('RGB')  # L, 1, P, CMYK, YCbCr, LAB, HSV, F


def decode_image(data: bytes, resize: int = RESIZE, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Image bytes -> RGB image, EXIF orientation applied; raises BadSample(reason) on bad input."""
    if not data:
        raise BadSample('empty_image')
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('error', Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # reads the header only
            if img.width * img.height > max_pixels:
                raise BadSample('decompression_bomb')
            # JPEG DCT scaling: decode at 1/2, 1/4 or 1/8 size when that still covers the resize target.
            img.draft('RGB', (resize, resize))
            ImageOps.exif_transpose(img, in_place=True)  # in place: no copy when there is nothing to turn
            img = to_rgb(img)
            img.load()
    except BadSample:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadSample('decompression_bomb')
    except UnidentifiedImageError:
        raise BadSample('not_image')
    except Exception:  # truncated data, bad Huffman tables, broken EXIF, ...: PIL raises many kinds
        raise BadSample('corrupt_image')
    return img


def crop_pixels(img: Image.Image, image_size: int, x0: int, y0: int, flip: bool) -> np.ndarray:
    """ALIGN Sec. 5: resize to 346x346, take the 289x289 crop at (x0, y0), maybe mirror -> uint8 HWC.

    Done as one bilinear resample of the source box that maps onto the crop: the same pixels as
    resizing the whole image and then cropping, for a third less work.
    """
    resize, (w, h) = resize_for(image_size), img.size
    sx, sy = w / resize, h / resize
    box = (x0 * sx, y0 * sy, (x0 + image_size) * sx, (y0 + image_size) * sy)
    img = img.resize((image_size, image_size), Image.BILINEAR, box=box)
    return np.asarray(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else img)


def crop_params(image_size: int, aug: tuple | None) -> tuple[int, int, bool]:
    """Random crop offset and flip from a per-sample seed (training), or the central crop (aug=None)."""
    margin = resize_for(image_size) - image_size
    if aug is None:
        return margin // 2, margin // 2, False
    rng = np.random.default_rng(aug)
    x0, y0 = rng.integers(0, margin + 1, 2)
    return int(x0), int(y0), bool(rng.integers(2))


# ---------------------------------------------------------------- sources

class Shard(NamedTuple):
    name: str                  # a tar path, or 'pairs.tsv[0:1000]'
    rows: tuple | None = None  # ((image path, caption bytes), ...) for a block of a TSV/CSV; None for a tar


class Raw(NamedTuple):
    key: str                   # 'shard:key', named in error reports
    image: bytes | str | tuple | None  # bytes, a file path, or ('synthetic', seed, split, index)
    ext: str
    caption: bytes | None
    reason: str | None = None  # set when the sample is already known to be bad


def list_shards(spec: str) -> list[str]:
    """Tar shard paths from a brace range 'dir/{000..127}.tar', a glob, a list file, or one path."""
    m = re.search(r'\{(\d+)\.\.(\d+)\}', spec)
    if m:
        width = len(m.group(1))
        return [p for i in range(int(m.group(1)), int(m.group(2)) + 1)
                for p in list_shards(spec[:m.start()] + str(i).zfill(width) + spec[m.end():])]
    if any(c in spec for c in '*?['):
        paths = sorted(glob.glob(spec))
        if not paths:
            raise ValueError(f'data.py: no file matches {spec!r}')
        return paths
    if os.path.isfile(spec) and not re.search(r'\.(tar|tar\.gz|tgz)$', spec):
        root = os.path.dirname(spec)
        lines = [ln.strip() for ln in open(spec, encoding='utf-8')]
        return [os.path.join(root, ln) for ln in lines if ln and not ln.startswith('#')]
    return [spec]


def read_table(path: str, rows_per_shard: int, min_shards: int = 1) -> list[Shard]:
    """A TSV/CSV of image path and caption as blocks of rows (at least min_shards blocks when there are
    that many rows, so that every process gets one); a header row naming the columns is skipped."""
    root = os.path.dirname(path)
    with open(path, encoding='utf-8', errors='surrogateescape', newline='') as f:
        table = list(csv.reader(f, delimiter='\t' if path.endswith('.tsv') else ','))
    if table and table[0] and table[0][0].strip().lower() in ('image', 'image_path', 'path', 'filepath', 'file'):
        table = table[1:]
    # Captions go on as bytes so that invalid UTF-8 is repaired and counted where tar captions are.
    rows = tuple((os.path.join(root, r[0]), r[1].encode('utf-8', 'surrogateescape') if len(r) > 1 else None)
                 for r in table if r)
    rows_per_shard = max(1, min(rows_per_shard, math.ceil(len(rows) / min_shards)))
    return [Shard(f'{path}[{i}:{i + len(rows[i:i + rows_per_shard])}]', rows[i:i + rows_per_shard])
            for i in range(0, len(rows), rows_per_shard)]


def source_shards(data: str, rows_per_shard: int = 1000, min_shards: int = 1) -> list[Shard]:
    """The shards of a `--data` source that is not synthetic."""
    if re.search(r'\.(tsv|csv)$', data):
        return read_table(data, rows_per_shard, min_shards)
    return [Shard(p) for p in list_shards(data)]


def read_shard(shard: Shard) -> Iterator[Raw]:
    """The samples of one shard, read as a stream (tar members are never extracted to disk)."""
    if shard.rows is not None:
        for i, (path, caption) in enumerate(shard.rows):
            yield Raw(f'{shard.name}:{i}', path, os.path.splitext(path)[1][1:].lower(), caption,
                      None if caption is not None else 'no_caption')
        return
    if not os.path.exists(shard.name):
        yield Raw(shard.name, None, '', None, 'shard_missing')
        return
    key, image, ext, caption = None, None, '', None

    def sample():  # the members sharing a key make one sample
        reason = 'no_image' if image is None else 'no_caption' if caption is None else None
        return Raw(f'{shard.name}:{key}', image, ext, caption, reason)
    try:
        with tarfile.open(shard.name, 'r|*') as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, base = os.path.split(member.name)
                stem, _, suffix = base.partition('.')  # webdataset: the key ends at the first dot
                if os.path.join(folder, stem) != key:
                    if image is not None or caption is not None:
                        yield sample()
                    key, image, ext, caption = os.path.join(folder, stem), None, '', None
                suffix = suffix.lower()
                if suffix in IMAGE_EXTS and image is None:
                    image, ext = tar.extractfile(member).read(), suffix
                elif suffix == 'txt' and caption is None:
                    caption = tar.extractfile(member).read()
    except (OSError, EOFError, tarfile.TarError, zlib.error):
        yield Raw(shard.name, None, '', None, 'shard_truncated' if key else 'shard_unreadable')
        return
    if image is not None or caption is not None:
        yield sample()


def _interleave(iterators: list) -> Iterator:
    """Round-robin over several shards so that a batch mixes them."""
    while iterators:
        for it in list(iterators):
            try:
                yield next(it)
            except StopIteration:
                iterators.remove(it)


def _shuffle(items: Iterator, rng: np.random.Generator, size: int) -> Iterator:
    """A shuffle buffer: each item leaves at a random time within the next `size` items."""
    buffer = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = int(rng.integers(size))
        yield buffer[j]
        buffer[j] = item
    rng.shuffle(buffer)
    yield from buffer


# ---------------------------------------------------------------- worker: decode, augment, tokenize

class _Config(NamedTuple):
    tokenizer: Tokenizer
    image_size: int
    max_len: int
    max_pixels: int
    shared: str | None = None  # name of the shared memory that workers write pixels into


_WORKER: dict = {}


def _init_worker(config: _Config):
    _WORKER['config'] = config
    _WORKER['shared'] = shared_memory.SharedMemory(config.shared)


def _slot_NHWC(buffer, slot: int, image_size: int) -> np.ndarray:
    """The uint8 pixels of one chunk's results in the shared memory (N = CHUNK rows)."""
    shape = (CHUNK, image_size, image_size, 3)
    return np.ndarray(shape, np.uint8, buffer, offset=slot * math.prod(shape))


def _process(task: tuple, cfg: _Config) -> tuple:
    """(key, image, caption, reason, aug) -> (key, reason, repaired, pixels_HWC uint8, ids_L, mask_L)."""
    key, image, caption, reason, aug = task
    if reason:
        return key, reason, None, None, None, None
    x0, y0, flip = crop_params(cfg.image_size, aug)
    repaired = None
    try:
        if isinstance(image, tuple):  # synthetic: the caption comes with the image
            _, seed, split, index = image
            pixels_HWC, text = synthetic_example(seed, index, resize_for(cfg.image_size), split)
            flip = False  # captions say 'left' and 'right'
            pixels_HWC = crop_pixels(Image.fromarray(pixels_HWC), cfg.image_size, x0, y0, flip)
        else:
            try:
                text = caption.decode('utf-8')
            except UnicodeDecodeError:  # keep the pair, repaired, and say so
                text, repaired = caption.decode('utf-8', errors='replace'), 'caption_not_utf8'
            if not text.strip():
                raise BadSample('empty_caption')
            if isinstance(image, str):
                try:
                    with open(image, 'rb') as f:
                        image = f.read()
                except OSError:
                    raise BadSample('missing_image')
            img = decode_image(image, resize_for(cfg.image_size), cfg.max_pixels)
            pixels_HWC = crop_pixels(img, cfg.image_size, x0, y0, flip)
    except BadSample as bad:
        return key, bad.args[0], repaired, None, None, None
    ids_BL, mask_BL = cfg.tokenizer.encode([text], cfg.max_len)
    return key, None, repaired, pixels_HWC, ids_BL[0], mask_BL[0]


def _process_chunk(tasks: list, slot: int | None = None, cfg: _Config | None = None) -> list:
    if slot is None:
        return [_process(task, cfg) for task in tasks]
    # In a worker, pixels go back through shared memory: pickled through a pipe, 250 KB per image
    # would cost a sixth of the decoding time on each side.
    cfg, results = _WORKER['config'], []
    pixels_NHWC = _slot_NHWC(_WORKER['shared'].buf, slot, cfg.image_size)
    for j, task in enumerate(tasks):
        key, reason, repaired, pixels_HWC, ids_L, mask_L = _process(task, cfg)
        if pixels_HWC is not None:
            pixels_NHWC[j] = pixels_HWC
        results.append((key, reason, repaired, None, ids_L, mask_L))
    return results


# ---------------------------------------------------------------- streams of (position, task)

def _shard_stream(shards: list[Shard], *, seed: int, train: bool, process_index: int, process_count: int,
                  interleave: int, shuffle_buffer: int, start: tuple) -> Iterator[tuple]:
    """This process's samples as ((epoch, group, index), task); training never ends, evaluation does.

    Training: each epoch deals a permutation of all shards out to the processes (disjoint within an
    epoch), reads them `interleave` at a time through a shuffle buffer, and goes on to the next
    epoch, so that every process can always make another batch and no collective waits on a
    process that ran out. The shuffle restarts per group, so resuming replays at most one group
    of raw reads (no decoding) to rebuild the buffer.
    """
    if len(shards) < process_count:
        raise ValueError(f'data.py: {len(shards)} shards cannot be split over {process_count} processes')
    epoch, group, offset = start
    while True:
        if train:
            order = np.random.default_rng([seed, epoch]).permutation(len(shards))
            mine = [shards[i] for i in order[process_index::process_count]]
            groups = [mine[i:i + interleave] for i in range(0, len(mine), interleave)]
        else:
            groups = [[s] for s in shards[process_index::process_count]]
        samples = 0
        for g in range(group, len(groups)):
            raws = _interleave([read_shard(s) for s in groups[g]])
            if train:
                raws = _shuffle(raws, np.random.default_rng([seed, epoch, g]), shuffle_buffer)
            for i, raw in enumerate(raws):
                samples += not (raw.reason or '').startswith('shard_')
                if i >= offset:
                    aug = (seed, epoch, g, i) if train else None
                    yield (epoch, g, i), (raw.key, raw.image, raw.caption, raw.reason, aug)
            offset = 0
        if not train:
            return
        if samples == 0 and group == 0:
            names = ', '.join(s.name for s in mine[:5])
            raise RuntimeError(f'data.py: no readable sample in epoch {epoch} of process {process_index} ({names}, ...)')
        epoch, group = epoch + 1, 0


def _synthetic_stream(*, seed: int, size: int | None, train: bool, global_batch: int, process_index: int,
                      batch: int, start: tuple) -> Iterator[tuple]:
    """Global sample g = step * global_batch + row; process p takes rows [p*B, (p+1)*B) of each step,
    so the global batch depends on the seed and the step only, not on the number of processes."""
    _, step, row = start
    for step in itertools.count(step):
        for r in range(row, batch):
            g = step * global_batch + process_index * batch + r
            if not train and g >= size:
                return
            index, epoch = (g % size, g // size) if size else (g, 0)
            aug = (seed, epoch, index) if train else None
            yield (0, step, r), (f'synthetic:{index}', ('synthetic', seed, 0 if train else 1, index), None, None, aug)
        row = 0


# ---------------------------------------------------------------- loader

class Loader:
    """Iterator over batches {'pixels': float32 [B,H,W,3], 'ids': int32 [B,L], 'mask': int32 [B,L]}.

    Evaluation batches also carry 'valid': bool [B] (False on padding rows) and 'keys': list[str].
    `state()` is a small JSON-serialisable dict; `make_loader(..., state=s)` continues exactly there.
    `stats` counts samples and skipped or repaired inputs by reason; `examples` names the first keys.
    """

    def __init__(self, stream, cfg, *, batch, train, workers, num_batches, max_bad_fraction, fingerprint, state):
        self._pool = None
        self._stream, self._cfg, self._batch, self._train = stream, cfg, batch, train
        self._workers, self._num_batches, self._max_bad = workers, num_batches, max_bad_fraction
        self._fingerprint = fingerprint
        state = state or {'position': [0, 0, 0], 'batches': 0, 'stats': {}, 'examples': {}}
        self._position, self._batches = list(state['position']), state['batches']
        self.stats = collections.Counter(state['stats'])
        self.examples = {k: list(v) for k, v in state['examples'].items()}
        self._bad_shards = collections.Counter()
        self._pending = collections.deque()   # (positions, shared-memory slot, future or results), oldest first
        self._ready = collections.deque()     # (position, result) of the oldest finished chunk
        self._inflight = max(2 * workers, math.ceil(2 * batch / CHUNK)) if workers else 1
        self._done = False

    def state(self) -> dict:
        return {'position': list(self._position), 'batches': self._batches, 'stats': dict(self.stats),
                'examples': {k: list(v) for k, v in self.examples.items()}, 'config': self._fingerprint}

    def __iter__(self):
        return self

    def _fill(self):
        while not self._done and len(self._pending) < self._inflight:
            chunk = list(itertools.islice(self._stream, CHUNK))
            if not chunk:
                self._done = True
                break
            positions, tasks = [p for p, _ in chunk], [t for _, t in chunk]
            if not self._workers:
                self._pending.append((positions, None, _process_chunk(tasks, cfg=self._cfg)))
                continue
            if self._pool is None:
                size = self._inflight * CHUNK * self._cfg.image_size ** 2 * 3
                self._shared = shared_memory.SharedMemory(create=True, size=size)
                self._free_slots = list(range(self._inflight))
                # Never fork: the parent may already run jax's threads, which a fork would copy mid-flight.
                self._pool = concurrent.futures.ProcessPoolExecutor(
                    self._workers, multiprocessing.get_context('spawn'), _init_worker,
                    (self._cfg._replace(shared=self._shared.name),))
            slot = self._free_slots.pop()
            self._pending.append((positions, slot, self._pool.submit(_process_chunk, tasks, slot)))

    def _next_result(self):
        if not self._ready:
            self._fill()
            if not self._pending:
                return None
            positions, slot, results = self._pending.popleft()
            if slot is not None:
                results = results.result()
                pixels_NHWC = _slot_NHWC(self._shared.buf, slot, self._cfg.image_size)
                results = [r[:3] + (None if r[1] else pixels_NHWC[j].copy(),) + r[4:] for j, r in enumerate(results)]
                del pixels_NHWC  # a live view would keep the shared memory from closing
                self._free_slots.append(slot)
            self._ready.extend(zip(positions, results))
            self._fill()  # keep the workers busy while this process assembles the batch
        return self._ready.popleft()

    def _count(self, key: str, reason: str | None, repaired: str | None):
        shard_level = reason is not None and reason.startswith('shard_')
        if not shard_level:
            self.stats['samples'] += 1
        for r in (reason, repaired):
            if r:
                self.stats[r] += 1
                if len(self.examples.setdefault(r, [])) < 5:
                    self.examples[r].append(key)
        if reason and not shard_level:
            self.stats['bad'] += 1
            self._bad_shards[key.rsplit(':', 1)[0]] += 1
        seen, bad = self.stats['samples'], self.stats['bad']
        if seen >= 100 and bad > self._max_bad * seen:
            reasons = ', '.join(f'{r} {n}' for r, n in sorted(self.stats.items()) if r not in ('samples', 'bad'))
            worst = ', '.join(f'{s} ({n})' for s, n in self._bad_shards.most_common(5))
            raise RuntimeError(f'data.py: {bad} of {seen} samples failed (> max_bad_fraction={self._max_bad}): '
                               f'{reasons}; worst shards: {worst}')

    def __next__(self) -> dict:
        rows = []
        while len(rows) < self._batch:
            item = self._next_result()
            if item is None:
                break
            position, (key, reason, repaired, pixels_HWC, ids_L, mask_L) = item
            self._position = [position[0], position[1], position[2] + 1]
            self._count(key, reason, repaired)
            if reason is None:
                rows.append((key, pixels_HWC, ids_L, mask_L))
        if self._num_batches is not None and self._batches >= self._num_batches:
            if rows:
                raise ValueError(f'data.py: this process has more than num_batches={self._num_batches} batches')
            raise StopIteration
        if not rows and self._num_batches is None:
            self.close()
            raise StopIteration
        self._batches += 1
        return self._collate(rows)

    def _collate(self, rows: list) -> dict:
        n, pad = len(rows), self._batch - len(rows)
        pixels_BHWC = np.empty((self._batch, self._cfg.image_size, self._cfg.image_size, 3), np.float32)
        for row_HWC, (_, pixels_HWC, _, _) in zip(pixels_BHWC, rows):
            row_HWC[...] = pixels_HWC  # uint8 travels from the workers: a quarter of the bytes of float32
        pixels_BHWC[:n] *= np.float32(1 / 127.5)
        pixels_BHWC[:n] -= np.float32(1)  # [-1, 1], the range the public ALIGN checkpoints expect
        pixels_BHWC[n:] = 0
        # Padding rows hold '[CLS] [SEP]' so that no attention row is fully masked.
        ids_BL = np.array([r[2] for r in rows] + [[self._cfg.tokenizer.cls_id, self._cfg.tokenizer.sep_id]
                          + [self._cfg.tokenizer.pad_id] * (self._cfg.max_len - 2)] * pad, np.int32)
        mask_BL = np.array([r[3] for r in rows] + [[1, 1] + [0] * (self._cfg.max_len - 2)] * pad, np.int32)
        batch = {'pixels': pixels_BHWC, 'ids': ids_BL, 'mask': mask_BL}
        if not self._train:
            batch['valid'] = np.arange(self._batch) < n
            batch['keys'] = [r[0] for r in rows] + [''] * pad
        return batch

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            self._shared.close()
            self._shared.unlink()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()


def make_loader(data: str, *, tokenizer: Tokenizer, global_batch: int, image_size: int = CROP, train: bool = True,
                seed: int = 0, process_index: int = 0, process_count: int = 1, max_len: int = 64, workers: int = 0,
                shuffle_buffer: int = 1000, interleave: int = 4, rows_per_shard: int = 1000,
                num_batches: int | None = None, max_bad_fraction: float = 0.05, max_pixels: int = MAX_PIXELS,
                state: dict | None = None) -> Loader:
    """Batches of this process's share (global_batch / process_count rows) of `data`.

    train=True: an endless stream (random crop + flip, shuffled, deterministic in seed).
    train=False: one ordered pass, central crop, the last batch padded ('valid' marks real rows);
    for evaluation on several processes pass the same num_batches to all (padding batches follow).
    """
    if global_batch % process_count:
        raise ValueError(f'data.py: global_batch {global_batch} is not divisible by {process_count} processes')
    batch = global_batch // process_count
    fingerprint = {'data': data, 'seed': seed, 'train': train, 'global_batch': global_batch,
                   'process_index': process_index, 'process_count': process_count,
                   'shuffle_buffer': shuffle_buffer, 'interleave': interleave, 'rows_per_shard': rows_per_shard}
    if state is not None and state['config'] != fingerprint:
        raise ValueError(f'data.py: the saved data state was made for {state["config"]}, not {fingerprint}')
    start = tuple(state['position']) if state else (0, 0, 0)
    cfg = _Config(tokenizer, image_size, max_len, max_pixels)
    if data == 'synthetic' or data.startswith('synthetic:'):
        size = int(data.partition(':')[2]) if ':' in data else None if train else SYNTHETIC_EVAL_SIZE
        stream = _synthetic_stream(seed=seed, size=size, train=train, global_batch=global_batch,
                                   process_index=process_index, batch=batch, start=start)
        if not train and num_batches is None:
            num_batches = math.ceil(size / global_batch)  # equal on every process
    else:
        stream = _shard_stream(source_shards(data, rows_per_shard, process_count), seed=seed, train=train, process_index=process_index,
                               process_count=process_count, interleave=interleave,
                               shuffle_buffer=shuffle_buffer, start=start)
    return Loader(stream, cfg, batch=batch, train=train, workers=workers, num_batches=num_batches,
                  max_bad_fraction=max_bad_fraction, fingerprint=fingerprint, state=state)


def read_samples(data: str, limit: int | None = None, images: bool = True) -> Iterator[Raw]:
    """Every raw sample of a source once, in order (for `vocab` and `filter`); images as bytes."""
    if data == 'synthetic' or data.startswith('synthetic:'):
        size = int(data.partition(':')[2]) if ':' in data else limit or 10_000
        for i in range(min(size, limit or size)):
            caption = _synthetic_scene(np.random.default_rng([0, 0, i]))[1]
            yield Raw(f'synthetic:{i}', ('synthetic', 0, 0, i), '', caption.encode())
        return
    raws = itertools.chain.from_iterable(read_shard(s) for s in source_shards(data))
    for raw in itertools.islice(raws, limit):
        if images and isinstance(raw.image, str) and not raw.reason:
            try:
                with open(raw.image, 'rb') as f:
                    raw = raw._replace(image=f.read())
            except OSError:
                raw = raw._replace(image=None, reason='missing_image')
        yield raw


# ---------------------------------------------------------------- Sec. 3 filters

FILTER_RULES = ('unreadable', 'image_too_small', 'image_aspect_ratio', 'image_many_texts',
                'text_many_images', 'text_length', 'text_rare_token')


def unigrams(text: str) -> list[str]:
    """The words of an alt-text for the Sec. 3 filters: lower-cased runs of letters and digits."""
    return re.findall(r'\w+', text.lower())


def _hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), 'little')


def _add_member(tar: tarfile.TarFile, name: str, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)  # mtime stays 0: the same input gives byte-identical shards
    tar.addfile(info, io.BytesIO(data))


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
        raise ValueError('data.py: synthetic data is clean by construction; filter tar shards or a TSV')
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


# ---------------------------------------------------------------- benchmark

def _photo_like_jpeg(rng: np.random.Generator, size=(500, 375)) -> bytes:
    """A JPEG with a photo's statistics (smooth regions, edges, sensor noise), like a web image."""
    img = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(8):
        x, y = rng.integers(0, size[0]), rng.integers(0, size[1])
        draw.ellipse((x, y, x + rng.integers(20, 120), y + rng.integers(20, 120)), fill=tuple(rng.integers(0, 256, 3)))
    pixels = np.asarray(img, np.int16) + rng.integers(-12, 13, (size[1], size[0], 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, 'JPEG', quality=90)
    return out.getvalue()


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of processes, from /proc (Linux): per-core rates that other load cannot skew."""
    total = 0.0
    for pid in pids:
        with open(f'/proc/{pid}/stat') as f:
            fields = f.read().rsplit(')', 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')
    return total


def pipeline_throughput(workers=(0, 1, 2), batches=32, image_size=CROP, batch=64, shards=1, distinct=64):
    """Images/s of the training pipeline (tar read, decode, resize, random crop, flip, tokenize).

    Writes temporary webdataset shards of `distinct` photo-like 500x375 JPEGs (repeated to fill
    `batches` + 4 batches over `shards` shards), then for each worker count times `batches` batches after
    the first. Returns ({'jpeg_kb', 'cores', 'load'}, one row per worker count with images/s in wall-clock
    time and per CPU-second of every process involved). `python data.py bench` and `bench.py data`.
    """
    rng = np.random.default_rng(0)
    jpegs = [_photo_like_jpeg(rng) for _ in range(distinct)]
    tokenizer = Tokenizer(synthetic_vocab())
    per_shard = -(-max(distinct, (batches + 4) * batch) // shards)
    info = {'jpeg_kb': float(np.mean([len(j) for j in jpegs])) / 1e3, 'cores': os.cpu_count(),
            'load': os.getloadavg()[0]}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for s in range(shards):
            with tarfile.open(os.path.join(tmp, f'{s:05d}.tar'), 'w') as tar:
                for i in range(per_shard):
                    _add_member(tar, f'{s:05d}{i:06d}.jpg', jpegs[(s * per_shard + i) % distinct])
                    _add_member(tar, f'{s:05d}{i:06d}.txt', b'a photo of a large red circle on the left')
        pattern = os.path.join(tmp, f'{{00000..{shards - 1:05d}}}.tar')
        for w in workers:
            with make_loader(pattern, tokenizer=tokenizer, global_batch=batch, image_size=image_size, workers=w) as loader:
                next(loader)  # starts the workers
                pids = [os.getpid()] + list(loader._pool._processes if loader._pool else [])
                start, cpu = time.perf_counter(), _cpu_seconds(pids)
                for _ in range(batches):
                    next(loader)
                wall, cpu = time.perf_counter() - start, _cpu_seconds(pids) - cpu
            n = batches * batch
            rows.append({'workers': w, 'images': n, 'images_per_s_total': n / wall, 'images_per_s_per_core': n / cpu,
                         'cores_busy': cpu / wall})
    return info, rows


def bench(workers: tuple = (0, 1, 2), images: int = 2048, image_size: int = CROP, batch: int = 64):
    """Prints `pipeline_throughput` on one shard of 64 distinct JPEGs, `images` images per worker count."""
    info, rows = pipeline_throughput(workers, images // batch, image_size, batch)
    print(f'{info["cores"]} CPU cores, load {info["load"]:.1f}; 500x375 JPEGs ({info["jpeg_kb"]:.0f} KB) -> '
          f'{resize_for(image_size)}x{resize_for(image_size)} -> random {image_size}x{image_size} crop + flip')
    for r in rows:
        w = r['workers']
        what = 'in the main process' if w == 0 else f'{w} worker process{"es" * (w > 1)}'
        print(f'{what:24s} {r["images_per_s_total"]:6.0f} images/s total (wall clock) {r["images_per_s_per_core"]:6.0f} '
              f'images/s per core (CPU time of all processes: {r["cores_busy"]:.1f} cores busy)')


# ---------------------------------------------------------------- command line

def main(argv=None):
    parser = argparse.ArgumentParser(description='ALIGN data tools: vocabulary, Sec. 3 filters, benchmark.')
    sub = parser.add_subparsers(dest='command', required=True)
    p = sub.add_parser('vocab', help='learn a WordPiece vocab.txt from the captions (Sec. 4.1)')
    p.add_argument('--data', default='synthetic')
    p.add_argument('--size', type=int, default=100_000, help='100k English, 250k multilingual (Sec. 4.1, 8)')
    p.add_argument('--out', required=True)
    p.add_argument('--limit', type=int, help='read at most this many samples')
    p.add_argument('--max-words', type=int, default=2_000_000, help='bound on the word counter')
    p.add_argument('--limit-alphabet', type=int, default=1000)
    p = sub.add_parser('filter', help='apply the Sec. 3 filters and write tar shards + report.json')
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
    p = sub.add_parser('bench', help='images/s of the training pipeline on realistic JPEGs')
    p.add_argument('--workers', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--images', type=int, default=2048)
    p.add_argument('--image-size', type=int, default=CROP)
    p = sub.add_parser('synthetic', help='write synthetic pairs as PNG files and a pairs.tsv, to look at or search')
    p.add_argument('--out', required=True)
    p.add_argument('--count', type=int, default=200)
    p.add_argument('--split', choices=('train', 'eval'), default='eval', help='eval: the held-out pairs')
    p.add_argument('--size', type=int, default=RESIZE, help='side of the written images')
    args = parser.parse_args(argv)
    if args.command == 'vocab':
        captions = (r.caption.decode('utf-8', 'replace') for r in read_samples(args.data, args.limit, images=False)
                    if r.caption is not None)
        counts = count_words(captions, args.max_words)
        tokens = learn_wordpiece(counts, args.size, args.limit_alphabet)
        write_vocab(tokens, args.out)
        print(f'{len(tokens)} tokens from {len(counts)} distinct words -> {args.out}')
    elif args.command == 'filter':
        report = filter_pairs(args.data, args.out, min_side=args.min_side, max_aspect=args.max_aspect,
                              max_texts_per_image=args.max_texts_per_image,
                              max_images_per_text=args.max_images_per_text, min_words=args.min_words,
                              max_words=args.max_words, top_ngrams=args.top_ngrams, table_size=args.table_size,
                              shard_size=args.shard_size, limit=args.limit)
        print_report(report)
    elif args.command == 'synthetic':
        write_synthetic(args.out, args.count, split=1 if args.split == 'eval' else 0, size=args.size)
        print(f'{args.count} {args.split} pairs -> {args.out}/*.png and {args.out}/pairs.tsv')
    else:
        bench(tuple(args.workers), args.images, args.image_size)


if __name__ == '__main__':
    main()
