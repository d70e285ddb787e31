"""Bits per byte of a language model, as an `evaluate` module (loads offline from this folder)."""

import math

import datasets
import evaluate

_DESCRIPTION = """
Bits per byte (BPB): the total negative log-likelihood of a text in bits divided by its length in UTF-8 bytes,
BPB = sum(nll) / ln(2) / sum(num_bytes). It compares models with different tokenizers (a byte-level model's BPB is its
per-token loss / ln 2). Feed it one row per evaluated chunk: the chunk's summed NLL in nats (e.g. the mean
cross-entropy times the number of predicted tokens) and the number of bytes those tokens cover.
"""

_KWARGS_DESCRIPTION = """
Args:
    nll (`list[float]`): summed negative log-likelihood of each chunk, in nats.
    num_bytes (`list[int]`): UTF-8 bytes covered by each chunk's predicted tokens.
Returns:
    bits_per_byte (`float`), nll (`float`, total nats), num_bytes (`int`, total).
Example:
    >>> metric = evaluate.load("metrics/bits_per_byte")
    >>> metric.compute(nll=[0.6931471805599453], num_bytes=[1])
    {'bits_per_byte': 1.0, 'nll': 0.6931471805599453, 'num_bytes': 1}
"""


class BitsPerByte(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"nll": datasets.Value("float64"), "num_bytes": datasets.Value("int64")}),
        )

    def _compute(self, nll, num_bytes):
        total_bytes = int(sum(num_bytes))
        if total_bytes <= 0 or any(count < 0 for count in num_bytes):
            raise ValueError(f"num_bytes must be non-negative with a positive total; got a total of {total_bytes}.")
        total_nll = float(sum(nll))
        return {"bits_per_byte": total_nll / math.log(2) / total_bytes, "nll": total_nll, "num_bytes": total_bytes}
