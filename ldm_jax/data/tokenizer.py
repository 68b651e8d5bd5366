"""CLIP's byte-level BPE tokenizer in pure Python, from the user's `vocab.json` + `merges.txt`.

Reproduces transformers' `CLIPTokenizer` (transformers >= 5, where it is backed by the `tokenizers`
library; the old Python tokenizer's ftfy / BasicTokenizer paths no longer exist), checked id for
id by tests/test_clip.py against ids recorded by tools/fixtures/clip_text.py:

1. special-token strings (bos, eos, unk, pad and any `added_tokens_decoder` entry) written in the
   raw text become their ids (Stable Diffusion 2.x's pad token "!" included, which is why "!" in an
   SD 2.x prompt encodes as id 0 rather than "!</w>");
2. the rest: Unicode NFC, lowercasing character by character;
3. split into words like CLIP's regex `<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|
   \\p{L}+|\\p{N}|[^\\s\\p{L}\\p{N}]+` (whitespace dropped; digits one by one), then GPT-2's
   byte-level split, which only breaks a literal `<|...|>` into `<|`, letters, `|>`;
4. each word's UTF-8 bytes mapped to printable characters, `</w>` appended to the last one;
   symbols missing from the vocabulary become the unknown token; then BPE: repeatedly merge the
   adjacent pair with the lowest merge rank (leftmost first);
5. `<|startoftext|>` + ids + `<|endoftext|>`, truncated to `max_length` (eos kept last, with a
   warning naming the prompt) and padded with the pad token.

One known difference: transformers may also match a special token after lowercasing (e.g.
"<|ENDOFTEXT|>", depending on how its files declare `normalized`); here only the exact string is.
"""

from __future__ import annotations

import json
import logging
import os
import re
import unicodedata
from typing import Any, Mapping, Sequence

from etils import epath
import numpy as np

from ldm_jax import storage

logger = logging.getLogger(__name__)

VOCAB_NAME = "vocab.json"
MERGES_NAME = "merges.txt"
CONFIG_NAMES = ("tokenizer_config.json", "special_tokens_map.json")  # the latter wins
SPECIAL_TOKEN_FIELDS = ("bos_token", "eos_token", "unk_token", "pad_token")
DEFAULT_SPECIAL_TOKENS = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
}
END_OF_WORD = "</w>"

# Unicode White_Space (what `\s` matches in the tokenizers library's regex engine).
_WHITESPACE = frozenset(
    "\t\n\v\f\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000"
    + "".join(chr(c) for c in range(0x2000, 0x200B))
)
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
_LITERALS = ("<|startoftext|>", "<|endoftext|>")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable character map."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), 256)
    mapping = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in mapping)
    mapping.update((b, chr(256 + i)) for i, b in enumerate(shifted))
    return dict(sorted(mapping.items()))


def _char_class(c: str) -> str:
    if c in _WHITESPACE:
        return "space"
    category = unicodedata.category(c)[0]
    return {"L": "letter", "N": "number"}.get(category, "other")


def split_words(text: str, literals: bool = True) -> list[str]:
    """Normalised text -> CLIP's pre-tokenized words (see the module docstring, step 3)."""
    words, i = [], 0
    while i < len(text):
        literal = next((s for s in _LITERALS if literals and text.startswith(s, i)), None)
        if literal:
            words += split_words(literal, literals=False)  # GPT-2's split of the literal
            i += len(literal)
            continue
        contraction = next((s for s in _CONTRACTIONS if text.startswith(s, i)), None)
        if contraction:
            words.append(contraction)
            i += len(contraction)
            continue
        kind = _char_class(text[i])
        j = i + 1
        if kind in ("letter", "other"):
            while j < len(text) and _char_class(text[j]) == kind:
                j += 1
        if kind != "space":
            words.append(text[i:j])
        i = j
    return words


def _read_json(path: epath.Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _token_content(value: Any) -> str:
    return value["content"] if isinstance(value, Mapping) else str(value)


MAX_TRUNCATION_WARNINGS = 20


class CLIPTokenizer:
    """CLIP BPE tokenizer. `encode(texts, max_length) -> (ids, attention_mask)`, both [B, L] int32.

    vocab: token -> id (`vocab.json`); merges: pairs in rank order (`merges.txt`, without its
    `#version` line); special tokens are token strings that must be in `vocab`.
    """

    def __init__(
        self,
        vocab: Mapping[str, int],
        merges: Sequence[tuple[str, str]],
        bos_token: str = DEFAULT_SPECIAL_TOKENS["bos_token"],
        eos_token: str = DEFAULT_SPECIAL_TOKENS["eos_token"],
        unk_token: str = DEFAULT_SPECIAL_TOKENS["unk_token"],
        pad_token: str = DEFAULT_SPECIAL_TOKENS["pad_token"],
        extra_special_tokens: Sequence[str] = (),
    ):
        self.vocab = dict(vocab)
        self.bos_token, self.eos_token = bos_token, eos_token
        self.unk_token, self.pad_token = unk_token, pad_token
        specials = dict(zip(SPECIAL_TOKEN_FIELDS, (bos_token, eos_token, unk_token, pad_token)))
        specials.update((f"added token {t!r}", t) for t in extra_special_tokens)
        missing = {field: t for field, t in specials.items() if t not in self.vocab}
        if missing:
            raise ValueError(f"special tokens not in the vocabulary: {missing}")
        self.ranks: dict[tuple[str, str], int] = {}
        for rank, (a, b) in enumerate(merges):
            if a not in self.vocab or b not in self.vocab or a + b not in self.vocab:
                raise ValueError(f"merge {rank} ({a!r} {b!r}) uses tokens not in the vocabulary")
            self.ranks[(a, b)] = rank  # a repeated pair: the last rank wins, as in tokenizers
        self.byte_chars = bytes_to_unicode()
        unique = sorted(set(specials.values()), key=len, reverse=True)  # longest match first
        self._special_re = re.compile("|".join(re.escape(t) for t in unique))
        self._cache: dict[str, list[int]] = {}
        self._truncated: set[str] = set()  # texts already warned about (a data set is read every epoch)

    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> CLIPTokenizer:
        """Reads a tokenizer folder (a Stable Diffusion repo's `tokenizer/`): vocab.json,
        merges.txt, and when present tokenizer_config.json / special_tokens_map.json for the
        special tokens (e.g. SD 2.x's pad token "!")."""
        path = storage.path(path)
        for name in (VOCAB_NAME, MERGES_NAME):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path}: no {name} (a CLIP tokenizer folder needs both "
                                        f"{VOCAB_NAME} and {MERGES_NAME})")
        vocab = _read_json(path / VOCAB_NAME)
        merges = []
        lines = (path / MERGES_NAME).read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, 1):
            if line.startswith("#version") or not line:
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise ValueError(f"{path / MERGES_NAME}:{number}: expected 'a b', got {line!r}")
            merges.append((parts[0], parts[1]))
        tokens = dict(DEFAULT_SPECIAL_TOKENS)
        extra = []
        for name in CONFIG_NAMES:
            if (path / name).is_file():
                config = _read_json(path / name)
                tokens.update(
                    (k, _token_content(config[k])) for k in SPECIAL_TOKEN_FIELDS if config.get(k)
                )
                added = config.get("added_tokens_decoder", {})
                extra += [_token_content(t) for t in added.values()]
        return cls(vocab, merges, **tokens, extra_special_tokens=extra)

    @property
    def bos_token_id(self) -> int:
        return self.vocab[self.bos_token]

    @property
    def eos_token_id(self) -> int:
        return self.vocab[self.eos_token]

    @property
    def pad_token_id(self) -> int:
        return self.vocab[self.pad_token]

    def _bpe(self, word: str) -> list[int]:
        """One pre-tokenized word -> ids (cached)."""
        if word in self._cache:
            return self._cache[word]
        chars = [self.byte_chars[b] for b in word.encode("utf-8")]
        chars[-1] += END_OF_WORD
        symbols = [c if c in self.vocab else self.unk_token for c in chars]
        while len(symbols) > 1:
            ranked = [
                (self.ranks[pair], i)
                for i, pair in enumerate(zip(symbols, symbols[1:]))
                if pair in self.ranks
            ]
            if not ranked:
                break
            _, i = min(ranked)
            symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
        ids = [self.vocab[s] for s in symbols]
        self._cache[word] = ids
        return ids

    def tokenize(self, text: str) -> list[int]:
        """text -> ids, without bos/eos, padding or truncation."""
        ids, start = [], 0
        for match in [*self._special_re.finditer(text), None]:
            end = match.start() if match else len(text)
            chunk = unicodedata.normalize("NFC", text[start:end])
            chunk = "".join(c.lower() for c in chunk)  # per character, as the tokenizers library
            for word in split_words(chunk):
                ids += self._bpe(word)
            if match:
                ids.append(self.vocab[match.group()])
                start = match.end()
        return ids

    def _warn_truncated(self, text: str, num_tokens: int, max_length: int) -> None:
        if text in self._truncated or len(self._truncated) >= MAX_TRUNCATION_WARNINGS:
            return
        self._truncated.add(text)
        shown = text if len(text) <= 60 else text[:57] + "..."
        logger.warning("prompt %r has %d tokens, more than max_length=%d: truncated", shown, num_tokens, max_length)
        if len(self._truncated) == MAX_TRUNCATION_WARNINGS:
            logger.warning("%d texts truncated: further ones are not reported", MAX_TRUNCATION_WARNINGS)

    def encode(
        self, texts: str | Sequence[str], max_length: int = 77
    ) -> tuple[np.ndarray, np.ndarray]:
        """texts -> (ids [B, max_length] int32, attention_mask [B, max_length] int32).

        Each row is bos + tokens + eos, truncated to max_length (eos stays last; a warning names
        the prompt, once per text and tokenizer, for the first MAX_TRUNCATION_WARNINGS texts) and
        padded with the pad token (mask 0 there).
        """
        if isinstance(texts, str):
            texts = [texts]
        if max_length < 2:
            raise ValueError(f"max_length={max_length} must be at least 2 (bos and eos)")
        ids = np.full((len(texts), max_length), self.pad_token_id, np.int32)
        mask = np.zeros((len(texts), max_length), np.int32)
        for row, text in enumerate(texts):
            tokens = self.tokenize(text)
            if len(tokens) + 2 > max_length:
                self._warn_truncated(text, len(tokens) + 2, max_length)
                tokens = tokens[: max_length - 2]
            row_ids = [self.bos_token_id, *tokens, self.eos_token_id]
            ids[row, : len(row_ids)] = row_ids
            mask[row, : len(row_ids)] = 1
        return ids, mask
