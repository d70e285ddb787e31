"""Documents -> the flat hierarchical layout the encoder reads, and the collator that batches it.

The encoder reshapes flat ``input_ids`` [batch, seq_len] into [batch, sections, section_size, patch_size], so patch k
of a document is exactly tokens ``[k * patch_size, (k + 1) * patch_size)``. :class:`DocumentPreprocessor` writes the
text's own structure into that layout:

- ``layout="sentence"``: every paragraph starts a new section and every sentence starts a new patch. A sentence longer
  than a patch continues in the next patch; with ``merge_short_sentences`` a sentence that still fits whole into the
  paragraph's current patch joins it. Patches are padded to ``patch_size`` tokens and sections to ``section_size``
  patches (``attention_mask`` 0), and a paragraph longer than a section continues in the next section. Text without
  sentence punctuation (20 Newsgroups) is one long "sentence" per paragraph, so it falls back to fixed chunks.
- ``layout="fixed"``: the plain tokenization, padded at the end to whole patches.

Paragraphs are separated by blank lines. Sentences end at ``.``, ``!`` or ``?`` (optionally followed by closing quotes
or brackets) plus whitespace, unless the next word starts lowercase, or the word before a ``.`` is a single letter
(an initial) or one of :data:`ABBREVIATIONS` (``Dr.``, ``Sen.``, ``etc.``). It is a deliberately small rule
(no model download); merging short sentences makes its occasional misses harmless.

The tokenization is the tokenizer's own: a fast tokenizer tokenizes each whole document once and its offsets assign
tokens to sentences, so the non-pad tokens of the layout are exactly ``tokenizer(text)["input_ids"]``, in order.
A slow (Python) tokenizer, e.g. a byte-level one, tokenizes the sentence pieces, which cover the text without gaps.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import BatchEncoding, PreTrainedTokenizerBase

LAYOUTS = ("sentence", "fixed")
# Both patterns are linear on any input: possessive quantifiers never backtrack, and a sentence end is only tried at
# the first mark of a run of `.!?` (the lookbehind), so a long run without whitespace is scanned once, not once per
# position. The word before the mark is read backwards by `_word_before`, at most a few characters.
PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*+\n\s*+")
SENTENCE_END = re.compile(r"(?<![.!?])(?P<end>[.!?]++)[\"'\u201d\u2019)\]]*+\s++(?=(?P<next>\S))")
ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st sen rep gov gen col lt sgt capt adm rev hon pres vs etc eg ie cf al approx dept "
    "est fig inc ltd co corp vol pp jan feb mar apr jun jul aug sep sept oct nov dec mt ft".split()
)
LONGEST_ABBREVIATION = max(map(len, ABBREVIATIONS))
# Per-token keys the collator pads, with their pad values (None: the tokenizer's pad id / the label pad id).
TOKEN_KEYS = {"input_ids": None, "attention_mask": 0, "token_type_ids": 0, "special_tokens_mask": 1,
              "offset_mapping": (0, 0)}
LABEL_KEYS = ("labels", "label")
NO_SPAN = (0, 0)  # the offsets of padding and special tokens
Token = tuple[int, tuple[int, int]]  # (token id, (start, end) characters in the text)
Position = tuple[int, int, tuple[int, int]]  # one position of the layout: (token id, attention mask, offsets)


def _word_before(text: str, end: int, start: int) -> str:
    """The word (no whitespace, no `.!?`) ending at `end`, not reaching before `start`; only its last
    `LONGEST_ABBREVIATION + 1` characters are read (a longer word is no abbreviation either way)."""
    begin = end
    while begin > start and end - begin <= LONGEST_ABBREVIATION and not text[begin - 1].isspace() \
            and text[begin - 1] not in ".!?":
        begin -= 1
    return text[begin:end]


def sentence_starts(text: str) -> list[tuple[int, bool]]:
    """Character offsets where sentences start, each with True if it also starts a paragraph. Always has (0, True).

    Linear time in `len(text)` on any input (also a million characters without whitespace)."""
    starts = [(0, True)]
    paragraph_start = 0
    for paragraph_break in [*PARAGRAPH_BREAK.finditer(text), None]:
        paragraph_end = len(text) if paragraph_break is None else paragraph_break.start()
        for match in SENTENCE_END.finditer(text, paragraph_start, paragraph_end):
            word = _word_before(text, match.start(), paragraph_start).lower()
            is_abbreviation = match.group("end") == "." and (len(word) == 1 or word in ABBREVIATIONS)
            if not is_abbreviation and not match.group("next").islower() and match.end() < paragraph_end:
                starts.append((match.end(), False))
        if paragraph_break is not None and paragraph_break.end() < len(text):
            paragraph_start = paragraph_break.end()
            starts.append((paragraph_start, True))
    return starts


def _with_offsets(ids: list[int], offsets: list[tuple[int, int]] | None) -> list[Token]:
    """Pair token ids with their character offsets (`NO_SPAN` where there are none: special tokens, slow tokenizers)."""
    return list(zip(ids, offsets)) if offsets is not None else [(token, NO_SPAN) for token in ids]


def _check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}.")


def _pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.pad_token_id is None:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no pad token; set one first, e.g. "
            "`tokenizer.pad_token = tokenizer.eos_token`."
        )
    return tokenizer.pad_token_id


class DocumentPreprocessor:
    """Tokenizes documents into the sentence/paragraph-aligned (or fixed) flat layout of the hierarchical encoder.

    Args:
        tokenizer: any Hugging Face tokenizer (fast or slow) with a pad token.
        patch_size: tokens per patch (must equal the model's ``config.patch_size``).
        section_size: patches per section (must equal the model's ``config.section_size``).
        layout: ``"sentence"`` (structure-aligned, see the module docstring) or ``"fixed"``.
        merge_short_sentences: in the sentence layout, put consecutive sentences of a paragraph into one patch while
            they fit whole.
        max_length: longest allowed output (a multiple of ``patch_size``); a longer document raises ``ValueError``
            unless ``truncation=True``. None: no limit (the encoder reads any length).
        truncation: with ``max_length``, keep the first ``max_length // patch_size`` patches of a longer document.
        add_special_tokens: add the tokenizer's special tokens (e.g. ``[CLS]``/``[SEP]``) around the whole document.

    Call it on a str (returns un-batched lists) or a list of str, e.g.
    ``dataset.map(preprocessor, batched=True, input_columns="text")``. ``return_tensors="pt"`` pads the batch to a
    common multiple of ``patch_size * section_size``, as :class:`DataCollatorForHierarchical` does.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        patch_size: int,
        section_size: int,
        layout: str = "sentence",
        merge_short_sentences: bool = True,
        max_length: int | None = None,
        truncation: bool = False,
        add_special_tokens: bool = True,
    ):
        _check_positive_int("patch_size", patch_size)
        _check_positive_int("section_size", section_size)
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}.")
        if max_length is not None:
            _check_positive_int("max_length", max_length)
            if max_length % patch_size:
                raise ValueError(f"max_length must be a multiple of patch_size={patch_size}; got {max_length}.")
        if truncation and max_length is None:
            raise ValueError("truncation=True needs max_length (the length to truncate to).")
        self.tokenizer = tokenizer
        self.patch_size = patch_size
        self.section_size = section_size
        self.layout = layout
        self.merge_short_sentences = merge_short_sentences
        self.max_length = max_length
        self.truncation = truncation
        self.add_special_tokens = add_special_tokens
        self.pad_token_id = _pad_token_id(tokenizer)
        self.prefix_ids, self.suffix_ids = self._special_token_ids() if add_special_tokens else ([], [])

    def _special_token_ids(self) -> tuple[list[int], list[int]]:
        """The ids the tokenizer puts before and after one sequence (e.g. [CLS] and [SEP])."""
        plain = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        special = self.tokenizer("a", add_special_tokens=True)["input_ids"]
        for start in range(len(special) - len(plain) + 1):
            if special[start : start + len(plain)] == plain:
                return special[:start], special[start + len(plain) :]
        raise ValueError(
            f"cannot tell where {type(self.tokenizer).__name__} puts its special tokens; use add_special_tokens=False."
        )

    def __call__(
        self, texts: str | Sequence[str], return_tensors: str | None = None, return_offsets_mapping: bool = False
    ) -> BatchEncoding:
        """`return_offsets_mapping=True` (fast tokenizers) adds `offset_mapping`: per position of the layout, the
        `(start, end)` characters of the text its token came from; `(0, 0)` for padding and special tokens."""
        single = isinstance(texts, str)
        batch_texts = [texts] if single else list(texts)
        if not batch_texts:
            raise ValueError("texts is empty; pass a str or a non-empty list of str.")
        if return_offsets_mapping and not self.tokenizer.is_fast:
            raise ValueError(
                f"return_offsets_mapping=True needs a fast tokenizer (offsets come from it); "
                f"{type(self.tokenizer).__name__} is a slow one."
            )
        if self.layout == "fixed":
            encoded = self.tokenizer(batch_texts, add_special_tokens=self.add_special_tokens, verbose=False,
                                     return_offsets_mapping=self.tokenizer.is_fast)
            offsets = encoded["offset_mapping"] if self.tokenizer.is_fast else [None] * len(batch_texts)
            documents = [self._pad_to_patches(_with_offsets(ids, spans))
                         for ids, spans in zip(encoded["input_ids"], offsets)]
        else:
            documents = [self._sentence_layout(sentences) for sentences in self._sentences(batch_texts)]
        laid_out = []
        for index, positions in enumerate(documents):
            if not any(token_mask for _, token_mask, _ in positions):
                raise ValueError(f"texts[{index}] has no tokens; remove empty documents first.")
            laid_out.append(self._check_length(index, positions))
        keys = ("input_ids", "attention_mask", "offset_mapping") if return_offsets_mapping else (
            "input_ids", "attention_mask")
        features = [dict(zip(keys, map(list, zip(*positions)))) for positions in laid_out]
        if return_tensors is not None:
            collator = DataCollatorForHierarchical(self.tokenizer, self.patch_size, self.section_size)
            return BatchEncoding(collator(features), tensor_type=return_tensors)
        if single:
            return BatchEncoding(features[0])
        return BatchEncoding({key: [feature[key] for feature in features] for key in keys})

    def _check_length(self, index: int, ids: list[Position]) -> list[Position]:
        if self.max_length is None or len(ids) <= self.max_length:
            return ids
        if self.truncation:
            return ids[: self.max_length]
        raise ValueError(
            f"texts[{index}] needs {len(ids)} tokens in the {self.layout} layout, more than max_length="
            f"{self.max_length}; raise max_length, drop it, or pass truncation=True to keep its first patches."
        )

    def _pad_to_patches(self, tokens: list[Token]) -> list[Position]:
        """Tokens -> (token id, attention mask, offsets) positions, padded to a whole number of patches."""
        padding = (-len(tokens)) % self.patch_size
        return [(token, 1, span) for token, span in tokens] + [(self.pad_token_id, 0, NO_SPAN)] * padding

    def _sentences(self, texts: list[str]) -> list[list[tuple[list[Token], bool]]]:
        """Per document: (tokens, starts a paragraph) for each sentence, special tokens added around the document."""
        all_starts = [sentence_starts(text) for text in texts]
        if self.tokenizer.is_fast:
            encoded = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
            documents = [
                self._split_by_offsets(_with_offsets(ids, offsets), starts)
                for ids, offsets, starts in zip(encoded["input_ids"], encoded["offset_mapping"], all_starts)
            ]
        else:
            pieces = [text[start:end] for text, starts in zip(texts, all_starts)
                      for (start, _), (end, _) in zip(starts, [*starts[1:], (len(text), True)])]
            piece_ids = iter(self.tokenizer(pieces, add_special_tokens=False, verbose=False)["input_ids"])
            documents = [[(_with_offsets(next(piece_ids), None), new_paragraph) for _, new_paragraph in starts]
                         for starts in all_starts]
        prefix, suffix = _with_offsets(self.prefix_ids, None), _with_offsets(self.suffix_ids, None)
        for sentences in documents:  # special tokens go around the first and last sentence that has tokens
            with_tokens = [index for index, (tokens, _) in enumerate(sentences) if tokens] or [0]
            first, last = with_tokens[0], with_tokens[-1]
            sentences[first] = (prefix + sentences[first][0], sentences[first][1])
            sentences[last] = (sentences[last][0] + suffix, sentences[last][1])
        return documents

    @staticmethod
    def _split_by_offsets(tokens: list[Token], starts: list[tuple[int, bool]]) -> list[tuple[list[Token], bool]]:
        """Assign each token to the sentence its first character is in (monotonically, so nothing is reordered)."""
        positions = [position for position, _ in starts]
        sentences: list[tuple[list[Token], bool]] = [([], new_paragraph) for _, new_paragraph in starts]
        sentence = 0
        for token in tokens:
            sentence = max(sentence, bisect.bisect_right(positions, token[1][0]) - 1)
            sentences[sentence][0].append(token)
        return sentences

    def _sentence_layout(self, sentences: list[tuple[list[Token], bool]]) -> list[Position]:
        """Sentences -> patches (one per sentence, long ones split, short ones merged) -> sections per paragraph."""
        paragraphs: list[list[list[Token]]] = []  # paragraph -> patches -> tokens
        for tokens, new_paragraph in sentences:
            if new_paragraph or not paragraphs:
                paragraphs.append([])
            patches = paragraphs[-1]
            if not tokens:
                continue
            if self.merge_short_sentences and patches and len(patches[-1]) + len(tokens) <= self.patch_size:
                patches[-1].extend(tokens)
                continue
            patches.extend(tokens[i : i + self.patch_size] for i in range(0, len(tokens), self.patch_size))
        flat: list[Position] = []
        empty_patch = [(self.pad_token_id, 0, NO_SPAN)] * self.patch_size
        for patches in paragraphs:
            for patch in patches:
                flat.extend(self._pad_to_patches(patch))
            missing_patches = (-len(patches)) % self.section_size
            flat.extend(empty_patch * missing_patches)
        return flat


@dataclass
class DataCollatorForHierarchical:
    """Pads a list of documents to one length, a multiple of ``patch_size * section_size``, and returns tensors.

    ``input_ids`` are padded with the tokenizer's pad id, ``attention_mask``/``token_type_ids`` with 0; a feature without
    ``attention_mask`` gets one (1 for each of its tokens), so the padding is never attended to. ``labels``
    (or ``label``, renamed ``labels``) holding one value per token (a list as long as ``input_ids``) are padded with
    ``label_pad_token_id``; any other label (an int, a float, a multi-label vector) is stacked as it is. Padding only
    appends whole patches/sections at the end, so the sentence layout of every document is kept. Works as
    ``Trainer``'s ``data_collator``.
    """

    tokenizer: PreTrainedTokenizerBase
    patch_size: int
    section_size: int
    label_pad_token_id: int = -100

    def __post_init__(self):
        _check_positive_int("patch_size", self.patch_size)
        _check_positive_int("section_size", self.section_size)
        self.pad_token_id = _pad_token_id(self.tokenizer)

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features or any("input_ids" not in feature for feature in features):
            raise ValueError("features must be a non-empty list of mappings that each have input_ids.")
        features = [{key: value.tolist() if isinstance(value, torch.Tensor) else value
                     for key, value in feature.items()} for feature in features]
        for feature in features:  # without a mask the padding added here would be attended to
            feature.setdefault("attention_mask", [1] * len(feature["input_ids"]))
        lengths = [len(feature["input_ids"]) for feature in features]
        block = self.patch_size * self.section_size
        length = max(block, -(-max(lengths) // block) * block)
        batch = {}
        for key in features[0]:
            values = [feature[key] for feature in features]
            name = "labels" if key == "label" else key
            if key in TOKEN_KEYS or (key in LABEL_KEYS and self._per_token(values, lengths)):
                pad = TOKEN_KEYS.get(key, self.label_pad_token_id)
                pad = self.pad_token_id if pad is None else pad
                batch[name] = torch.tensor([self._pad(key, value, size, length, pad)
                                            for value, size in zip(values, lengths)])
            else:
                try:
                    batch[name] = torch.tensor(values)
                except (TypeError, ValueError) as error:
                    raise ValueError(
                        f"feature {key!r} cannot be batched into a tensor ({error}); remove that column first, e.g. "
                        f"dataset.remove_columns({key!r})."
                    ) from None
        return batch

    @staticmethod
    def _per_token(values: list[Any], lengths: list[int]) -> bool:
        return all(isinstance(value, (list, tuple)) and len(value) == size for value, size in zip(values, lengths))

    @staticmethod
    def _pad(key: str, value: Sequence[int], size: int, length: int, pad: int) -> list[int]:
        if len(value) != size:
            raise ValueError(f"feature {key!r} has {len(value)} entries but input_ids has {size}; they must match.")
        return list(value) + [pad] * (length - size)
