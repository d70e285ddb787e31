"""The downstream comparison: the chunked MiniLM baseline (mean of its 512-token chunks' logits), the news-outlet task
through the fine-tuning command, and training/compare_classifiers.py end to end (bootstrap intervals, paired
differences) on a tiny subset."""

import json

import numpy as np
import pytest
import torch
from training_utils import TINY_FINETUNE_RUN, run_script, summary

from training import compare_classifiers as compare
from training.common import parse_run_args
from training import finetune_classification as finetune


@pytest.fixture(scope="module")
def minilm_one_layer():
    from transformers import AutoTokenizer, BertForSequenceClassification

    from hier_transformers.warm_start import minilm_path

    torch.manual_seed(0)
    chunked = finetune.ChunkedBertForSequenceClassification.from_pretrained(
        minilm_path(), num_labels=3, num_hidden_layers=1).eval()
    plain = BertForSequenceClassification(chunked.config).eval()
    plain.load_state_dict(chunked.state_dict())
    return chunked, plain, AutoTokenizer.from_pretrained(minilm_path())


def test_chunked_document_logits_are_the_mean_of_its_chunk_logits(minilm_one_layer):
    chunked, plain, tokenizer = minilm_one_layer
    words = "the committee met again on tuesday and the vote was postponed because members disagreed".split()
    long_text = " ".join(words[i % len(words)] for i in range(1300))  # 1,300 tokens: chunks of 510, 510, 280
    texts = [long_text, "a short post about hockey"]
    chunks = finetune.chunk_documents(tokenizer, texts)["input_ids"]
    assert [len(chunk) for chunk in chunks[0]] == [512, 512, 282] and len(chunks[1]) == 1
    assert [token for chunk in chunks[0] for token in chunk[1:-1]] == tokenizer(long_text, add_special_tokens=False)[
        "input_ids"]  # consecutive, nothing lost or repeated
    batch = finetune.DataCollatorForChunks(tokenizer)([{"input_ids": ids, "label": 0} for ids in chunks])
    with torch.no_grad():
        documents = chunked(**batch).logits  # [2, 3], the short document's chunk padded to 512 in this batch
        alone = [torch.stack([plain(input_ids=torch.tensor([chunk])).logits[0] for chunk in document]).mean(0)
                 for document in chunks]  # every chunk on its own, no padding
    torch.testing.assert_close(documents, torch.stack(alone), atol=1e-5, rtol=1e-5)


def test_one_chunk_document_gives_the_truncated_baseline_logits(minilm_one_layer):
    chunked, plain, tokenizer = minilm_one_layer
    text = " ".join(f"w{i}" for i in range(2000))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:510]
    text = tokenizer.decode(ids)  # exactly 510 tokens: one 512-token chunk with [CLS] and [SEP]
    chunks = finetune.chunk_documents(tokenizer, [text])["input_ids"]
    assert [len(chunk) for chunk in chunks[0]] == [512]
    truncated = tokenizer([text], truncation=True, max_length=finetune.BASELINE_MAX_LENGTH, return_tensors="pt")
    with torch.no_grad():
        expected = plain(**truncated).logits
        got = chunked(**finetune.DataCollatorForChunks(tokenizer)([{"input_ids": chunks[0]}])).logits
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_resampled_scores_match_the_metric_module():
    from transformers import EvalPrediction

    rng = np.random.default_rng(1)
    references = rng.integers(0, 5, size=60)
    predictions = np.where(rng.random(60) < 0.6, references, rng.integers(0, 6, size=60))  # class 5: predicted only
    identity = np.arange(60)[None]
    scores = compare.resampled_scores(predictions, references, identity)
    module = finetune.metrics_function()(EvalPrediction(predictions=predictions, label_ids=references))
    assert scores["accuracy"][0] == pytest.approx(module["accuracy"])
    assert scores["macro_f1"][0] == pytest.approx(module["f1"])
    # a resample in which classes 3-5 never occur averages over the classes it has, like the module on those rows
    rows = np.flatnonzero((references < 3) & (predictions < 3))
    sub = compare.resampled_scores(predictions, references, rows[None])
    module = finetune.metrics_function()(EvalPrediction(predictions=predictions[rows], label_ids=references[rows]))
    assert sub["macro_f1"][0] == pytest.approx(module["f1"])


def test_news_outlets_train_through_the_command(tmp_path):
    from hier_transformers.data import load_news_articles

    run_script("finetune_classification.py", {**TINY_FINETUNE_RUN, "dataset": "news_outlets", "output_dir": tmp_path,
                                              "max_train_documents": 18, "max_test_documents": 9,
                                              "max_length": 512, "truncation": "true"})
    result = summary(tmp_path)
    names = load_news_articles()["train"].features["label"].names
    assert result["labels"] == names and len(names) == 9 and "bbc.co.uk" in names
    assert result["train_documents"] == 18 and result["validation_documents"] == 9
    saved = json.loads((tmp_path / "final" / finetune.PREDICTIONS_FILE).read_text())
    test = finetune.load_documents(finetune.FinetuneConfig(dataset="news_outlets", max_train_documents=18,
                                                           max_test_documents=9))[0]["test"]
    assert saved["label_ids"] == list(test["label"])  # the test articles, in the dataset's order
    accuracy = np.mean(np.asarray(saved["predictions"]) == np.asarray(saved["label_ids"]))
    assert result["eval"]["accuracy"] == pytest.approx(accuracy)


TASK = """
categories: [rec.sport.hockey, sci.med]
max_train_documents: 8
max_test_documents: 12
model: {num_hidden_layers: 1, patch_size: 16, section_size: 2, hidden_dropout_prob: 0.0, attention_dropout: 0.0}
layout: fixed
max_steps: 2
learning_rate: 1.0e-3
per_device_train_batch_size: 4
per_device_eval_batch_size: 8
eval_strategy: "no"
"""


def tiny_mlm_checkpoint(folder):
    """A tiny hierarchical MLM checkpoint with MiniLM's tokenizer (what training/pretrain_mlm.py saves, in small)."""
    from transformers import AutoTokenizer

    from hier_transformers import HierarchicalConfig, HierarchicalForMaskedLM
    from hier_transformers.warm_start import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config = HierarchicalConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=17, patch_size=16, section_size=2)
    HierarchicalForMaskedLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_compare_runs_end_to_end_with_paired_intervals(tmp_path):
    from transformers import AutoModelForSequenceClassification

    task = tmp_path / "task.yaml"
    task.write_text(TASK)
    results = compare.main(["--config", str(task), "--mlm-checkpoint", str(tiny_mlm_checkpoint(tmp_path / "mlm")),
                            "--output-dir", str(tmp_path / "out"), "--systems", "mlm-checkpoint", "chunked-minilm",
                            "--parallel", "2", "--resamples", "300", "--", "--seed", "1"])
    systems = results["systems"]
    assert list(systems) == ["mlm-checkpoint", "chunked-minilm"]
    for name, system in systems.items():
        saved = json.loads((tmp_path / "out" / name / "final" / finetune.PREDICTIONS_FILE).read_text())
        assert len(saved["predictions"]) == 12 and "--seed" in system["command"]  # overrides reach every run
        assert system["accuracy"] == pytest.approx(np.mean(np.equal(saved["predictions"], saved["label_ids"])))
        for metric in compare.METRICS:
            low, high = system[f"{metric}_95"]
            assert 0 <= low <= system[metric] <= high <= 1
    difference = systems["chunked-minilm"]["difference_vs_reference"]
    for metric in compare.METRICS:
        assert difference[metric]["value"] == pytest.approx(systems["mlm-checkpoint"][metric]
                                                            - systems["chunked-minilm"][metric])
        low, high = difference[metric]["interval_95"]
        assert low <= difference[metric]["value"] <= high
    table = (tmp_path / "out" / "comparison.md").read_text()
    assert table.count("| mlm-checkpoint |") == 1 and table.count("| chunked-minilm |") == 1

    # the chunked baseline is saved as a plain BERT classifier with the task's depth and dropout; read again chunk by
    # chunk it gives back the predictions the run saved
    final = tmp_path / "out" / "chunked-minilm" / "final"
    bert = json.loads((final / "config.json").read_text())
    assert bert["architectures"] == ["BertForSequenceClassification"] and bert["num_hidden_layers"] == 1
    assert bert["hidden_dropout_prob"] == 0.0 and bert["attention_probs_dropout_prob"] == 0.0
    assert type(AutoModelForSequenceClassification.from_pretrained(final)).__name__ == "BertForSequenceClassification"
    assert "mean of its chunks'" in (final / "README.md").read_text()  # the card says what the baseline is
    model = finetune.ChunkedBertForSequenceClassification.from_pretrained(final).eval()
    config, _ = parse_run_args(finetune.FinetuneConfig, ["--config", str(task), "--seed", "1"])
    test = finetune.load_documents(config)[0]["test"]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(final)
    chunks = finetune.chunk_documents(tokenizer, list(test["text"]))["input_ids"]
    with torch.no_grad():
        predictions = [model(**finetune.DataCollatorForChunks(tokenizer)([{"input_ids": ids}])).logits.argmax(-1).item()
                       for ids in chunks]
    assert predictions == json.loads((final / finetune.PREDICTIONS_FILE).read_text())["predictions"]
