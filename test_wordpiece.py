"""Tests for wordpiece.py: tokenizer ids equal HF's BertTokenizer (Rust and legacy Python), per code point over
the BMP, and the vocabulary learnt from captions (Sec. 4.1)."""
import unicodedata

import numpy as np
import pytest

import synthetic
import wordpiece

PARITY_VOCAB = (list(wordpiece.SPECIAL_TOKENS) +
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
    return wordpiece.write_vocab(PARITY_VOCAB, str(tmp_path_factory.mktemp('pv') / 'vocab.txt'))


@pytest.mark.parametrize('max_len', [8, 64])
def test_tokenizer_ids_equal_hf_bert_tokenizer(parity_vocab, max_len):
    transformers = pytest.importorskip('transformers')
    hf = transformers.BertTokenizer(parity_vocab, do_lower_case=True)
    ours = wordpiece.Tokenizer(parity_vocab)
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
    hf, ours = legacy(parity_vocab, do_lower_case=True), wordpiece.Tokenizer(parity_vocab)
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
        if wordpiece.basic_tokenize(text) != [w for w, _ in pre.pre_tokenize_str(norm.normalize_str(text))]:
            diffs.append(cp)
    unexplained = [hex(c) for c in diffs
                   if unicodedata.ucd_3_2_0.category(chr(c)) != 'Cn' and c not in changed_since]
    assert not unexplained and len(diffs) < 200


def test_vocab_cli_learns_wordpiece_that_both_tokenizers_load(tmp_path):
    tsv = tmp_path / 'pairs.tsv'
    rows = [synthetic._synthetic_scene(np.random.default_rng([0, 0, i]))[1] for i in range(300)]
    rows += ['Überraschung café straße', 'unaffable unaffably', '東京 tower']
    tsv.write_text('image\tcaption\n' + ''.join(f'img{i}.jpg\t{c}\n' for i, c in enumerate(rows)), encoding='utf-8')
    out = tmp_path / 'vocab.txt'
    wordpiece.main(['vocab', '--data', str(tsv), '--size', '300', '--out', str(out)])
    tokens = out.read_text(encoding='utf-8').split('\n')[:-1]
    assert tokens[:5] == list(wordpiece.SPECIAL_TOKENS) and len(tokens) == len(set(tokens)) <= 300
    assert {'circle', 'triangle', 'purple', '##s'} <= set(tokens)  # frequent words became single tokens
    ours = wordpiece.Tokenizer(str(out))
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
    specials = list(wordpiece.SPECIAL_TOKENS)
    vocab = wordpiece.learn_wordpiece({'abab': 10, 'ab': 3, 'cd': 1}, vocab_size=100)
    assert vocab == specials + ['##b', 'a', '##a', '##d', 'c', 'ab', '##ab', 'abab']
    assert wordpiece.learn_wordpiece({'abab': 10, 'ab': 3}, vocab_size=10) == specials + ['##b', 'a', '##a', 'ab', '##ab']
