"""Explain a hierarchical sequence classifier's prediction for one document: which sentences and words decided it.

    python training/explain.py CHECKPOINT --text-file post.txt --html out.html --png out.png [--trust-remote-code]

Prints the predicted label, its probability and the most important sentences as one JSON line; `--html` writes a
self-contained page with highlighted sentences and words, `--png` a picture of the section and patch attention.
The method is described in `hier_transformers/explain.py` and docs/explain.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `hier_transformers` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hier_transformers.explain import explain, explanation_html, plot_attention  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a saved sequence-classification folder (or Hub id) with its tokenizer")
    parser.add_argument("--text-file", required=True, type=Path, help="the document, UTF-8 text")
    parser.add_argument("--html", type=Path, help="write the highlighted page here")
    parser.add_argument("--png", type=Path, help="write the attention picture here")
    parser.add_argument("--layout", choices=("sentence", "fixed"), default="sentence",
                        help="DocumentPreprocessor layout (the one the model was trained with)")
    parser.add_argument("--max-length", type=int, default=None, help="truncate longer documents (whole patches)")
    parser.add_argument("--trust-remote-code", action="store_true", help="load the model with its own code")
    args = parser.parse_args(argv)
    if not args.text_file.is_file():
        parser.error(f"--text-file {args.text_file} does not exist")

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    model = AutoModelForSequenceClassification.from_pretrained(args.checkpoint,
                                                               trust_remote_code=args.trust_remote_code)
    explanation = explain(model, tokenizer, args.text_file.read_text(encoding="utf-8"), layout=args.layout,
                          max_length=args.max_length)
    if args.html:
        args.html.write_text(explanation_html(explanation), encoding="utf-8")
    if args.png:
        plot_attention(explanation, args.png)
    result = {"label": explanation.label, "probability": explanation.probabilities[explanation.label],
              "top_sentences": explanation.top_sentences(3), "method": explanation.method}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
