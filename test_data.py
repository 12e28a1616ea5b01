"""Tests for data.py: sources, preprocessing (Sec. 5), resume, multi-process sharding, worker processes, bad input,
and the old command lines. Tiny shards and images are made with PIL in tmp_path (test_filters.py uses the helpers)."""
import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import time
import zlib

import numpy as np
import pytest
from PIL import Image

import data
import wordpiece

# ---------------------------------------------------------------- helpers


def encoded(img: Image.Image, fmt: str = 'PNG', **kw) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **kw)
    return out.getvalue()


def colour_image(i: int, size=(240, 210)) -> bytes:
    """A distinct small PNG per i (distinct bytes, so distinct hashes)."""
    return encoded(Image.new('RGB', size, (i % 256, (i * 7) % 256, (i * 13) % 256)))


def write_tar(path, members: list[tuple[str, bytes]], mode: str = 'w') -> str:
    """A tar shard of (name, bytes) members; mode 'w:gz' for a .tar.gz."""
    with tarfile.open(path, mode) as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return str(path)


def pair_members(key: str, caption: str, image: bytes, ext='png') -> list:
    return [(f'{key}.{ext}', image), (f'{key}.txt', caption.encode())]


WORDS = [f'w{i}' for i in range(200)]


@pytest.fixture(scope='module')
def word_vocab(tmp_path_factory) -> str:
    """A vocab where caption 'w17' is the single token w17, so batches can be traced back to samples."""
    tokens = list(wordpiece.SPECIAL_TOKENS) + WORDS + list('abcdefghijklmnopqrstuvwxyz0123456789')
    return wordpiece.write_vocab(tokens, str(tmp_path_factory.mktemp('vocab') / 'vocab.txt'))


@pytest.fixture(scope='module')
def tok(word_vocab):
    return wordpiece.Tokenizer(word_vocab)


def make_shards(root, counts: list[int]) -> list[str]:
    """Shards of samples captioned w0, w1, ... (globally numbered), each with a distinct image."""
    paths, n = [], 0
    for s, count in enumerate(counts):
        members = []
        for _ in range(count):
            members += pair_members(f'{n:04d}', WORDS[n], colour_image(n))
            n += 1
        paths.append(write_tar(root / f'{s:05d}.tar', members))
    return paths


def sample_ids(batch, tok) -> list[int]:
    """Caption 'wN' of each valid row -> N."""
    rows = batch['ids'][:, 1]
    valid = batch.get('valid', np.ones(len(rows), bool))
    return [int(t) - tok.vocab['w0'] for t, v in zip(rows, valid) if v]


def take(loader, n):
    return [next(loader) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if k == 'keys':
                assert x[k] == y[k]
            else:
                np.testing.assert_array_equal(x[k], y[k])


# ---------------------------------------------------------------- the synthetic source


def test_synthetic_global_batch_independent_of_process_count(tok):
    def global_batches(process_count):
        loaders = [data.make_loader('synthetic', tokenizer=tok, global_batch=8, image_size=32, seed=3,
                                    process_index=p, process_count=process_count) for p in range(process_count)]
        return [{k: np.concatenate([next_b[k] for next_b in step]) for k in ('pixels', 'ids', 'mask')}
                for step in zip(*[take(loader, 3) for loader in loaders])]
    one = global_batches(1)
    assert one[0]['pixels'].shape == (8, 32, 32, 3)
    assert_batches_equal(one, global_batches(2))
    assert_batches_equal(one, global_batches(4))
    assert not np.array_equal(one[0]['pixels'], one[1]['pixels'])


def test_synthetic_eval_is_finite_padded_and_held_out(tok):
    loader = data.make_loader('synthetic:10', tokenizer=tok, global_batch=4, image_size=32, train=False)
    batches = list(loader)
    assert [b['valid'].sum() for b in batches] == [4, 4, 2]
    assert batches[-1]['keys'][:2] == ['synthetic:8', 'synthetic:9'] and batches[-1]['keys'][2:] == ['', '']
    train = next(data.make_loader('synthetic', tokenizer=tok, global_batch=4, image_size=32))
    assert not np.array_equal(train['ids'], batches[0]['ids'])
    # On 2 processes, each gets its half of every step: the same number of batches on both.
    halves = [list(data.make_loader('synthetic:10', tokenizer=tok, global_batch=4, image_size=32, train=False,
                                    process_index=p, process_count=2)) for p in range(2)]
    assert len(halves[0]) == len(halves[1]) == 3
    keys = [k for h in halves for b in h for k in b['keys'] if k]
    assert sorted(keys) == sorted(f'synthetic:{i}' for i in range(10))



# ---------------------------------------------------------------- preprocessing (Sec. 5)


def test_preprocess_shape_range_central_crop_and_flip(tmp_path, tok):
    img = Image.new('RGB', (500, 375), (255, 0, 0))
    img.paste((0, 0, 255), (250, 0, 500, 375))  # left red, right blue
    shard = write_tar(tmp_path / 'a.tar', [m for i in range(16) for m in pair_members(f'{i:02d}', 'w1', encoded(img))])
    ev = next(data.make_loader(shard, tokenizer=tok, global_batch=16, image_size=64, train=False))
    pixels = ev['pixels']
    assert pixels.shape == (16, 64, 64, 3) and pixels.dtype == np.float32
    assert pixels.min() == -1.0 and pixels.max() == 1.0
    np.testing.assert_array_equal(pixels[0, :, 0], [[1, -1, -1]] * 64)  # central crop is never flipped
    tr = next(data.make_loader(shard, tokenizer=tok, global_batch=16, image_size=64, train=True))
    left_red = tr['pixels'][:, 32, 0, 0] > 0
    assert left_red.any() and (~left_red).any()  # some flipped, some not
    # One resample of the source box equals resizing to 77 (= 64 * 346/289) and then cropping.
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    ref = np.asarray(photo.resize((77, 77), Image.BILINEAR).crop((5, 9, 69, 73)), int)
    assert np.abs(data.crop_pixels(photo, 64, 5, 9, False).astype(int) - ref).max() <= 1
    assert data.resize_for(289) == 346 and data.crop_params(289, None) == (28, 28, False)


def test_uint8_batches_are_the_float_batches_before_normalising_with_the_same_bits_on_a_device(tok):
    """train.py's loader sends uint8 pixels and its step normalises them on the device (`model_pixels`):
    the same batches, and for every byte the same float32 on the host, under jit on the device, and
    within 7.5e-8 of x / 127.5 - 1 in float64."""
    jax = pytest.importorskip('jax')
    every_byte = np.arange(256, dtype=np.uint8)
    host = data.model_pixels(every_byte)
    np.testing.assert_array_equal(np.asarray(jax.jit(data.model_pixels)(every_byte)), host)
    assert host.dtype == np.float32 and np.abs(host - (every_byte / 127.5 - 1)).max() < 7.5e-8
    assert host[0] == -1 and host[255] == 1
    kw = dict(tokenizer=tok, global_batch=8, image_size=32, train=True, seed=3)
    raw, ready = next(data.make_loader('synthetic', uint8=True, **kw)), next(data.make_loader('synthetic', **kw))
    assert raw['pixels'].dtype == np.uint8 and ready['pixels'].dtype == np.float32
    np.testing.assert_array_equal(data.model_pixels(raw['pixels']), ready['pixels'])
    np.testing.assert_array_equal(raw['ids'], ready['ids'])


def test_decode_image_modes_exif_and_draft():
    def rgb(payload):
        return np.asarray(data.decode_image(payload))
    assert rgb(encoded(Image.new('L', (300, 300), 77)))[0, 0].tolist() == [77, 77, 77]
    palette = Image.new('RGB', (300, 300), (10, 200, 30)).convert('P', palette=Image.Palette.ADAPTIVE)
    assert rgb(encoded(palette))[0, 0].tolist() == [10, 200, 30]
    assert rgb(encoded(Image.new('RGBA', (300, 300), (0, 0, 0, 0))))[0, 0].tolist() == [255, 255, 255]
    p = Image.new('P', (300, 300), 0)
    p.putpalette([0, 0, 0] * 256)
    p.info['transparency'] = 0
    assert rgb(encoded(p, transparency=0))[0, 0].tolist() == [255, 255, 255]
    cmyk = rgb(encoded(Image.new('CMYK', (300, 300), (0, 255, 255, 0)), 'JPEG'))
    assert cmyk[0, 0, 0] > 200 and cmyk[0, 0, 1:].max() < 60  # red
    i16 = rgb(encoded(Image.fromarray(np.full((300, 300), 32896, np.uint16))))
    assert abs(int(i16[0, 0, 0]) - 128) <= 1  # scaled from 16 bits, not clipped to 255
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    assert data.decode_image(encoded(Image.new('RGB', (300, 220)), 'JPEG', exif=exif.tobytes())).size == (220, 300)
    big = encoded(Image.new('RGB', (2000, 1500), (9, 99, 199)), 'JPEG')
    assert data.decode_image(big, resize=346).size == (500, 375)  # DCT-scaled to 1/4, still >= 346
    assert data.decode_image(big, resize=600).size == (1000, 750)


# ---------------------------------------------------------------- sources


def test_tar_sources_brace_glob_and_list(tmp_path, tok):
    make_shards(tmp_path, [3, 4, 2])
    write_tar(tmp_path / '00003.tar', pair_members('x/0009', 'w9', colour_image(9), 'jpeg')
                      + [('x/0009.json', b'{}'), ('x/0010.cls', b'3')] + pair_members('0010', 'w10', colour_image(10), 'webp'))
    listing = tmp_path / 'shards.txt'
    listing.write_text('# shards\n' + ''.join(f'{i:05d}.tar\n' for i in range(4)))
    expected = list(range(11))
    for spec in (str(tmp_path / '{00000..00003}.tar'), str(tmp_path / '*.tar'), str(listing)):
        loader = data.make_loader(spec, tokenizer=tok, global_batch=4, image_size=32, train=False)
        got = [i for b in loader for i in sample_ids(b, tok)]
        assert got == expected, spec
        assert loader.stats['samples'] == 11 and loader.stats['bad'] == 0
    assert data.list_shards('d/{8..10}.tar') == ['d/8.tar', 'd/9.tar', 'd/10.tar']
    assert data.list_shards('d/{098..100}.tar') == ['d/098.tar', 'd/099.tar', 'd/100.tar']
    with pytest.raises(ValueError, match='no file matches'):
        data.list_shards(str(tmp_path / 'nothing*.tar'))


def test_tsv_and_csv_sources(tmp_path, tok):
    (tmp_path / 'img').mkdir()
    for i in range(5):
        (tmp_path / 'img' / f'{i}.png').write_bytes(colour_image(i))
    (tmp_path / 'pairs.tsv').write_text('image\tcaption\n' + ''.join(f'img/{i}.png\tw{i}\n' for i in range(5)))
    (tmp_path / 'pairs.csv').write_text(''.join(f'img/{i}.png,"w{i}"\n' for i in range(5)))
    for name in ('pairs.tsv', 'pairs.csv'):
        loader = data.make_loader(str(tmp_path / name), tokenizer=tok, global_batch=2, image_size=32, train=False)
        batches = list(loader)
        assert [i for b in batches for i in sample_ids(b, tok)] == [0, 1, 2, 3, 4]
        assert batches[-1]['valid'].tolist() == [True, False]
        train = take(data.make_loader(str(tmp_path / name), tokenizer=tok, global_batch=2, image_size=32,
                                      rows_per_shard=2), 5)
        assert sorted(i for b in train for i in sample_ids(b, tok)) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    halves = [[i for b in data.make_loader(str(tmp_path / 'pairs.tsv'), tokenizer=tok, global_batch=4, image_size=32,
                                           train=False, process_index=p, process_count=2, num_batches=2)
               for i in sample_ids(b, tok)] for p in range(2)]
    assert halves == [[0, 1, 2], [3, 4]]  # 5 rows over 2 processes: contiguous, disjoint, complete


# ---------------------------------------------------------------- resume, sharding, workers


def test_resume_shards_exact(tmp_path, tok):
    paths = make_shards(tmp_path, [7, 5, 6, 7, 4])
    with tarfile.open(paths[1], 'a') as t:  # one bad sample, so that skipping is part of the replay
        t.addfile(tarfile.TarInfo('bad.png'), io.BytesIO(b''))
        info = tarfile.TarInfo('bad.txt')
        info.size = 2
        t.addfile(info, io.BytesIO(b'w0'))
    spec = str(tmp_path / '*.tar')
    kw = dict(tokenizer=tok, global_batch=4, image_size=32, seed=7, shuffle_buffer=5, interleave=2,
              max_bad_fraction=1.0)
    uninterrupted = data.make_loader(spec, **kw)
    full = take(uninterrupted, 25)  # ~3 epochs
    first = data.make_loader(spec, **kw)
    head = take(first, 9)
    state = json.loads(json.dumps(first.state()))
    resumed = data.make_loader(spec, state=state, **kw)
    tail = take(resumed, 16)
    assert_batches_equal(full, head + tail)
    assert resumed.state() == uninterrupted.state() and resumed.stats['empty_image'] >= 3
    rows = [i for b in full[:3] for i in sample_ids(b, tok)]
    assert rows != sorted(rows) and len({i // 7 for i in rows[:4]}) > 1  # shuffled, shards mixed
    other = take(data.make_loader(spec, **{**kw, 'seed': 8}), 3)
    assert not np.array_equal(other[0]['ids'], full[0]['ids'])
    with pytest.raises(ValueError, match='saved data state'):
        data.make_loader(spec, state=state, **{**kw, 'seed': 8})


def test_resume_synthetic_exact(tok):
    kw = dict(tokenizer=tok, global_batch=6, image_size=32, seed=1, process_index=1, process_count=2)
    full = take(data.make_loader('synthetic:20', **kw), 8)
    first = data.make_loader('synthetic:20', **kw)
    head = take(first, 3)
    tail = take(data.make_loader('synthetic:20', state=json.loads(json.dumps(first.state())), **kw), 5)
    assert_batches_equal(full, head + tail)


def test_processes_read_disjoint_shards_and_never_run_dry(tmp_path, tok):
    paths = make_shards(tmp_path, [6, 3, 5, 2, 4])  # 2 processes get 3 and 2 shards, unequal sizes
    shards = [data.Shard(p) for p in paths]
    epochs = [[[], [], []], [[], [], []]]  # process -> epoch -> sample keys in order
    for p in range(2):
        stream = data._shard_stream(shards, seed=0, train=True, process_index=p, process_count=2, interleave=2,
                                    shuffle_buffer=4, start=(0, 0, 0))
        for (epoch, _, _), task in stream:
            if epoch == 3:
                break
            epochs[p][epoch].append(task[0])
    for e in range(3):  # within each epoch: disjoint and complete
        assert not set(epochs[0][e]) & set(epochs[1][e]) and len(epochs[0][e]) + len(epochs[1][e]) == 20
    assert len({tuple(epochs[0][e]) for e in range(3)}) == 3  # a new order (and shard deal) every epoch
    assert {len(epochs[0][e]) for e in range(3)} != {len(epochs[0][0])}
    # Training streams never end, so both processes make every step, epochs apart.
    loaders = [data.make_loader(str(tmp_path / '*.tar'), tokenizer=tok, global_batch=4, image_size=32,
                                process_index=p, process_count=2) for p in range(2)]
    for _ in range(30):
        for loader in loaders:
            assert next(loader)['ids'].shape == (2, 64)
    assert loaders[0].state()['position'][0] >= 2 and loaders[1].state()['position'][0] >= 2
    # Evaluation: disjoint, complete, and the same number of batches on both given num_batches.
    evals = [list(data.make_loader(str(tmp_path / '*.tar'), tokenizer=tok, global_batch=4, image_size=32,
                                   train=False, process_index=p, process_count=2, num_batches=8)) for p in range(2)]
    assert len(evals[0]) == len(evals[1]) == 8  # 15 and 5 samples, 2 per batch
    ids = [sorted(i for b in e for i in sample_ids(b, tok)) for e in evals]
    assert not set(ids[0]) & set(ids[1]) and sorted(ids[0] + ids[1]) == list(range(20))
    with pytest.raises(ValueError, match='num_batches'):
        list(data.make_loader(str(tmp_path / '*.tar'), tokenizer=tok, global_batch=4, image_size=32, train=False,
                              num_batches=2))


def test_worker_processes_give_the_same_batches(tmp_path, tok):
    make_shards(tmp_path, [20, 20])
    kw = dict(tokenizer=tok, global_batch=8, image_size=32, seed=2, shuffle_buffer=8)
    inline_loader = data.make_loader(str(tmp_path / '*.tar'), **kw)
    inline = take(inline_loader, 6)
    with data.make_loader(str(tmp_path / '*.tar'), workers=2, **kw) as loader:
        parallel = take(loader, 6)
        state = loader.state()  # the position of the batches handed out, not of the prefetched ones
    assert_batches_equal(inline, parallel)
    assert state == inline_loader.state()
    kw = dict(tokenizer=tok, global_batch=16, image_size=32, train=False)
    with data.make_loader(str(tmp_path / '*.tar'), workers=1, **kw) as loader:
        assert_batches_equal(list(data.make_loader(str(tmp_path / '*.tar'), **kw)), list(loader))


# ---------------------------------------------------------------- bad input


def bomb_png() -> bytes:
    """A valid PNG header claiming 20000 x 20000 pixels, in 70 bytes."""
    png = encoded(Image.new('L', (1, 1)))
    ihdr = b'IHDR' + struct.pack('>II', 20000, 20000) + png[24:29]
    return png[:12] + ihdr + struct.pack('>I', zlib.crc32(ihdr)) + png[33:]


def test_bad_inputs_are_skipped_counted_and_named(tmp_path, tok):
    good = [m for i in range(4) for m in pair_members(f'g{i}', f'w{i}', colour_image(i))]
    jpeg = encoded(Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)), 'JPEG')
    bad = (pair_members('corrupt', 'w50', jpeg[:700], 'jpg')
           + pair_members('truncated', 'w51', jpeg[:len(jpeg) // 2], 'jpg')
           + pair_members('zero', 'w52', b'')
           + pair_members('text', 'w53', b'this is not an image')
           + pair_members('bomb', 'w54', bomb_png())
           + [('nocap.png', colour_image(55)), ('noimg.txt', b'w56')]
           + pair_members('emptycap', '  \n', colour_image(57))
           + [('latin1.png', colour_image(58)), ('latin1.txt', b'w58 caf\xe9')])
    write_tar(tmp_path / 'a.tar', good + bad)
    (tmp_path / 'b.tar').write_bytes(os.urandom(3000))  # not a tar
    whole = write_tar(tmp_path / 'c.tar', [m for i in range(4, 8) for m in pair_members(f'g{i}', f'w{i}', colour_image(i))])
    with tarfile.open(whole) as t:
        cut = t.getmembers()[2].offset_data + 10  # inside the second image
    (tmp_path / 'c.tar').write_bytes(open(whole, 'rb').read()[:cut])
    listing = tmp_path / 'list.txt'
    listing.write_text('a.tar\nb.tar\nc.tar\nmissing.tar\n')
    loader = data.make_loader(str(listing), tokenizer=tok, global_batch=4, image_size=32, train=False,
                              max_bad_fraction=1.0)
    got = [i for b in loader for i in sample_ids(b, tok)]
    assert got == [0, 1, 2, 3, 58, 4]  # the good ones, the repaired caption, and c.tar's pair before the cut
    expected = {'corrupt_image': 2, 'empty_image': 1, 'not_image': 1, 'decompression_bomb': 1, 'no_caption': 1,
                'no_image': 1, 'empty_caption': 1, 'caption_not_utf8': 1, 'shard_unreadable': 1,
                'shard_truncated': 1, 'shard_missing': 1}
    assert {k: loader.stats[k] for k in expected} == expected
    assert loader.stats['bad'] == 8 and loader.stats['samples'] == 6 + 8
    assert loader.examples['corrupt_image'] == [f'{tmp_path}/a.tar:corrupt', f'{tmp_path}/a.tar:truncated']
    assert loader.examples['shard_missing'] == [f'{tmp_path}/missing.tar']
    # The pixel limit is a parameter, and a TSV's missing file is counted too.
    tsv = tmp_path / 'pairs.tsv'
    (tmp_path / 'ok.png').write_bytes(colour_image(1, (400, 400)))
    tsv.write_text('ok.png\tw1\nnope.png\tw2\n')
    loader = data.make_loader(str(tsv), tokenizer=tok, global_batch=2, image_size=32, train=False,
                              max_bad_fraction=1.0, max_pixels=100_000)
    assert list(loader) == []  # nothing valid: no batch at all
    assert loader.stats['decompression_bomb'] == 1 and loader.stats['missing_image'] == 1


def test_only_a_persistent_majority_of_failures_stops_and_the_state_is_the_last_batch(tmp_path, tok):
    members = [m for i in range(120) for m in pair_members(f'{i:03d}', 'w1', colour_image(i) if i % 3 else b'junk')]
    write_tar(tmp_path / 'rotten.tar', members)  # a third of it is not images
    make_shards(tmp_path, [30])
    kw = dict(tokenizer=tok, global_batch=8, image_size=32, interleave=1, shuffle_buffer=1)
    loader = data.make_loader(str(tmp_path / '*.tar'), **kw)  # the default: more than half of the last 1,000
    take(loader, 40)
    assert loader.stats['not_image'] >= 40 and loader.counts()['skipped_not_image'] == loader.stats['not_image']
    assert 'skipped (not_image' in loader.summary()
    loader = data.make_loader(str(tmp_path / '*.tar'), max_bad_fraction=0.25, bad_window=30, **kw)
    batches = []
    with pytest.raises(data.TooManyBadSamples) as err:
        while True:
            state = loader.state()
            batches.append(next(loader))
    message = str(err.value)
    assert '\n' not in message and 'rotten.tar' in message and 'not_image' in message
    assert err.value.worst[0][0].endswith('rotten.tar') and err.value.reasons == {'not_image': err.value.failed}
    assert err.value.failed > 0.25 * 30 and err.value.window == 30
    assert loader.state() == state  # the last batch returned: a checkpoint now resumes after it
    again = data.make_loader(str(tmp_path / '*.tar'), state=json.loads(json.dumps(state)), max_bad_fraction=1.0, **kw)
    uninterrupted = take(data.make_loader(str(tmp_path / '*.tar'), max_bad_fraction=1.0, **kw), len(batches) + 2)
    assert_batches_equal(batches + take(again, 2), uninterrupted)
    with pytest.raises(data.TooManyBadSamples, match='no readable sample'):
        next(data.make_loader(str(tmp_path / 'gone{0..3}.tar'), tokenizer=tok, global_batch=2, image_size=32))


@pytest.mark.parametrize('fault', ['cut_in_a_member', 'missing', 'zero_bytes', 'gzip', 'gzip_cut'])
def test_broken_shards_are_read_or_skipped_and_counted(tmp_path, tok, fault):
    make_shards(tmp_path, [3])  # 00000.tar: w0 w1 w2
    members = [m for i in range(3, 7) for m in pair_members(f'{i:04d}', f'w{i}', colour_image(i))]
    if fault in ('gzip', 'gzip_cut'):
        name = write_tar(tmp_path / 'b.tar.gz', members, 'w:gz')
    else:
        name = write_tar(tmp_path / 'b.tar', members)
    if fault == 'cut_in_a_member':
        with tarfile.open(name) as t:
            cut = t.getmembers()[4].offset_data + 10  # inside the third image
        (tmp_path / 'b.tar').write_bytes(open(name, 'rb').read()[:cut])
    elif fault == 'gzip_cut':
        (tmp_path / 'b.tar.gz').write_bytes(open(name, 'rb').read()[:-300])
    elif fault == 'zero_bytes':
        (tmp_path / 'b.tar').write_bytes(b'')
    elif fault == 'missing':
        os.remove(name)
    (tmp_path / 'list.txt').write_text(f'00000.tar\n{os.path.basename(name)}\n')
    loader = data.make_loader(str(tmp_path / 'list.txt'), tokenizer=tok, global_batch=4, image_size=32, train=False)
    got = [i for b in loader for i in sample_ids(b, tok)]
    expected, reason = {'cut_in_a_member': ([0, 1, 2, 3, 4], 'shard_truncated'), 'missing': ([0, 1, 2], 'shard_missing'),
                        'zero_bytes': ([0, 1, 2], 'shard_empty'), 'gzip': ([0, 1, 2, 3, 4, 5, 6], None),
                        'gzip_cut': (None, 'shard_truncated')}[fault]
    if expected is None:  # gzip cut near its end: the members before the cut, whichever those are
        assert got[:3] == [0, 1, 2] and got == sorted(set(got)) and len(got) < 7
    else:
        assert got == expected
    assert loader.stats['bad'] == 0 and loader.stats['samples'] == len(got)  # a shard is not a sample
    if reason:
        assert loader.stats[reason] == 1 and loader.examples[reason] == [name]
        assert loader.counts() == {f'skipped_{reason}': 1} and f'shards: {reason} 1' in loader.summary()


# ---------------------------------------------------------------- worker processes that die


def _alive(pid: int) -> bool:
    """A process that still runs (a zombie waiting for its reaper has exited)."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except FileNotFoundError:
        return False


def test_a_killed_worker_is_replaced_and_its_samples_counted(tmp_path, tok):
    (tmp_path / 'img').mkdir()
    for i in range(200):  # one epoch is more than the test reads
        (tmp_path / 'img' / f'{i}.png').write_bytes(colour_image(i, (40, 40)))
    os.mkfifo(tmp_path / 'img' / 'stuck.png')  # opening it waits forever: the worker that reads it holds its chunk
    rows = [f'img/{i}.png\tw{i}' for i in range(200)]
    rows[40] = 'img/stuck.png\tw40'
    (tmp_path / 'pairs.tsv').write_text('\n'.join(rows) + '\n')
    with data.make_loader(str(tmp_path / 'pairs.tsv'), tokenizer=tok, global_batch=8, image_size=32, workers=2,
                          shuffle_buffer=1) as loader:
        batches = take(loader, 2)
        stuck = [c for c in loader._pending if f'{tmp_path}/pairs.tsv[0:200]:40' in c.keys][0].worker
        before = set(loader._pool._processes)
        os.kill(stuck.process.pid, 9)  # as the OOM killer would
        batches += take(loader, 5)
        assert all(len(b['ids']) == 8 for b in batches)  # full batches throughout
        assert stuck.process.pid not in loader._pool._processes and len(loader._pool._processes) == 2
        assert len(set(loader._pool._processes) - before) == 1  # one new worker in its place
        seen = [i for b in batches for i in sample_ids(b, tok)]
        lost = loader.stats['worker_died']
        assert lost >= data.CHUNK and lost % data.CHUNK == 0 and 40 not in seen
        assert loader.stats['samples'] == len(seen) + lost == loader.state()['position'][2]
        assert loader.examples['worker_died'][0].endswith(':32')  # the chunk of rows 32-47
        missing = sorted(set(range(len(seen) + lost)) - set(seen))  # whole chunks, rows 32-47 first
        assert seen == sorted(seen) and missing[:16] == list(range(32, 48)) and len(missing) == lost
        assert {m // data.CHUNK for m in missing} == {m // data.CHUNK for m in missing[::data.CHUNK]}


def test_workers_exit_when_the_training_process_is_killed(tmp_path):
    code = ('import multiprocessing.resource_tracker as rt, sys, data, synthetic, wordpiece\n'
            'tok = wordpiece.Tokenizer(synthetic.synthetic_vocab())\n'
            'loader = data.make_loader("synthetic", tokenizer=tok, global_batch=16, image_size=32, workers=2)\n'
            'next(loader)\n'
            'print(*loader._pool._processes, rt._resource_tracker._pid, loader._shared.name, flush=True)\n'
            'while True: next(loader)\n')
    proc = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.abspath(data.__file__)))
    try:
        *pids, shm = proc.stdout.readline().split()
        pids = [int(p) for p in pids]
        assert len(pids) == 3 and all(_alive(p) for p in pids)  # two workers and the resource tracker
    finally:
        proc.kill()
        proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline and (any(_alive(p) for p in pids) or os.path.exists(f'/dev/shm/{shm.lstrip("/")}')):
        time.sleep(0.1)
    assert not [p for p in pids if _alive(p)], 'orphans left running'
    assert not os.path.exists(f'/dev/shm/{shm.lstrip("/")}'), 'shared memory left behind'


# ---------------------------------------------------------------- the module itself


def test_data_py_and_the_files_below_it_do_not_import_jax():
    code = ('import sys, data, filters, synthetic, wordpiece; tok = wordpiece.Tokenizer(synthetic.synthetic_vocab()); '
            'print(next(data.make_loader("synthetic", tokenizer=tok, global_batch=4, image_size=32))["pixels"].shape); '
            'assert "jax" not in sys.modules')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.abspath(data.__file__)))
    assert out.returncode == 0, out.stderr
    assert '(4, 32, 32, 3)' in out.stdout


def test_old_data_py_commands_forward_to_their_new_files(tmp_path, capsys):
    data.main(['vocab', '--data', 'synthetic', '--limit', '200', '--size', '100', '--out', str(tmp_path / 'vocab.txt')])
    assert 'data.py vocab is now: python wordpiece.py vocab' in capsys.readouterr().err
    assert (tmp_path / 'vocab.txt').read_text().split('\n')[:5] == list(wordpiece.SPECIAL_TOKENS)
    data.main(['synthetic', '--out', str(tmp_path / 'synth'), '--count', '2', '--size', '16'])
    assert 'data.py synthetic is now: python synthetic.py' in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / 'synth')) == ['000000.png', '000001.png', 'pairs.tsv']
