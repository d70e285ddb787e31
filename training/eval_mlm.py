"""Held-out masked-token accuracy on whole documents, beside MiniLM reading the same documents in 512-token windows.

    python training/eval_mlm.py runs/mlm_long_minilm/final --windows runs/mlm_long_windows/final --update-card
    python training/eval_mlm.py runs/mlm_long_minilm/final --against runs/mlm_long_minilm_topdown_none/final

Every validation document of the run's corpus is laid out as the hierarchical model reads it (the run's layout,
patch/section sizes and ``max_length``) and masked once, with the run's masking and a seed per document. The
hierarchical model reads the whole masked document in one pass. The windowed peer (a ``BertForMaskedLM``, e.g. the
``baseline: minilm-windows`` run of training/pretrain_mlm.py) reads **the same masked tokens** in order, cut into
independent windows of its ``window`` tokens ([CLS] and [SEP] added), so both predict exactly the same positions from
the same corrupted input; only what each can see differs. Accuracy is masked tokens predicted exactly (argmax), summed
over documents; the 95% intervals resample documents (1,000 bootstrap draws, the same draws for both, so the paired
difference has its own interval).

``--update-card`` writes the result into the folder's ``run_summary.json`` (``final_eval``) and its model card.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.common import build_config, load_corpus, store_final_eval  # noqa: E402
from training.pretrain_mlm import (  # noqa: E402
    MLMRunConfig, document_layout, mask_tokens, window_pieces, with_cls_and_sep, word_starts,
)

BOOTSTRAP_DRAWS = 1000


def run_config_of(folder: Path) -> MLMRunConfig:
    summary = json.loads((folder / "run_summary.json").read_text())
    return build_config(MLMRunConfig, summary["run_config"])


def masked_documents(config: MLMRunConfig, tokenizer, max_documents: int | None) -> list[dict[str, torch.Tensor]]:
    """The validation documents in the hierarchical layout of ``config``, masked: ``input_ids`` (masked),
    ``attention_mask``, ``labels`` (-100 where nothing is predicted) and ``original`` ids, each ``[N]``."""
    layout_config = config if config.baseline is None else config.__class__(**{**config.to_dict(), "baseline": None})
    layout, _ = document_layout(layout_config, tokenizer)
    corpus, _ = load_corpus(config)
    texts = [text for text in corpus["validation"]["text"] if text.strip()][:max_documents]
    starts = word_starts(tokenizer) if config.masking == "whole_word" else None
    documents = []
    for index, text in enumerate(texts):
        row = layout([text])
        ids = torch.tensor(row["input_ids"][0])[None]
        mask = torch.tensor(row["attention_mask"][0])[None]
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + index)
        masked, labels = mask_tokens(ids, mask, list(tokenizer.all_special_ids), tokenizer.mask_token_id,
                                     len(tokenizer), config.mlm_probability, generator, starts)
        documents.append({"input_ids": masked[0], "attention_mask": mask[0], "labels": labels[0], "original": ids[0]})
    return documents


def hierarchical_correct(model, document: dict[str, torch.Tensor]) -> int:
    keep = document["labels"] != -100
    logits = model(input_ids=document["input_ids"][None], attention_mask=document["attention_mask"][None],
                   logits_to_keep=keep[None]).logits  # [num_masked, vocab]
    return int((logits.argmax(-1) == document["labels"][keep]).sum())


def windows_correct(model, tokenizer, document: dict[str, torch.Tensor], window: int) -> int:
    """The document's real tokens in order (padding and the layout's special tokens dropped), in windows."""
    special = torch.tensor(tokenizer.all_special_ids)
    real = document["attention_mask"].bool() & ~torch.isin(document["original"], special)
    ids, labels = document["input_ids"][real], document["labels"][real]
    rows = [(with_cls_and_sep(tokenizer, piece.tolist()), [-100, *piece_labels.tolist(), -100])
            for piece, piece_labels in zip(window_pieces(ids, window), window_pieces(labels, window))]
    pad = torch.nn.utils.rnn.pad_sequence
    input_ids = pad([torch.tensor(row) for row, _ in rows], batch_first=True, padding_value=tokenizer.pad_token_id)
    window_labels = pad([torch.tensor(row) for _, row in rows], batch_first=True, padding_value=-100)  # [windows, width]
    attention_mask = pad([torch.ones(len(row), dtype=torch.long) for row, _ in rows], batch_first=True)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # [windows, width, vocab]
    keep = window_labels != -100
    return int((logits[keep].argmax(-1) == window_labels[keep]).sum())


def accuracy_with_interval(correct: np.ndarray, total: np.ndarray, draws: np.ndarray) -> dict[str, float]:
    resampled = correct[draws].sum(1) / total[draws].sum(1)
    low, high = np.percentile(resampled, [2.5, 97.5])
    return {"accuracy": float(correct.sum() / total.sum()), "ci95": [float(low), float(high)]}


def evaluate_folders(folder: str | Path, windows: str | Path | None = None, max_documents: int | None = None,
                     update_card: bool = False, output: str | Path | None = None,
                     against: str | Path | None = None) -> dict:
    """Score the checkpoint in ``folder`` (hierarchical, or a windowed BERT run) and, on the same masked documents,
    the windowed peer ``windows`` and another hierarchical checkpoint ``against`` (e.g. another layout), each with its
    paired difference from ``folder``. Returns the result dict (also written to ``output`` / the card)."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    folder = Path(folder)
    config = run_config_of(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    documents = masked_documents(config, tokenizer, max_documents)
    systems = {}
    if config.baseline is None:
        systems["hierarchical"] = (AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=True), None)
    else:
        systems["windows"] = (AutoModelForMaskedLM.from_pretrained(folder), config.window)
    if windows is not None:
        systems["windows"] = (AutoModelForMaskedLM.from_pretrained(windows), run_config_of(Path(windows)).window)
    if against is not None:
        systems["against"] = (AutoModelForMaskedLM.from_pretrained(against, trust_remote_code=True), None)
    total = np.array([int((document["labels"] != -100).sum()) for document in documents])
    correct = {}
    with torch.inference_mode():
        for name, (model, window) in systems.items():
            model.eval()
            correct[name] = np.array([
                hierarchical_correct(model, document) if window is None
                else windows_correct(model, tokenizer, document, window)
                for document in tqdm(documents, desc=f"masked accuracy: {name}")
            ])
    draws = np.random.default_rng(0).integers(0, len(documents), size=(BOOTSTRAP_DRAWS, len(documents)))
    result = {"documents": len(documents), "masked_tokens": int(total.sum()), "masking": config.masking,
              "window": next((window for _, window in systems.values() if window), None)}
    result.update({name: accuracy_with_interval(hits, total, draws) for name, hits in correct.items()})
    for other, key in (("windows", "difference"), ("against", "difference_against")):
        if "hierarchical" in correct and other in correct:
            difference = (correct["hierarchical"] - correct[other]).astype(float)
            resampled = difference[draws].sum(1) / total[draws].sum(1)
            result[key] = {"accuracy": float(difference.sum() / total.sum()),
                           "ci95": [float(np.percentile(resampled, 2.5)), float(np.percentile(resampled, 97.5))]}
    if against is not None:
        result["against_folder"] = str(against)
    if output is not None:
        Path(output).write_text(json.dumps(result, indent=2))
    if update_card:
        store_final_eval(folder, result, pipeline_tag="fill-mask")
    print(format_result(result))
    return result


def format_result(result: dict) -> str:
    lines = [f"held-out masked-token accuracy, {result['documents']} whole documents, {result['masked_tokens']:,} "
             f"masked tokens ({result['masking']} masking):"]
    labels = {"hierarchical": "hierarchical, whole document", "difference": "difference (paired)",
              "windows": f"MiniLM, independent {result['window']}-token windows",
              "against": f"{result.get('against_folder')}, whole document",
              "difference_against": "difference from it (paired)"}
    for name, label in labels.items():
        if name in result:
            low, high = result[name]["ci95"]
            lines.append(f"  {label}: {result[name]['accuracy']:.4f} (95% CI {low:.4f} to {high:.4f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="a final/ folder of training/pretrain_mlm.py (holds run_summary.json)")
    parser.add_argument("--windows", help="the final/ folder of a `baseline: minilm-windows` run, scored alongside")
    parser.add_argument("--against", help="another hierarchical final/ folder (e.g. another layout), scored alongside")
    parser.add_argument("--documents", type=int, help="score only the first N validation documents")
    parser.add_argument("--update-card", action="store_true", help="write the result into the folder's model card")
    parser.add_argument("--output", help="write the result as JSON here")
    args = parser.parse_args(argv)
    return evaluate_folders(args.folder, args.windows, args.documents, args.update_card, args.output, args.against)


if __name__ == "__main__":
    main()
