"""BERT uncased WordPiece: ALIGN's tokenizer and the vocabulary it reads (Sec. 4.1).

ALIGN (Jia et al., ICML 2021) tokenises alt-text with BERT's uncased WordPiece over a vocabulary learnt
from its own captions: 100k tokens for English, 250k for the multilingual model (Sec. 4.1, 8). Top to bottom:
  basic_tokenize               clean, split CJK, strip accents, lower-case, split punctuation
  Tokenizer                    greedy longest-match pieces over a vocab.txt; ids equal HF `BertTokenizer`'s
  count_words, learn_wordpiece the vocabulary from a stream of captions; write_vocab writes it

Command line (SRC: any `--data` source that data.py reads):
  python wordpiece.py vocab --data SRC --size N --out vocab.txt

Deviations from the paper and from the reference tools:
- The word counter is bounded: when full it keeps its most frequent entries, so counts near the cut-off
  are approximate (exact when the table fits).
- The vocabulary is learnt with BPE-style merges of the most frequent adjacent pair under the `##`
  continuation prefix (as HF tokenizers' WordPieceTrainer does), not with Google's internal tool.
- The tokenizer matches HF `BertTokenizer` (Rust tokenizers), whose accent and punctuation tables
  are older than Python 3.11's: ~560 of 1.1M code points differ, all added to Unicode after 3.2.
"""
import argparse
import collections
import heapq
import os
import re
import unicodedata

import numpy as np

SPECIAL_TOKENS = ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]')  # BERT's order: [PAD] is id 0

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


# ---------------------------------------------------------------- command line

def main(argv=None):
    parser = argparse.ArgumentParser(description='BERT WordPiece vocabulary for ALIGN (Sec. 4.1).')
    sub = parser.add_subparsers(dest='command', required=True)
    p = sub.add_parser('vocab', help='learn a WordPiece vocab.txt from the captions (Sec. 4.1)')
    p.add_argument('--data', default='synthetic')
    p.add_argument('--size', type=int, default=100_000, help='100k English, 250k multilingual (Sec. 4.1, 8)')
    p.add_argument('--out', required=True)
    p.add_argument('--limit', type=int, help='read at most this many samples')
    p.add_argument('--max-words', type=int, default=2_000_000, help='bound on the word counter')
    p.add_argument('--limit-alphabet', type=int, default=1000)
    args = parser.parse_args(argv)
    import data  # here, not at the top: data.py imports this file; its read_samples reads every kind of source
    captions = (r.caption.decode('utf-8', 'replace') for r in data.read_samples(args.data, args.limit, images=False)
                if r.caption is not None)
    counts = count_words(captions, args.max_words)
    tokens = learn_wordpiece(counts, args.size, args.limit_alphabet)
    write_vocab(tokens, args.out)
    print(f'{len(tokens)} tokens from {len(counts)} distinct words -> {args.out}')


if __name__ == '__main__':
    main()
