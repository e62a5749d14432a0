"""Build the default model's corpus from two Debian packages, tokenize it, and write
``train.bin``/``val.bin`` plus the tokenizer folder (used by ``train_default_model.sh``).

Texts (install first: ``apt-get install -y bible-kjv-text python3.11-doc``):

* the King James Bible (1611; public domain), read with the ``bible`` program of
  the ``bible-kjv`` package that ``bible-kjv-text`` depends on: one document per book;
* the Python 3.11 documentation (PSF License), its reStructuredText sources as
  plain text (``/usr/share/doc/python3.11/html/_sources``): one document per file.

Usage: ``python examples/prepare_default_corpus.py OUT_DIR [--vocab 8192]``.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from pathlib import Path

import numpy as np

from regla_torch.data import tokenize_documents, train_bpe, write_tokens

PY_DOCS = Path("/usr/share/doc/python3.11/html/_sources")


def bible_books():
    try:
        out = subprocess.run(["bible", "-l100000", "ge1:1-re22:21"], capture_output=True, text=True,
                             check=True, env={"COLUMNS": "100000", "PATH": "/usr/bin:/bin"}).stdout
    except FileNotFoundError:
        raise SystemExit("the `bible` program is missing: apt-get install -y bible-kjv-text") from None
    books, book, chapter = [], None, []
    for line in out.splitlines():
        head = re.fullmatch(r"(.+?) (\d+)", line.strip())
        if head and not line.startswith(" "):
            if chapter:
                book[1].append(chapter)
            name = head.group(1)
            if book is None or book[0] != name:
                book = (name, [])
                books.append(book)
            chapter = [line.strip()]
        elif line.strip():
            # "  12 And God said..." -> the verse text without its number
            chapter.append(re.sub(r"^\s*\d+\s+", "", line))
    book[1].append(chapter)
    return ["\n\n".join("\n".join(ch) for ch in chapters) for _, chapters in books]


def python_docs():
    files = sorted(PY_DOCS.rglob("*.txt"))
    if not files:
        raise SystemExit(f"{PY_DOCS} is empty: apt-get install -y python3.11-doc")
    return [f.read_text(encoding="utf-8") for f in files]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--val-docs", type=int, default=4, help="documents of each text held out for validation")
    a = ap.parse_args()
    bible, py = bible_books(), python_docs()
    assert len(bible) == 66, f"expected the 66 books of the KJV, found {len(bible)}"
    rng = np.random.default_rng(0)
    # Held-out documents are whole books/pages picked at random, so validation text is unseen.
    val_b = set(rng.choice(len(bible), a.val_docs, replace=False).tolist())
    val_p = set(rng.choice(len(py), a.val_docs, replace=False).tolist())
    train = [d for i, d in enumerate(bible) if i not in val_b] + [d for i, d in enumerate(py) if i not in val_p]
    val = [bible[i] for i in sorted(val_b)] + [py[i] for i in sorted(val_p)]
    order = rng.permutation(len(train))  # interleave the two texts' documents
    train = [train[i] for i in order]
    tok = train_bpe(train, a.vocab)
    a.out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(a.out / "tokenizer")
    ids_train, ids_val = tokenize_documents(train, tok), tokenize_documents(val, tok)
    write_tokens(ids_train, a.out / "train.bin", len(tok))
    write_tokens(ids_val, a.out / "val.bin", len(tok))
    stats = {"bible_books": len(bible), "python_doc_files": len(py), "vocab": len(tok),
             "train_tokens": int(len(ids_train)), "val_tokens": int(len(ids_val)),
             "train_chars": sum(map(len, train)), "val_chars": sum(map(len, val))}
    (a.out / "stats.json").write_text(json.dumps(stats, indent=1))
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
