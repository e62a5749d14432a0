"""Tokenizers and token streams for `regla train`.

A corpus is one flat stream of token ids with the EOS id after every document
(nanoGPT's layout). Token files (``.bin``: raw uint16, or uint32 when the vocabulary does
not fit 16 bits; ``.npy``) are memory-mapped, so a corpus can be larger than RAM; text and
JSONL files are tokenized in memory, which suits small corpora and tests.

The training windows are the corpus cut into non-overlapping pieces of ``seq_len`` tokens,
visited in a seeded permutation per epoch. The window a sample index maps to depends only on
(seed, index), which is what makes a resumed run, and a run on another number of GPUs with
the same global batch, see exactly the same data.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

EOS = "<|endoftext|>"
TEXT_SUFFIXES = (".txt", ".md", ".text", ".rst")
TOKEN_SUFFIXES = (".bin", ".npy")


class DataError(ValueError):
    """Input data that cannot be used; the message says which file and why."""


# ----------------------------------------------------------------- tokenizers
def byte_tokenizer():
    """A byte-level tokenizer (256 bytes + EOS) as a real ``PreTrainedTokenizerFast``.

    A BPE model with no merges over GPT-2's byte alphabet: every byte is one token, any text
    round-trips, and it saves as an ordinary ``tokenizer.json`` that transformers and mlx-lm
    load like any other.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS])
    return _wrap(tok)


def train_bpe(texts, vocab_size: int):
    """A byte-level BPE of ``vocab_size`` tokens (EOS included) learned on ``texts`` (an iterable
    of strings) with the `tokenizers` library."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return _wrap(tok)


def _wrap(tok):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, clean_up_tokenization_spaces=False)


def load_tokenizer(spec: str, texts=None):
    """``bytes``, ``bpe:N`` (trained on ``texts``), or a folder/repo for ``AutoTokenizer``."""
    if spec == "bytes":
        return byte_tokenizer()
    if spec.startswith("bpe:"):
        if texts is None:
            raise DataError("--tokenizer bpe:N learns its merges from text; it cannot be used with a "
                            "token file. Give the tokenizer the token file was made with.")
        try:
            n = int(spec[4:])
        except ValueError:
            raise DataError(f"--tokenizer {spec}: expected bpe:<vocab size>, e.g. bpe:8192") from None
        return train_bpe(texts, n)
    from transformers import AutoTokenizer

    path = Path(spec).expanduser()
    try:
        tok = AutoTokenizer.from_pretrained(str(path) if path.exists() else spec)
    except (OSError, ValueError) as e:
        raise DataError(f"--tokenizer {spec}: cannot load a tokenizer from it ({e})") from None
    if tok.eos_token_id is None:
        raise DataError(f"tokenizer {spec} has no EOS token, which separates documents; "
                        "set eos_token in its tokenizer_config.json")
    return tok


# ------------------------------------------------------------------ corpora
def expand(paths) -> list[Path]:
    """Files named, with folders expanded to their text/JSONL/token files (sorted, so the
    corpus order does not depend on the file system)."""
    out = []
    for p in map(Path, paths):
        p = p.expanduser()
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file()
                           and f.suffix in TEXT_SUFFIXES + TOKEN_SUFFIXES + (".jsonl",))
            if not found:
                raise DataError(f"{p}: the folder holds no .txt/.md/.jsonl/.bin/.npy files")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise DataError(f"{p}: no such file or folder")
    kinds = {f.suffix in TOKEN_SUFFIXES for f in out}
    if len(kinds) > 1:
        raise DataError("give either token files (.bin/.npy) or text files (.txt/.jsonl), not both: "
                        "a token file's tokenizer may not be the one text would be read with")
    return out


def read_documents(files):
    """Documents of text files (one per file) and JSONL files (the ``text`` field of each line)."""
    for f in files:
        if f.suffix == ".jsonl":
            with open(f, encoding="utf-8") as fh:
                for n, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{f}:{n}: not valid JSON ({e})") from None
                    if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                        raise DataError(f"{f}:{n}: each JSONL line needs a string field 'text'")
                    yield rec["text"]
        else:
            try:
                yield f.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{f}: not UTF-8 text ({e}); token files must end in .bin or .npy") from None


def tokenize_documents(docs, tokenizer) -> np.ndarray:
    """Token ids of every document followed by EOS, as one array."""
    eos = tokenizer.eos_token_id
    parts = []
    for d in docs:
        ids = tokenizer(d, add_special_tokens=False)["input_ids"]
        parts.append(np.asarray(ids + [eos], dtype=np.int64))
    if not parts:
        raise DataError("the text files hold no documents")
    return np.concatenate(parts)


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def write_tokens(ids: np.ndarray, path, vocab_size: int):
    """Save a token stream as a nanoGPT-style ``.bin`` (written to a temp name, then renamed)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    np.asarray(ids).astype(token_dtype(vocab_size)).tofile(tmp)
    tmp.replace(path)


def open_tokens(files, vocab_size: int):
    """Memory-map token files; several are concatenated (in memory only if there is more than one)."""
    arrays = []
    for f in files:
        try:
            if f.suffix == ".npy":
                a = np.load(f, mmap_mode="r")
            else:
                a = np.memmap(f, dtype=token_dtype(vocab_size), mode="r")
        except (ValueError, OSError) as e:
            raise DataError(f"{f}: cannot read it as tokens ({e})") from None
        if a.ndim != 1 or a.dtype.kind not in "iu":
            raise DataError(f"{f}: expected a 1-D integer token array, got {a.dtype} {a.shape}")
        # A cheap check on the first million tokens: catches the usual mistake (another
        # tokenizer's file, or a uint32 file read as uint16) without reading a huge corpus.
        if len(a) and int(a[: 1 << 20].max()) >= vocab_size:
            raise DataError(f"{f}: holds token ids >= the tokenizer's vocabulary ({vocab_size}); "
                            "it was made with another tokenizer (or a .bin of another dtype)")
        arrays.append(a)
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def load_corpus(paths, tokenizer_spec: str):
    """(tokenizer, token stream) for the files given; text is tokenized, token files mapped."""
    files = expand(paths)
    if files[0].suffix in TOKEN_SUFFIXES:
        tok = load_tokenizer(tokenizer_spec)
        return tok, open_tokens(files, len(tok))
    docs = list(read_documents(files))
    tok = load_tokenizer(tokenizer_spec, texts=docs)
    return tok, tokenize_documents(docs, tok)


# ------------------------------------------------------------------ windows
class Windows:
    """Non-overlapping ``seq_len`` windows of a token stream, in a seeded order per epoch."""

    def __init__(self, tokens, seq_len: int, seed: int):
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.count = len(tokens) // seq_len
        if self.count == 0:
            raise DataError(f"the corpus has {len(tokens)} tokens, fewer than one sequence of {seq_len}")
        self._perm = (None, None)

    def order(self, epoch: int) -> np.ndarray:
        if self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.count))
        return self._perm[1]

    def sample(self, index: int) -> np.ndarray:
        """The window the ``index``-th sample of the whole run reads."""
        epoch, i = divmod(index, self.count)
        return self.window(int(self.order(epoch)[i]))

    def window(self, w: int) -> np.ndarray:
        s = w * self.seq_len
        return np.asarray(self.tokens[s: s + self.seq_len], dtype=np.int64)


def pack(windows, eos_id: int):
    """One packed row from several windows: ``(input_ids [1, N*T], labels, cu_seqlens)``.

    Segments end at every window end and after every EOS, so no token attends across a
    document; the label of each segment's first token is masked, since predicting it would
    mean predicting across that boundary.
    """
    ids = np.concatenate(windows)
    T = len(windows[0])
    cuts = set(range(0, len(ids) + 1, T))
    cuts.update((np.flatnonzero(ids == eos_id) + 1).tolist())
    cu = np.array(sorted(c for c in cuts if c <= len(ids)), dtype=np.int64)
    labels = ids.copy()
    labels[cu[:-1]] = -100
    return ids[None], labels[None], cu
