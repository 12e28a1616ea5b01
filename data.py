"""ALIGN input pipeline: image-text pairs -> batches of pixels and WordPiece ids.

The data side of ALIGN (Jia et al., ICML 2021) between a source and the model, top to bottom:
  decode_image, crop_pixels    resize to 346, random 289 crop + flip / central crop (Sec. 5)
  list_shards, read_shard      tar shards (webdataset layout) and TSV/CSV files, read as streams
  make_loader, Loader          worker processes, shuffling, multi-host split, exact resume, bad-input counts
  read_samples                 every raw sample of a source once (`wordpiece.py vocab`, filters.py)
  _add_member                  one member of a tar shard being written (filters.py, bench.py)
Beside it: wordpiece.py (the tokenizer and vocabulary, Sec. 4.1), synthetic.py (the default data),
filters.py (Sec. 3), `bench.py data` (throughput).

Sources (`data` / `--data`):
  synthetic, synthetic:N        generated pairs (N: a finite set; evaluation uses N=1000 by default)
  dir/{00000..00127}.tar        tar shards: brace range, glob (dir/*.tar), or a text file listing shards
  pairs.tsv, pairs.csv          image path <tab|comma> caption; relative paths are relative to the file
  dataset_coco.json + images    a Karpathy-split JSON: every caption of its train and restval images, each a
                                pair (Sec. 5.1's fine-tuning sets; `images` is the folder of its images)

Command line: none of its own. `python data.py vocab|filter|synthetic|bench ...` are old names, kept as
aliases of `python wordpiece.py vocab`, `python filters.py`, `python synthetic.py` and `python bench.py data`.

Bad input is skipped and counted by reason (`Loader.stats`), never fatal one sample at a time: only when
more than `max_bad_fraction` (0.5) of the last `bad_window` (1000) samples failed does the loader raise
TooManyBadSamples, after which `state()` is that of the last batch returned. A worker process that dies
is replaced and the samples it held are counted as 'worker_died'; the batches after it differ from an
uninterrupted run's by those samples, a resume from a checkpoint written after it continues exactly, and
one from before it reads them again (`Loader`). Workers exit when the process that started them dies,
however it dies (workers.py).

Dimension key: B batch rows on this process, L text length (max_len), H = W image size, C = 3 channels,
N rows of one chunk of work sent to a worker process.

Deviations from the paper:
- Resize + crop is one bilinear resample of the matching source box (equal to resizing to 346 then
  cropping 289, up to rounding), and the resize squashes the aspect ratio, as the paper's 346x346 says.
- Synthetic images are never flipped: their captions say "left" and "right".
"""
import collections
import csv
import glob
import io
import itertools
import json
import math
import os
import re
import sys
import tarfile
import warnings
import zlib
from multiprocessing import shared_memory
from typing import Iterator, NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

import synthetic
import wordpiece
import workers

RESIZE, CROP = 346, 289          # ALIGN Sec. 5: resize to 346x346, crop 289x289
MAX_PIXELS = 89_478_485          # PIL's own decompression-bomb limit (1024**3 // 4 // 3 pixels)
IMAGE_EXTS = ('jpg', 'jpeg', 'png', 'webp')


def resize_for(image_size: int) -> int:
    """The resize side that goes with a crop side: 346 for 289 (ALIGN Sec. 5), scaled together."""
    return round(image_size * RESIZE / CROP)


def model_pixels(pixels_uint8):
    """uint8 RGB -> float32 in [-1, 1], the range the public ALIGN checkpoints expect: x / 127.5 - 1.

    For a numpy or a jax array alike, with the same bits on the host and on any device: 2x - 255 is an
    integer, exact in float32, so the one multiplication is the only rounding (a device's fused
    multiply-add, or its rewriting of a division as a multiplication, cannot change it). Within
    7.5e-8 of the exact value. The training step normalises on the device (step.py), so that pixels
    travel there as uint8, a quarter of float32's bytes."""
    return (pixels_uint8.astype(np.float32) * np.float32(2) - np.float32(255)) * np.float32(1 / 255)


# ---------------------------------------------------------------- image preprocessing (Sec. 5)

CHUNK = 16  # samples per task sent to a worker: large enough to amortise the hand-off


class BadSample(Exception):
    """A sample to skip; args[0] is the reason it is counted under."""


class TooManyBadSamples(RuntimeError):
    """Systematic failure, not a few bad samples: more than `max_bad_fraction` of the last `bad_window`
    samples failed, or a whole training epoch held no readable sample. One line; the attributes say
    which reasons and shards (`worst`: [(shard, failures), ...], worst first) for a caller's own message."""

    def __init__(self, message: str, failed: int = 0, window: int = 0, reasons: dict | None = None,
                 worst: list | None = None):
        super().__init__(message)
        self.failed, self.window, self.reasons, self.worst = failed, window, reasons or {}, worst or []


REPAIRED = ('caption_not_utf8',)  # reasons of inputs kept after a repair; every other reason is a skip


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
    image: bytes | str | tuple | None  # bytes, a file path, or ('synthetic', seed, split, index, noise)
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


def _row_blocks(path: str, rows: tuple, rows_per_shard: int, min_shards: int) -> list[Shard]:
    """Rows (image path, caption bytes) as shards of up to rows_per_shard, at least min_shards of them when
    there are that many rows, so that every process gets one."""
    rows_per_shard = max(1, min(rows_per_shard, math.ceil(len(rows) / min_shards)))
    return [Shard(f'{path}[{i}:{i + len(rows[i:i + rows_per_shard])}]', rows[i:i + rows_per_shard])
            for i in range(0, len(rows), rows_per_shard)]


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
    return _row_blocks(path, rows, rows_per_shard, min_shards)


KARPATHY_TRAIN_SPLITS = ('train', 'restval')  # Sec. 5.1: MSCOCO's 82K train + 30K restval; Flickr30K's 29K train


def karpathy_image_path(images_dir: str | None, image: dict) -> str:
    """Where a Karpathy JSON's image is: images_dir/filepath/filename if that exists, else images_dir/filename."""
    nested = os.path.join(images_dir or '', image.get('filepath', ''), image['filename'])
    return nested if os.path.exists(nested) else os.path.join(images_dir or '', image['filename'])


def read_karpathy_pairs(path: str, images_dir: str | None, rows_per_shard: int, min_shards: int = 1) -> list[Shard]:
    """A Karpathy-split JSON's training pairs as blocks of rows, like a TSV's: each caption of each image of
    KARPATHY_TRAIN_SPLITS with its image (5 or so per image, as Sec. 5.1 fine-tunes on them)."""
    try:
        with open(path, encoding='utf-8') as f:
            images = [im for im in json.load(f)['images'] if im.get('split') in KARPATHY_TRAIN_SPLITS]
        rows = tuple((karpathy_image_path(images_dir, im), s['raw'].encode()) for im in images for s in im['sentences'])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f'data.py: {path} is not a readable Karpathy-split JSON ({type(e).__name__}: {e}); '
                         'expected {"images": [{"filename", "split", "sentences": [{"raw"}]}]}')
    if not rows:
        raise ValueError(f'data.py: {path} has no caption in the splits {KARPATHY_TRAIN_SPLITS}')
    return _row_blocks(path, rows, rows_per_shard, min_shards)


def source_shards(data: str, rows_per_shard: int = 1000, min_shards: int = 1, images: str | None = None) -> list[Shard]:
    """The shards of a `--data` source that is not synthetic (`images`: a Karpathy JSON's image folder)."""
    if re.search(r'\.(tsv|csv)$', data):
        return read_table(data, rows_per_shard, min_shards)
    if data.endswith('.json'):
        return read_karpathy_pairs(data, images, rows_per_shard, min_shards)
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
    if os.path.getsize(shard.name) == 0:
        yield Raw(shard.name, None, '', None, 'shard_empty')
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
    tokenizer: wordpiece.Tokenizer
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
            _, seed, split, index, noise = image
            pixels_HWC, text = synthetic.synthetic_example(seed, index, resize_for(cfg.image_size), split, noise)
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
            raise TooManyBadSamples(f'data.py: no readable sample in epoch {epoch} of process {process_index} '
                                    f'({names}, ...)', worst=[(s.name, 0) for s in mine[:5]])
        epoch, group = epoch + 1, 0


def _synthetic_options(data: str) -> tuple[int | None, float]:
    """(N, noise) of 'synthetic', 'synthetic:N', 'synthetic:noise=0.4' or 'synthetic:N,noise=0.4'."""
    size, noise = None, synthetic.NOISE
    for option in filter(None, data.partition(':')[2].split(',')):
        if option.startswith('noise='):
            noise = float(option.removeprefix('noise='))
        else:
            size = int(option)
    return size, noise


def _synthetic_stream(*, seed: int, size: int | None, noise: float, train: bool, global_batch: int,
                      process_index: int, batch: int, start: tuple) -> Iterator[tuple]:
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
            yield (0, step, r), (f'synthetic:{index}', ('synthetic', seed, 0 if train else 1, index, noise), None, None, aug)
        row = 0


# ---------------------------------------------------------------- loader

class _Chunk(NamedTuple):
    positions: list
    keys: list            # to count the samples of a chunk lost with its worker
    slot: int | None      # its rows of the shared memory
    worker: object        # the workers.Worker holding it, or the results when there are no workers


class Loader:
    """Iterator over batches {'pixels': float32 [B,H,W,3], 'ids': int32 [B,L], 'mask': int32 [B,L]}
    (with `uint8`: the pixels as read, uint8, for a step that normalises them itself, `model_pixels`).

    Evaluation batches also carry 'valid': bool [B] (False on padding rows) and 'keys': list[str].
    `state()` is a small JSON-serialisable dict; `make_loader(..., state=s)` continues exactly there.
    `stats` counts samples and skipped or repaired inputs by reason; `examples` names the first keys.

    Bad samples are skipped and counted, never fatal one by one: only when more than `max_bad_fraction`
    of the last `bad_window` samples failed does `next` raise TooManyBadSamples, and then `state()` is
    that of the last batch returned (a checkpoint written then resumes there; this loader cannot go on).

    A worker process that dies is replaced; the chunks it held (CHUNK samples each: the one it was
    decoding and any queued to it) are skipped and counted as 'worker_died', and the batches fill up
    from the samples after them. So the batches that follow differ from an uninterrupted run's by those
    samples: a run resumed from a checkpoint written after the loss continues exactly as it would have,
    one resumed from an earlier checkpoint reads the lost samples again (as if no worker had died).
    """

    def __init__(self, stream, cfg, *, batch, train, workers, num_batches, max_bad_fraction, bad_window,
                 fingerprint, state, uint8=False):
        self._pool = None
        self._stream, self._cfg, self._batch, self._train, self._uint8 = stream, cfg, batch, train, uint8
        self._workers, self._num_batches = workers, num_batches
        # The last bad_window samples, None or (shard, reason): stopping is for failure that persists.
        self._max_bad, self._window, self._window_failed = max_bad_fraction, collections.deque(maxlen=bad_window), 0
        self._fingerprint = fingerprint
        state = state or {'position': [0, 0, 0], 'batches': 0, 'stats': {}, 'examples': {}}
        self._position, self._batches = list(state['position']), state['batches']
        self.stats = collections.Counter(state['stats'])
        self.examples = {k: list(v) for k, v in state['examples'].items()}
        self._pending = collections.deque()   # _Chunk, oldest first
        self._ready = collections.deque()     # (position, result) of the oldest finished chunk
        self._inflight = max(2 * workers, math.ceil(2 * batch / CHUNK)) if workers else 1
        self._done = False

    def state(self) -> dict:
        return {'position': list(self._position), 'batches': self._batches, 'stats': dict(self.stats),
                'examples': {k: list(v) for k, v in self.examples.items()}, 'config': self._fingerprint}

    def counts(self, stats: dict | None = None) -> dict:
        """Per-reason counts for a log row: {'skipped_not_image': 3, 'repaired_caption_not_utf8': 1, ...};
        of a `state()`'s stats if given (train.py logs a step while the next batch is already read)."""
        stats = self.stats if stats is None else stats
        return {f'{"repaired" if r in REPAIRED else "skipped"}_{r}': n for r, n in sorted(stats.items())
                if r not in ('samples', 'bad')}

    def summary(self) -> str:
        """One line: samples read, skipped and repaired by reason, and shards skipped or cut short."""
        def listed(reasons):
            return ', '.join(f'{r} {self.stats[r]:,}' for r in sorted(reasons))
        reasons = [r for r in self.stats if r not in ('samples', 'bad')]
        skipped = [r for r in reasons if r not in REPAIRED and not r.startswith('shard_')]
        repaired = [r for r in reasons if r in REPAIRED]
        shards = [r for r in reasons if r.startswith('shard_')]
        line = f'data: {self.stats["samples"]:,} samples read, {self.stats["bad"]:,} skipped'
        line += f' ({listed(skipped)})' if skipped else ''
        line += f', {sum(self.stats[r] for r in repaired):,} repaired ({listed(repaired)})' if repaired else ''
        line += f'; shards: {listed(shards)}' if shards else ''
        return line

    def __iter__(self):
        return self

    def _fill(self):
        while not self._done and len(self._pending) < self._inflight:
            chunk = list(itertools.islice(self._stream, CHUNK))
            if not chunk:
                self._done = True
                break
            positions, tasks = [p for p, _ in chunk], [t for _, t in chunk]
            keys = [t[0] for t in tasks]
            if not self._workers:
                self._pending.append(_Chunk(positions, keys, None, _process_chunk(tasks, cfg=self._cfg)))
                continue
            if self._pool is None:
                size = self._inflight * CHUNK * self._cfg.image_size ** 2 * 3
                self._shared = shared_memory.SharedMemory(create=True, size=size)
                self._free_slots = list(range(self._inflight))
                self._pool = workers.Pool(self._workers, _init_worker, _process_chunk,
                                          self._cfg._replace(shared=self._shared.name))
            held = collections.Counter(id(c.worker) for c in self._pending)
            i = min(range(self._workers), key=lambda i: held[id(self._pool.workers[i])])  # the least busy
            if not self._pool.alive(i):
                self._pool.replace(self._pool.workers[i])
            worker, slot = self._pool.workers[i], self._free_slots.pop()
            try:
                worker.tasks.send((slot, tasks))
            except OSError:  # it died just now: its chunk is lost with the others it held
                pass
            self._pending.append(_Chunk(positions, keys, slot, worker))

    def _receive(self, chunk: _Chunk) -> list:
        """A worker's results for `chunk` (its pixels in the shared memory); a dead worker's chunk is lost."""
        try:
            results = chunk.worker.results.recv()
        except (EOFError, OSError):  # the worker died (SIGKILL, out of memory, a crash in a decoder)
            if chunk.worker in self._pool.workers:
                self._pool.replace(chunk.worker)
            return [(key, 'worker_died', None, None, None, None) for key in chunk.keys]
        if isinstance(results, BaseException):
            raise results
        pixels_NHWC = _slot_NHWC(self._shared.buf, chunk.slot, self._cfg.image_size)
        results = [r[:3] + (None if r[1] else pixels_NHWC[j].copy(),) + r[4:] for j, r in enumerate(results)]
        del pixels_NHWC  # a live view would keep the shared memory from closing
        return results

    def _next_result(self):
        if not self._ready:
            self._fill()
            if not self._pending:
                return None
            chunk = self._pending.popleft()
            results = chunk.worker
            if chunk.slot is not None:
                results = self._receive(chunk)
                self._free_slots.append(chunk.slot)
            self._ready.extend(zip(chunk.positions, results))
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
        if shard_level:
            return  # a shard is not a sample: it does not count towards the fraction
        if reason:
            self.stats['bad'] += 1
        if len(self._window) == self._window.maxlen:
            self._window_failed -= self._window[0] is not None  # about to leave the window
        self._window.append((key.rsplit(':', 1)[0], reason) if reason else None)
        self._window_failed += reason is not None
        if len(self._window) == self._window.maxlen and self._window_failed > self._max_bad * len(self._window):
            raise self._too_many([f for f in self._window if f])

    def _too_many(self, failed: list) -> TooManyBadSamples:
        reasons = collections.Counter(r for _, r in failed).most_common()
        worst = collections.Counter(s for s, _ in failed).most_common(3)
        return TooManyBadSamples(
            f'data.py: {len(failed)} of the last {len(self._window)} samples failed (more than max_bad_fraction='
            f'{self._max_bad}): {", ".join(f"{r} {n}" for r, n in reasons)}; worst shards: '
            f'{", ".join(f"{s} ({n})" for s, n in worst)}', len(failed), len(self._window), dict(reasons), worst)

    def __next__(self) -> dict:
        rows, before = [], self.state()
        try:
            while len(rows) < self._batch:
                item = self._next_result()
                if item is None:
                    break
                position, (key, reason, repaired, pixels_HWC, ids_L, mask_L) = item
                self._position = [position[0], position[1], position[2] + 1]
                self._count(key, reason, repaired)
                if reason is None:
                    rows.append((key, pixels_HWC, ids_L, mask_L))
        except TooManyBadSamples:
            # Back to the last batch returned, so that a checkpoint written now resumes after it.
            self._position, self.stats = before['position'], collections.Counter(before['stats'])
            self.examples = before['examples']
            raise
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
        pixels_BHWC = np.zeros((self._batch, self._cfg.image_size, self._cfg.image_size, 3), np.uint8)
        for row_HWC, (_, pixels_HWC, _, _) in zip(pixels_BHWC, rows):
            row_HWC[...] = pixels_HWC  # uint8 travels from the workers: a quarter of the bytes of float32
        if not self._uint8:
            pixels_BHWC = model_pixels(pixels_BHWC)
            pixels_BHWC[n:] = 0  # padding rows: mid-grey
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
            self._pool.close()
            self._pool = None
            self._shared.close()
            self._shared.unlink()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()


def make_loader(data: str, *, tokenizer: wordpiece.Tokenizer, global_batch: int, image_size: int = CROP, train: bool = True,
                seed: int = 0, process_index: int = 0, process_count: int = 1, max_len: int = 64, workers: int = 0,
                shuffle_buffer: int = 1000, interleave: int = 4, rows_per_shard: int = 1000,
                num_batches: int | None = None, max_bad_fraction: float = 0.5, bad_window: int = 1000,
                max_pixels: int = MAX_PIXELS, state: dict | None = None, images: str | None = None,
                uint8: bool = False) -> Loader:
    """Batches of this process's share (global_batch / process_count rows) of `data`.

    train=True: an endless stream (random crop + flip, shuffled, deterministic in seed).
    train=False: one ordered pass, central crop, the last batch padded ('valid' marks real rows);
    for evaluation on several processes pass the same num_batches to all (padding batches follow).
    images: the image folder of a Karpathy JSON `data`.
    uint8: pixels as read (uint8) instead of normalised to [-1, 1] (`model_pixels`), for train.py's step,
    which normalises them on the device.
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
        size, noise = _synthetic_options(data)
        size = size or (None if train else synthetic.SYNTHETIC_EVAL_SIZE)
        # Only training pairs get the requested noise: the held-out split keeps synthetic.NOISE, one yardstick.
        stream = _synthetic_stream(seed=seed, size=size, noise=noise if train else synthetic.NOISE, train=train,
                                   global_batch=global_batch,
                                   process_index=process_index, batch=batch, start=start)
        if not train and num_batches is None:
            num_batches = math.ceil(size / global_batch)  # equal on every process
    else:
        stream = _shard_stream(source_shards(data, rows_per_shard, process_count, images), seed=seed, train=train, process_index=process_index,
                               process_count=process_count, interleave=interleave,
                               shuffle_buffer=shuffle_buffer, start=start)
    return Loader(stream, cfg, batch=batch, train=train, workers=workers, num_batches=num_batches,
                  max_bad_fraction=max_bad_fraction, bad_window=bad_window, fingerprint=fingerprint, state=state,
                  uint8=uint8)


def read_samples(data: str, limit: int | None = None, images: bool = True) -> Iterator[Raw]:
    """Every raw sample of a source once, in order (for `vocab` and `filter`); images as bytes."""
    if data == 'synthetic' or data.startswith('synthetic:'):
        size = _synthetic_options(data)[0] or limit or 10_000
        for i in range(min(size, limit or size)):
            caption = synthetic._synthetic_scene(np.random.default_rng([0, 0, i]))[1]
            yield Raw(f'synthetic:{i}', ('synthetic', 0, 0, i, synthetic.NOISE), '', caption.encode())
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


def _add_member(tar: tarfile.TarFile, name: str, data: bytes):
    """One member of a webdataset shard being written (filters.py, bench.py)."""
    info = tarfile.TarInfo(name)
    info.size = len(data)  # mtime stays 0: the same input gives byte-identical shards
    tar.addfile(info, io.BytesIO(data))



# ---------------------------------------------------------------- the old command lines

def main(argv=None):
    """`python data.py vocab|filter|synthetic|bench ...`: aliases of the commands' new files, for a while."""
    argv = sys.argv[1:] if argv is None else list(argv)
    new = {'vocab': 'wordpiece.py vocab', 'filter': 'filters.py', 'synthetic': 'synthetic.py', 'bench': 'bench.py data'}
    if not argv or argv[0] not in new:
        raise SystemExit('data.py has no command of its own; use python ' + ', python '.join(new.values()))
    note = ' (whose --images counts distinct JPEGs; --batches sets how many are timed)' * (argv[0] == 'bench')
    print(f'data.py {argv[0]} is now: python {new[argv[0]]}{note}', file=sys.stderr)
    if argv[0] == 'vocab':
        return wordpiece.main(argv)
    if argv[0] == 'synthetic':
        return synthetic.main(argv[1:])
    if argv[0] == 'filter':
        import filters  # here, not at the top: filters.py imports this file
        return filters.main(argv[1:])
    import bench  # here, not at the top: bench.py imports jax, which this file never does
    return bench.main(['data'] + argv[1:])


if __name__ == '__main__':
    main()
