"""Our `evaluate` metric modules load offline from the repo and compute what they promise."""

import math
from pathlib import Path

import evaluate
import pytest

METRICS = Path(__file__).resolve().parent.parent / "metrics"


@pytest.fixture(scope="module")
def accuracy_f1():
    return evaluate.load(str(METRICS / "accuracy_f1"))


@pytest.fixture(scope="module")
def bits_per_byte():
    return evaluate.load(str(METRICS / "bits_per_byte"))


def test_accuracy_and_macro_f1_match_hand_computation(accuracy_f1):
    references = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3]
    predictions = [0, 0, 1, 1, 2, 2, 2, 0, 2, 1]
    # per class (TP, predicted, actual): 0: (2, 3, 3), 1: (1, 3, 2), 2: (3, 4, 4), 3: (0, 0, 1)
    f1 = [2 * 2 / (3 + 3), 2 * 1 / (3 + 2), 2 * 3 / (4 + 4), 0.0]
    result = accuracy_f1.compute(predictions=predictions, references=references)
    assert result["accuracy"] == pytest.approx(6 / 10)
    assert result["macro_f1"] == pytest.approx(sum(f1) / 4)
    # an explicit label set counts a class that never occurs (F1 = 0) in the average
    with_unseen = accuracy_f1.compute(predictions=predictions, references=references, labels=[0, 1, 2, 3, 4])
    assert with_unseen["macro_f1"] == pytest.approx(sum(f1) / 5)
    perfect = accuracy_f1.compute(predictions=[3, 1, 2], references=[3, 1, 2])
    assert perfect == {"accuracy": 1.0, "macro_f1": 1.0}


def test_accuracy_f1_accumulates_batches(accuracy_f1):
    accuracy_f1.add_batch(predictions=[0, 1], references=[0, 0])
    accuracy_f1.add_batch(predictions=[1, 1], references=[1, 1])
    result = accuracy_f1.compute()
    assert result["accuracy"] == pytest.approx(3 / 4)
    assert result["macro_f1"] == pytest.approx((2 * 1 / (1 + 2) + 2 * 2 / (3 + 2)) / 2)


def test_bits_per_byte_is_nll_over_ln2_over_bytes(bits_per_byte):
    nll, num_bytes = [12.5, 3.25, 40.0], [20, 4, 61]
    result = bits_per_byte.compute(nll=nll, num_bytes=num_bytes)
    assert result["bits_per_byte"] == pytest.approx(sum(nll) / math.log(2) / sum(num_bytes))
    assert result["nll"] == pytest.approx(55.75) and result["num_bytes"] == 85
    # a uniform byte model (loss ln 256 per byte) scores exactly 8 bits per byte
    assert bits_per_byte.compute(nll=[100 * math.log(256)], num_bytes=[100])["bits_per_byte"] == pytest.approx(8.0)
    with pytest.raises(ValueError, match="num_bytes"):
        bits_per_byte.compute(nll=[1.0], num_bytes=[0])


def test_metrics_load_by_relative_path_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(METRICS.parent)
    metric = evaluate.load("metrics/accuracy_f1")
    assert metric.compute(predictions=[1, 0], references=[1, 1])["accuracy"] == 0.5
