"""Synthetic image-text pairs: shapes drawn on the fly, with captions that describe them (the default data).

Not in the paper: ALIGN (Jia et al., ICML 2021) trains on 1.8B noisy alt-text pairs from the web. These stand
in for them so that a model trains, and can be checked, on a CPU with nothing to download: 1-2 groups of 1-3
circles, squares or triangles in 8 colours, 2 sizes and 5 places, captioned in varied words, a tenth of the
captions noisy like web alt-text (Fig. 2). A `noise` knob sets that share for training (ALBEF's momentum
distillation is for noisy pairs): noise above a tenth is captions of other scenes, pairs that do not match.
data.py reads them as the `synthetic` and `synthetic:N` sources.
Top to bottom:
  _synthetic_scene, synthetic_example  one pair, deterministic in (seed, split, index); split 1 is held out
  SYN_ATTRIBUTES, attribute_probes     zero-shot probes of each attribute on the held-out scenes
  write_synthetic                      pairs written as PNG files and a pairs.tsv
  synthetic_vocab                      a vocab.txt that covers every caption

Command line (the held-out pairs by default, to look at, search with evaluate.py, or read back as a TSV):
  python synthetic.py --out DIR --count N [--split eval|train] [--size S]

Deviations from the paper: the data itself (above). Captions keep to the 3-20 unigrams that the Sec. 3
filters keep.
"""
import argparse
import hashlib
import os
import tempfile

import numpy as np
from PIL import Image, ImageDraw

import wordpiece

RESIZE = 346  # data.RESIZE, the resize side of Sec. 5: written again here because data.py imports this file
SYNTHETIC_EVAL_SIZE = 1000  # held-out pairs in `synthetic` evaluation and in attribute_probes

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
# The share of noisy captions: the default, and always that of the held-out split (data.py passes other values
# to the training split only), so that one evaluation scores models trained at any noise.
NOISE = 0.1


def _synthetic_scene(rng: np.random.Generator, noise: float = NOISE) -> tuple[list, str]:
    """Draws 1-2 groups of 1-3 identical shapes and a caption naming counts, sizes, colours, places.

    A share `noise` of the captions are noisy: up to NOISE of them web-like alt-text, unrelated or loosely
    related to the scene (as every noisy caption was before the knob existed, so the default changes nothing);
    the share above NOISE the plain caption of another scene. The scene, and so the image, do not depend on
    `noise`, and a caption noisy at some noise is noisy at every higher one.
    """
    if not 0 <= noise <= 1:
        raise ValueError(f'synthetic: noise={noise} is not a share between 0 and 1')
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
    u = rng.random()
    if u < NOISE:  # drawn whatever the noise, so that the draws after it (the image's) never depend on it
        n, m = int(rng.integers(10, 9999)), int(rng.integers(10, 99))
        noisy = SYN_NOISE if rng.random() < 0.5 else SYN_NOISY_RELEVANT
        alt_text = noisy[rng.integers(len(noisy))].format(n=n, m=m, c=groups[0][2], s=groups[0][3])
    if u < min(noise, NOISE):  # like web alt-text (ALIGN Fig. 2): unrelated, or only loosely related
        caption = alt_text
    elif u < noise:  # a caption that describes another image: a mismatched pair
        # A child stream: deterministic in this one, and drawing from it leaves this one (the image) as it is.
        other_rng = rng.spawn(1)[0]
        other_groups = groups
        while other_groups == groups:  # rare, but then the caption would describe this image after all
            other_groups, caption = _synthetic_scene(other_rng, noise=0.0)
    return groups, caption


def synthetic_example(seed: int, index: int, resize: int, split: int = 0,
                      noise: float = NOISE) -> tuple[np.ndarray, str]:
    """Sample `index` of the synthetic set: (pixels_HWC uint8 of side `resize`, caption).

    Deterministic in (seed, split, index, noise); split 0 is training, 1 is evaluation (never trained on).
    noise: the share of noisy captions (`_synthetic_scene`); the pixels are the same at every noise.
    """
    rng = np.random.default_rng([seed, split, index])
    groups, caption = _synthetic_scene(rng, noise)
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
             for phrase in table for w in wordpiece.basic_tokenize(phrase.replace('{', ' ').replace('}', ' '))}
    words |= {s + 's' for s in SYN_SHAPES} | {w for _, ws in SYN_SIZES.values() for w in ws}
    words |= {w for ps in SYN_WHERE.values() for p in ps for w in p.split()}
    words |= {'a', 'one', 'two', 'three', 'and', 'grey', 'background'}
    chars = [chr(c) for c in range(33, 127) if not chr(c).isupper()]
    tokens = list(wordpiece.SPECIAL_TOKENS) + sorted(words - set(chars)) + chars + ['##' + c for c in chars if c.isalnum()]
    digest = hashlib.sha1('\n'.join(tokens).encode()).hexdigest()[:10]
    path = path or os.path.join(tempfile.gettempdir(), f'align_synthetic_vocab_{digest}.txt')
    if not os.path.exists(path) or open(path, encoding='utf-8').read() != ''.join(t + '\n' for t in tokens):
        wordpiece.write_vocab(tokens, path)
    return path


# ---------------------------------------------------------------- command line

def main(argv=None):
    parser = argparse.ArgumentParser(description='write synthetic pairs as PNG files and a pairs.tsv, to look at or search')
    parser.add_argument('--out', required=True)
    parser.add_argument('--count', type=int, default=200)
    parser.add_argument('--split', choices=('train', 'eval'), default='eval', help='eval: the held-out pairs')
    parser.add_argument('--size', type=int, default=RESIZE, help='side of the written images')
    args = parser.parse_args(argv)
    write_synthetic(args.out, args.count, split=1 if args.split == 'eval' else 0, size=args.size)
    print(f'{args.count} {args.split} pairs -> {args.out}/*.png and {args.out}/pairs.tsv')


if __name__ == '__main__':
    main()
