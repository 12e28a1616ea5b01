"""Tests for data.py: tokenizer parity with HF, sources, preprocessing (Sec. 5), filters (Sec. 3), resume,
multi-process sharding, worker processes and bad input. Tiny shards and images are made with PIL in tmp_path."""
import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import unicodedata
import zlib

import numpy as np
import pytest
from PIL import Image

import data

# ---------------------------------------------------------------- helpers


def encoded(img: Image.Image, fmt: str = 'PNG', **kw) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **kw)
    return out.getvalue()


def colour_image(i: int, size=(240, 210)) -> bytes:
    """A distinct small PNG per i (distinct bytes, so distinct hashes)."""
    return encoded(Image.new('RGB', size, (i % 256, (i * 7) % 256, (i * 13) % 256)))


def write_tar(path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, 'w') as tar:
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
    tokens = list(data.SPECIAL_TOKENS) + WORDS + list('abcdefghijklmnopqrstuvwxyz0123456789')
    return data.write_vocab(tokens, str(tmp_path_factory.mktemp('vocab') / 'vocab.txt'))


@pytest.fixture(scope='module')
def tok(word_vocab):
    return data.Tokenizer(word_vocab)


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


# ---------------------------------------------------------------- tokenizer (Sec. 4.1)

PARITY_VOCAB = (list(data.SPECIAL_TOKENS) +
                ['hello', 'world', 'the', 'cafe', 'naive', 'un', '##aff', '##able', 'photo', 'of', '##s', 'σ', 'ο', 'δ',
                 '##σ', '##ς', '##ο', '##δ', '東', '京', '中', '国', 'ß', 'straße', 'i', 'istanbul', '##ing', 'run'] +
                list('abcdefghijklmnopqrstuvwxyz0123456789') + ['##' + c for c in 'abcdefghijklmnopqrstuvwxyz0123456789'] +
                list('!"#$%&\'()*+,-./:;<=>?@[\\]^_`{|}~¿¡«»—–…'))
PARITY_CORPUS = [
    '', ' ', 'Hello, World!', 'HELLO world', 'Café naïve façade — résumé', 'unaffable runnings', 'photos of the cafe',
    '東京 is in 中国?', '東京中国', 'emoji 😀 and 🫨 and 👍🏽 here', 'tab\tnew\nline\rreturn', 'nul\x00 and \x0b \x7f ctrl',
    'zero\u200bwidth and soft\u00adhyphen', 'nbsp\u00a0ideographic\u3000space line\u2028sep', 'ΟΔΟΣ οδοσ', 'Straße STRASSE',
    'İstanbul', 'x' * 101, 'y' * 100, 'a' + 'b' * 150 + ' hello', 'a[SEP]b [CLS] [mask] [MASK]x', '[UNK][PAD]',
    '¿Qué? ¡Sí! «guillemets» … end', 'price: $5.99 (50% off) #deal @shop', 'file frankfurt airport skyline 2017 05 jpg',
    'image_tid 25&id mggqpuweqdpd&cache 0&lan_code 0', '\ufffd replacement \ufffd', 'ＦＵＬＬ width ｆｕｌｌ',
    'Ｔｏｋｙｏ 東京タワー', 'a\U0002B820b \U0002B920 \U00020000', 'combining e\u0301 and a\u0308', 'ﬁ ligature ﬀ',
    'hello ' * 80, 'w' + 'ing' * 33, '\U0010FFFF private \ue000 use', 'Ǆ ǅ ǆ titlecase', 'İİ ı I', 'ẞ capital sharp s',
]


@pytest.fixture(scope='module')
def parity_vocab(tmp_path_factory) -> str:
    return data.write_vocab(PARITY_VOCAB, str(tmp_path_factory.mktemp('pv') / 'vocab.txt'))


@pytest.mark.parametrize('max_len', [8, 64])
def test_tokenizer_ids_equal_hf_bert_tokenizer(parity_vocab, max_len):
    transformers = pytest.importorskip('transformers')
    hf = transformers.BertTokenizer(parity_vocab, do_lower_case=True)
    ours = data.Tokenizer(parity_vocab)
    ids_BL, mask_BL = ours.encode(PARITY_CORPUS, max_len)
    ref = hf(PARITY_CORPUS, truncation=True, max_length=max_len, padding='max_length')
    for text, ids, mask, ref_ids, ref_mask in zip(PARITY_CORPUS, ids_BL, mask_BL, ref['input_ids'], ref['attention_mask']):
        assert ids.tolist() == ref_ids and mask.tolist() == ref_mask, text
    assert ids_BL.dtype == mask_BL.dtype == np.int32 and ids_BL.shape == (len(PARITY_CORPUS), max_len)
    assert (ids_BL[:, 0] == ours.cls_id).all()
    # Truncation keeps [SEP] last; padding is [PAD] = 0.
    long = ids_BL[PARITY_CORPUS.index('hello ' * 80)]
    assert long[-1] == ours.sep_id and (ids_BL[0, 2:] == ours.pad_id).all() and ours.pad_id == 0


def test_tokenizer_equals_hf_python_tokenizer_on_ordinary_text(parity_vocab):
    """The legacy pure-Python HF tokenizer too, away from the few code points where it and Rust disagree."""
    bert = pytest.importorskip('transformers.models.bert')
    legacy = getattr(bert, 'BertTokenizerLegacy', None) or pytest.skip('no legacy tokenizer')
    hf, ours = legacy(parity_vocab, do_lower_case=True), data.Tokenizer(parity_vocab)
    corpus = [t for t in PARITY_CORPUS if not any(c in t for c in 'ΟΣ🫨\U0002B820\U0010FFFF')]
    ref = hf(corpus, truncation=True, max_length=32, padding='max_length')['input_ids']
    assert ours.encode(corpus, 32)[0].tolist() == ref


def test_basic_tokenize_matches_hf_on_every_bmp_code_point():
    """Per code point against HF's Rust normaliser + pre-tokeniser: differences only where HF's Unicode
    tables are older than Python's (characters added to Unicode after 3.2, and 4 documented ones)."""
    tokenizers = pytest.importorskip('tokenizers')
    norm = tokenizers.normalizers.BertNormalizer(lowercase=True)
    pre = tokenizers.pre_tokenizers.BertPreTokenizer()
    changed_since = {0x166D, 0x1734, 0x1885, 0x1886}  # categories Unicode changed after HF's tables
    diffs = []
    for cp in range(0x10000):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        text = 'x' + chr(cp) + 'Y'
        if data.basic_tokenize(text) != [w for w, _ in pre.pre_tokenize_str(norm.normalize_str(text))]:
            diffs.append(cp)
    unexplained = [hex(c) for c in diffs
                   if unicodedata.ucd_3_2_0.category(chr(c)) != 'Cn' and c not in changed_since]
    assert not unexplained and len(diffs) < 200


def test_vocab_cli_learns_wordpiece_that_both_tokenizers_load(tmp_path):
    tsv = tmp_path / 'pairs.tsv'
    rows = [data._synthetic_scene(np.random.default_rng([0, 0, i]))[1] for i in range(300)]
    rows += ['Überraschung café straße', 'unaffable unaffably', '東京 tower']
    tsv.write_text('image\tcaption\n' + ''.join(f'img{i}.jpg\t{c}\n' for i, c in enumerate(rows)), encoding='utf-8')
    out = tmp_path / 'vocab.txt'
    data.main(['vocab', '--data', str(tsv), '--size', '300', '--out', str(out)])
    tokens = out.read_text(encoding='utf-8').split('\n')[:-1]
    assert tokens[:5] == list(data.SPECIAL_TOKENS) and len(tokens) == len(set(tokens)) <= 300
    assert {'circle', 'triangle', 'purple', '##s'} <= set(tokens)  # frequent words became single tokens
    ours = data.Tokenizer(str(out))
    ids, _ = ours.encode(rows, 64)
    assert not (ids == ours.unk_id).any()  # every training word splits into known pieces
    transformers = pytest.importorskip('transformers')
    ref = transformers.BertTokenizer(str(out), do_lower_case=True)(rows, truncation=True, max_length=64,
                                                                       padding='max_length')['input_ids']
    assert ids.tolist() == ref


def test_learn_wordpiece_merges_most_frequent_pair_first():
    # abab = a ##b ##a ##b. (a, ##b) occurs 10 * 1 + 3 times... plus nothing else as often: merged first.
    # Then (##a, ##b) and (ab, ##a) tie at 10 and the smaller string wins: ##ab; then ab + ##ab.
    # (c, ##d) occurs once, below min_count=2, so it is never merged.
    specials = list(data.SPECIAL_TOKENS)
    vocab = data.learn_wordpiece({'abab': 10, 'ab': 3, 'cd': 1}, vocab_size=100)
    assert vocab == specials + ['##b', 'a', '##a', '##d', 'c', 'ab', '##ab', 'abab']
    assert data.learn_wordpiece({'abab': 10, 'ab': 3}, vocab_size=10) == specials + ['##b', 'a', '##a', 'ab', '##ab']


def test_synthetic_vocab_covers_synthetic_captions_and_loads_in_hf():
    path = data.synthetic_vocab()
    assert path == data.synthetic_vocab()  # deterministic: same content, same file
    tokens = open(path, encoding='utf-8').read().split('\n')
    assert tokens[:5] == list(data.SPECIAL_TOKENS)
    tok = data.Tokenizer(path)
    captions = [data._synthetic_scene(np.random.default_rng([3, 0, i]))[1] for i in range(2000)]
    ids, _ = tok.encode(captions, 64)
    assert not (ids == tok.unk_id).any()
    transformers = pytest.importorskip('transformers')
    ref = transformers.BertTokenizer(path, do_lower_case=True)(captions[:200], truncation=True, max_length=64,
                                                                 padding='max_length')['input_ids']
    assert ids[:200].tolist() == ref


# ---------------------------------------------------------------- synthetic data


def test_synthetic_captions_describe_images():
    resize = data.resize_for(64)
    named = noisy = 0
    for i in range(200):
        pixels, caption = data.synthetic_example(0, i, resize)
        assert pixels.shape == (resize, resize, 3) and pixels.dtype == np.uint8
        assert 3 <= len(caption.split()) <= 20
        colours = [w for w in caption.split() if w in data.SYN_COLOURS]
        if not any(s in caption for s in data.SYN_SHAPES):
            noisy += 1
            continue
        named += 1
        for colour in colours:  # each named colour is painted on at least a small object's area
            distance = np.abs(pixels.astype(int) - data.SYN_COLOURS[colour]).sum(-1)
            assert (distance < 100).sum() >= 15, (i, caption, colour)
    assert 0.02 < noisy / 200 < 0.15 and named > 150
    a, b = data.synthetic_example(0, 5, resize), data.synthetic_example(0, 5, resize)
    assert (a[0] == b[0]).all() and a[1] == b[1]
    assert data.synthetic_example(0, 5, resize, split=1)[0].tobytes() != a[0].tobytes()


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


def test_written_synthetic_folder_is_the_eval_split(tok, tmp_path):
    """`data.py synthetic` writes the held-out pairs; read back as a TSV they are the `synthetic:N` batch."""
    assert data.main(['synthetic', '--out', str(tmp_path), '--count', '4', '--size', str(data.resize_for(32))]) is None
    assert sorted(os.listdir(tmp_path)) == ['000000.png', '000001.png', '000002.png', '000003.png', 'pairs.tsv']
    want = next(data.make_loader('synthetic:4', tokenizer=tok, global_batch=4, image_size=32, train=False))
    got = next(data.make_loader(str(tmp_path / 'pairs.tsv'), tokenizer=tok, global_batch=4, image_size=32,
                                train=False))
    np.testing.assert_array_equal(got['ids'], want['ids'])
    np.testing.assert_allclose(got['pixels'], want['pixels'], atol=1e-6)  # PNG is lossless


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


def test_too_many_failures_raise_one_line_naming_the_shard(tmp_path, tok):
    members = [m for i in range(120) for m in pair_members(f'{i:03d}', 'w1', colour_image(i) if i % 3 else b'junk')]
    write_tar(tmp_path / 'rotten.tar', members)
    make_shards(tmp_path, [30])
    loader = data.make_loader(str(tmp_path / '*.tar'), tokenizer=tok, global_batch=8, image_size=32,
                              max_bad_fraction=0.2)
    with pytest.raises(RuntimeError) as err:
        take(loader, 40)
    message = str(err.value)
    assert '\n' not in message and 'rotten.tar' in message and 'not_image' in message
    with pytest.raises(RuntimeError, match='no readable sample'):
        next(data.make_loader(str(tmp_path / 'gone{0..3}.tar'), tokenizer=tok, global_batch=2, image_size=32))


# ---------------------------------------------------------------- Sec. 3 filters


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
        w = data.unigrams(caption)
        for g in w + [f'{a} {b}' for a, b in zip(w, w[1:])]:
            counts[g] = counts.get(g, 0) + 1
    top = sum(v >= 2 for v in counts.values())  # so the vocabulary is exactly the n-grams seen twice or more
    out = tmp_path / 'out'
    report = data.filter_pairs(str(tmp_path / 'raw.tar'), str(out), max_texts_per_image=3, max_images_per_text=3,
                               top_ngrams=top, shard_size=5)
    assert report['removed'] == {'unreadable': 1, 'image_too_small': 1, 'image_aspect_ratio': 1,
                                 'image_many_texts': 4, 'text_many_images': 4, 'text_length': 2, 'text_rare_token': 2}
    assert report['kept'] == 15 and report['input_pairs'] == 30 and report['shards'] == 3
    assert json.loads((out / 'report.json').read_text()) == report
    loader = data.make_loader(str(out / '*.tar'), tokenizer=tok, global_batch=4, image_size=32, train=False)
    assert sum(b['valid'].sum() for b in loader) == 15 and loader.stats['bad'] == 0
    data.main(['filter', '--data', str(tmp_path / 'raw.tar'), '--out', str(tmp_path / 'cli'),
               '--max-texts-per-image', '3', '--max-images-per-text', '3', '--top-ngrams', str(top)])
    assert json.loads((tmp_path / 'cli' / 'report.json').read_text())['removed'] == report['removed']
    # With the paper's thresholds (1000 texts per image, 10 images per text, 100M n-grams) only the
    # image-size, length and unreadable rules fire on this data.
    paper = data.filter_pairs(str(tmp_path / 'raw.tar'), str(tmp_path / 'paper'))
    assert paper['kept'] == 30 - 1 - 1 - 1 - 2


# ---------------------------------------------------------------- the module itself


def test_data_py_does_not_import_jax_and_bench_runs():
    code = 'import sys, data; data.bench(workers=(0,), images=64, image_size=64); assert "jax" not in sys.modules'
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.abspath(data.__file__)))
    assert out.returncode == 0, out.stderr
    assert 'images/s per core' in out.stdout
