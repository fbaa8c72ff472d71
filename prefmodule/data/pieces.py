r"""Token ids of ASCII text from a memo of pieces, for the byte-level BPE tokenizers of GPT-2, Llama 3 and Qwen.

Such a tokenizer cuts a text at its added tokens, splits the rest into pieces with one regex and merges tokens only
within a piece: a text's ids are its pieces' ids back to back. Pieces repeat (they are mostly words), so ids kept
per piece, each computed once by the tokenizer's own BPE model, are the tokenizer's ids for a fifth of the CPU time
of ``tokenizers``' pipeline, where the regex pass and the per-text ``Encoding`` dominate (0.4 against 1.7-2.5 µs
per token on 200-token texts; ``tokenizers`` has no cheaper ids-only call). Only ASCII text takes this path: on
ASCII the pattern's classes (``\p{L}``, ``\p{N}``, ``\s``) match the same characters in Python as in Oniguruma,
which ``tokenizers`` uses, and :meth:`Pieces.of` checks that on every ASCII character before it offers the path.
Any other text goes to ``tokenizers``.
"""

from __future__ import annotations

import itertools
import re
import string
import unicodedata

import regex
from tokenizers import Tokenizer, pre_tokenizers

GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"  # ByteLevel's own
MEMO_SIZE = 1 << 18  # pieces kept per process (about 50 MB); rarer pieces past that are recomputed


class _Memo(dict):
    """piece -> its ids, filled on first use by the BPE model (pieces are byte-level mapped first, as the
    pre-tokenizer does)."""

    def __init__(self, raw: Tokenizer):
        super().__init__()
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        self.byte_chars = {code: byte_level.pre_tokenize_str(chr(code))[0][0] for code in range(128)}
        self.model = raw.model

    def __missing__(self, piece: str) -> tuple[int, ...]:
        ids = tuple(token.id for token in self.model.tokenize(piece.translate(self.byte_chars)))
        if len(self) < MEMO_SIZE:
            self[piece] = ids
        return ids


class Pieces:
    """Splits ASCII text as the tokenizer does and maps its pieces to ids through a memo."""

    def __init__(self, raw: Tokenizer, pattern: str, added: dict[str, int]):
        self.pattern = _compile(pattern)
        longest_first = sorted(added, key=len, reverse=True)
        self.added = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")") if added else None
        self.memo = _Memo(raw)
        self.memo.update({content: (id_,) for content, id_ in added.items()})

    @classmethod
    def of(cls, raw: Tokenizer, spec: dict) -> Pieces | None:
        """Pieces for the tokenizer ``raw`` (without post-processor) whose ``tokenizer.json`` is ``spec``, or None
        when its layout is not one this path reproduces, or a check on every ASCII character disagrees."""
        pattern = _pattern(spec.get("pre_tokenizer") or {})
        tokens = spec.get("added_tokens") or []
        if (pattern is None or (spec.get("normalizer") or {}).get("type") not in (None, "NFC")
                or any(t.get("lstrip") or t.get("rstrip") or t.get("single_word")
                       or unicodedata.normalize("NFC", t["content"]) != t["content"] for t in tokens)
                or _overlapping([t["content"] for t in tokens])):
            return None
        pieces = cls(raw, pattern, {t["content"]: t["id"] for t in tokens})
        probes = _probes([t["content"] for t in tokens if t["content"].isascii()])
        return pieces if all(pieces.ids(text) == raw.encode(text, add_special_tokens=False).ids
                              for text in probes) else None

    def split(self, text: str) -> list[str] | None:
        """The pieces of ``text`` (added tokens whole), or None when ``text`` is not ASCII or the pattern leaves a
        gap (the tokenizer would keep the gap as a piece of its own)."""
        if not text.isascii():
            return None
        findall = self.pattern.findall
        parts = self.added.split(text) if self.added else [text]  # text, added token, text, ...
        pieces = findall(parts[0])
        for i in range(1, len(parts), 2):
            pieces.append(parts[i])
            if parts[i + 1]:
                pieces += findall(parts[i + 1])
        return pieces if sum(map(len, pieces)) == len(text) else None

    def ids(self, text: str) -> list[int] | None:
        pieces = self.split(text)
        return None if pieces is None else list(itertools.chain.from_iterable(map(self.memo.__getitem__, pieces)))

    def prompt(self, text: str, margin: int) -> tuple[list[int], int, int] | None:
        """``(ids, token, character)``: the ids of ``text`` and where its second-to-last piece starts, moved back to
        at least ``margin`` characters before the end (``0, 0`` when no piece starts early enough)."""
        pieces = self.split(text)
        if pieces is None:
            return None
        runs = list(map(self.memo.__getitem__, pieces))
        ids = list(itertools.chain.from_iterable(runs))
        token, character = len(ids), len(text)
        for k in range(len(pieces) - 1, -1, -1):
            token, character = token - len(runs[k]), character - len(pieces[k])
            if k < len(pieces) - 1 and character <= len(text) - margin:
                return ids, token, character
        return ids, 0, 0


def pre_tokenizer_steps(pre: dict) -> list[dict]:
    """The steps of a ``tokenizer.json`` pre-tokenizer, in order (one, or those of a ``Sequence``)."""
    return (pre.get("pretokenizers") or [pre]) if pre.get("type") == "Sequence" else [pre]


def _pattern(pre: dict) -> str | None:
    """The split pattern of a byte-level pre-tokenizer: ByteLevel's own regex, or one Split regex before a ByteLevel
    that only maps bytes (Llama 3, Qwen). None for anything else."""
    *split, byte_level = pre_tokenizer_steps(pre)
    if byte_level.get("type") != "ByteLevel" or byte_level.get("add_prefix_space"):
        return None
    if not split:
        return GPT2_PATTERN if byte_level.get("use_regex", True) else None
    (step,) = split if len(split) == 1 else (None,)
    if (step is None or step.get("type") != "Split" or byte_level.get("use_regex", True) or step.get("invert")
            or step.get("behavior") != "Isolated" or "Regex" not in (step.get("pattern") or {})):
        return None
    return step["pattern"]["Regex"]


def _compile(pattern: str):
    r"""The pattern for ASCII text in the standard library's ``re`` (1.5x faster than ``regex``), with ``\p{L}``
    and ``\p{N}``, which ``re`` lacks, spelled out as the ASCII letters and digits; in ``regex`` otherwise."""
    out, in_class, i = [], False, 0
    while i < len(pattern):
        if pattern[i] == "\\":
            escape = pattern[i:i + 5]
            if escape in (r"\p{L}", r"\p{N}"):
                chars = "a-zA-Z" if escape == r"\p{L}" else "0-9"
                out.append(chars if in_class else f"[{chars}]")
                i += 5
                continue
            out.append(pattern[i:i + 2])
            i += 2
            continue
        in_class = (in_class and pattern[i] != "]") or (not in_class and pattern[i] == "[")
        out.append(pattern[i])
        i += 1
    try:
        return re.compile("".join(out), re.ASCII)
    except re.error:  # other classes (\p{Lu}...) or syntax only ``regex`` knows
        return regex.compile(pattern)


def _overlapping(contents: list[str]) -> bool:
    """Whether an added token holds another or ends where another starts (the tokenizer's matching order then
    decides, which this path does not reproduce)."""
    tokens = set(contents)
    starts = {content[:i] for content in contents for i in range(1, len(content))}
    return any(content[i:j] in tokens and j - i < len(content)
               for content in contents for i in range(len(content)) for j in range(i + 1, len(content) + 1)) or any(
        content[i:] in starts for content in contents for i in range(1, len(content)))


def _probes(added: list[str]) -> list[str]:
    """Every ASCII character next to every class of character, runs of spaces and newlines, contractions, digits."""
    every = "".join(map(chr, range(128)))
    neighbours = ["a", "Z", "7", " ", "  ", "\n", "\t", "!", "'", "\r\n", "\x0b", "\x1c", "\x7f"]
    texts = [every, every[::-1], string.printable, "it's 1234567 o'clock\n\n  I'LL   go!\t\t?! ...\n"]
    texts += [left + chr(code) + right for code in range(128) for left, right in zip(neighbours, neighbours[3:])]
    texts += [f"say {token}{token} then {token}\n" for token in added[:20]]
    return texts
