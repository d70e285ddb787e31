"""Accuracy and macro-F1 for single-label classification, as an `evaluate` module (loads offline from this folder)."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Accuracy (fraction of predictions equal to the reference) and macro-F1 (the unweighted mean over classes of the
per-class F1 = 2 * precision * recall / (precision + recall), taken as 0 for a class with no true positives). The
classes are those that occur in the references or the predictions, or `labels` when given (so a class that was never
predicted still counts, with F1 = 0).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]`): predicted class ids.
    references (`list[int]`): true class ids.
    labels (`list[int]`, *optional*): the classes macro-F1 averages over.
Returns:
    accuracy (`float`), macro_f1 (`float`).
Example:
    >>> metric = evaluate.load("metrics/accuracy_f1")
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666, 'macro_f1': 0.6666666666666666}
"""


class AccuracyF1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, labels=None):
        predictions, references = np.asarray(predictions), np.asarray(references)
        if len(predictions) == 0:
            raise ValueError("predictions is empty: accuracy and F1 are undefined.")
        classes = np.union1d(predictions, references) if labels is None else np.asarray(labels)
        true_positive = np.array([np.sum((predictions == c) & (references == c)) for c in classes])
        predicted = np.array([np.sum(predictions == c) for c in classes])
        actual = np.array([np.sum(references == c) for c in classes])
        # F1 = 2 TP / (predicted + actual); 0 where a class has neither predictions nor references
        f1 = np.divide(2 * true_positive, predicted + actual, out=np.zeros(len(classes)), where=predicted + actual > 0)
        return {"accuracy": float(np.mean(predictions == references)), "macro_f1": float(np.mean(f1))}
