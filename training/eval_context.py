"""The context curve: held-out bits per byte bucketed by position in long documents, memory carried vs reset.

For every checkpoint folder given (a `runs/<name>/final` written by training/pretrain_clm.py), each held-out document
is read from its first byte to its last and every byte is scored (`training/lm_eval.py`):

- HierarchicalXL twice: memory carried from the document's start, and memory reset every ``--reset_every`` bytes;
- Llama / GPT-2 (full attention) in consecutive windows of the context they were trained at;
- Mistral with its sliding-window cache carried through the document.

    OMP_NUM_THREADS=1 python training/eval_context.py runs/xl_news_small/final runs/llama_news_small/final \\
        --corpus shakespeare --split validation --output runs/context/news_small.json --plot runs/context/news_small.png

Prints a table and writes JSON (bits per byte overall and per position bucket, 95% block-bootstrap intervals, the
paired carried-minus-reset difference with its interval, and ``bzip2 -9`` / ``xz -9e`` on the same bytes) and a PNG.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.common import CORPORA  # noqa: E402
from training.pretrain_clm import EVAL_SEGMENT_LENGTH  # noqa: E402
from training.lm_eval import (  # noqa: E402
    bootstrap_interval,
    bucket_names,
    compressor_bits_per_byte,
    encode_documents,
    score_documents,
)



def load_texts(corpus: str, split: str, seed: int, max_documents: int | None) -> list[str]:
    from hier_transformers.data import load_news_articles, load_shakespeare

    if corpus not in CORPORA:
        raise ValueError(f"--corpus must be one of {CORPORA}, got {corpus!r}")
    data = load_shakespeare(seed=seed) if corpus == "shakespeare" else load_news_articles(seed=seed)
    if split not in data:
        raise ValueError(f"--split must be one of {sorted(data)}, got {split!r}")
    texts = list(data[split]["text"])
    return texts[:max_documents] if max_documents else texts


def describe(folder: Path) -> dict:
    """Model type and the lengths it was trained with, from the run summary next to the weights."""
    summary_file = folder / "run_summary.json"
    if not summary_file.is_file():
        raise FileNotFoundError(f"{summary_file} is missing: pass a `final/` folder written by training/pretrain_clm.py")
    run = json.loads(summary_file.read_text())["run_config"]
    return {"model_type": run.get("model_type", "hierarchical_xl"), "block_size": run["block_size"],
            "segment_length": run["segment_length"], "model_name": run.get("model_name", folder.parent.name)}


def curves_for(folder: Path, documents, reset_every: int, batch_size: int) -> tuple[str, dict, dict]:
    from transformers import AutoModelForCausalLM

    info = describe(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    if info["model_type"] == "hierarchical_xl":  # the XL memory gives the same logits however a text is cut
        modes = {"memory carried": {"kind": "hierarchical_xl", "segment_length": EVAL_SEGMENT_LENGTH},
                 f"memory reset every {reset_every}": {"kind": "hierarchical_xl", "reset_every": reset_every,
                                                       "segment_length": min(EVAL_SEGMENT_LENGTH, reset_every)}}
    elif info["model_type"] == "mistral":
        modes = {f"sliding window {model.config.sliding_window}": {"kind": "sliding", "segment_length": 512}}
    else:
        modes = {f"full attention, windows of {info['block_size']}": {"kind": "full", "context": info["block_size"]}}
    scored = {name: score_documents(model, documents, batch_size=batch_size, **options)
              for name, options in modes.items()}
    result = {"model_type": info["model_type"], "parameters": sum(p.numel() for p in model.parameters()),
              "trained_block_size": info["block_size"], "curves": {}}
    for name, scores in scored.items():
        low, high = bootstrap_interval(scores)
        result["curves"][name] = {"bits_per_byte": scores.bits_per_byte(), "interval_95": [low, high],
                                  "by_position": scores.by_position()}
    if len(scored) == 2:
        carried, reset = scored.values()
        low, high = bootstrap_interval(carried, reset)
        result["carried_minus_reset"] = {"bits_per_byte": carried.bits_per_byte() - reset.bits_per_byte(),
                                         "interval_95": [low, high],
                                         "by_position": {bucket: carried.by_position()[bucket]["bits_per_byte"]
                                                         - reset.by_position()[bucket]["bits_per_byte"]
                                                         for bucket in carried.by_position()}}
    return info["model_name"], result, scored


def paired_difference(scores, first) -> dict:
    """`scores` - `first` on the same bytes: bits per byte, its 95% block-bootstrap interval and the per-bucket gaps."""
    low, high = bootstrap_interval(scores, first)
    return {"bits_per_byte": scores.bits_per_byte() - first.bits_per_byte(), "interval_95": [low, high],
            "by_position": {bucket: scores.by_position()[bucket]["bits_per_byte"]
                            - first.by_position()[bucket]["bits_per_byte"] for bucket in scores.by_position()}}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    buckets = bucket_names()
    figure, axis = plt.subplots(figsize=(8, 4.5))
    for model_name, result in results["models"].items():
        for curve_name, curve in result["curves"].items():
            names = [bucket for bucket in buckets if bucket in curve["by_position"]]
            axis.plot(range(len(names)), [curve["by_position"][b]["bits_per_byte"] for b in names], marker="o",
                      label=f"{model_name}: {curve_name}")
    for key, style, where in (("compressors", ":", "each document alone"),
                              ("compressors_concatenated", "-.", "the split as one file")):
        for name, value in results.get(key, {}).items():
            axis.axhline(value, linestyle=style, color="gray")
            axis.annotate(f"{name.replace('_', ' ')} ({where})", (0, value), fontsize=7, color="gray", va="bottom")
    axis.set_xticks(range(len(buckets)), buckets)
    axis.set_xlabel("bytes from the document's start")
    axis.set_ylabel("held-out bits per byte")
    axis.set_title(f"context curve: {results['corpus']} {results['split']} "
                   f"({results['documents']} documents, {results['bytes']:,} bytes)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def table(results: dict) -> str:
    buckets = bucket_names()
    lines = ["| model | reading | bpb (95% CI) | " + " | ".join(buckets) + " |",
             "|---|---|---|" + "---|" * len(buckets)]
    for model_name, result in results["models"].items():
        for curve_name, curve in result["curves"].items():
            cells = [f"{curve['by_position'][b]['bits_per_byte']:.3f}" if b in curve["by_position"] else ""
                     for b in buckets]
            low, high = curve["interval_95"]
            lines.append(f"| {model_name} | {curve_name} | {curve['bits_per_byte']:.3f} ({low:.3f}–{high:.3f}) | "
                         + " | ".join(cells) + " |")
        if "carried_minus_reset" in result:
            diff = result["carried_minus_reset"]
            cells = [f"{diff['by_position'][b]:+.3f}" if b in diff["by_position"] else "" for b in buckets]
            low, high = diff["interval_95"]
            lines.append(f"| {model_name} | carried − reset | {diff['bits_per_byte']:+.3f} ({low:+.3f}…{high:+.3f}) | "
                         + " | ".join(cells) + " |")
        if "minus_first" in result:
            diff = result["minus_first"]
            cells = [f"{diff['by_position'][b]:+.3f}" if b in diff["by_position"] else "" for b in buckets]
            low, high = diff["interval_95"]
            lines.append(f"| {model_name} − {diff['model']} | {diff['reading']} | {diff['bits_per_byte']:+.3f} "
                         f"({low:+.3f}…{high:+.3f}) | " + " | ".join(cells) + " |")
    anchors = ", ".join(f"{name.replace('_', ' ')} {value:.3f}" for name, value in results["compressors"].items())
    return "\n".join(lines) + f"\n\nSame bytes, each document compressed on its own: {anchors}."


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="final/ folders written by training/pretrain_clm.py (each later one is also compared with the first, paired, on the same bytes)")
    parser.add_argument("--corpus", default="shakespeare", choices=CORPORA)
    parser.add_argument("--split", default="validation")
    parser.add_argument("--seed", type=int, default=0, help="the split seed the models were trained with")
    parser.add_argument("--reset_every", type=int, default=512, help="bytes between memory resets (the ablation)")
    parser.add_argument("--max_documents", type=int, default=None)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--output", type=Path, default=None, help="JSON results")
    parser.add_argument("--plot", type=Path, default=None, help="PNG of the curves")
    args = parser.parse_args(argv)
    if args.reset_every < 1:
        parser.error("--reset_every must be >= 1")
    from transformers import AutoTokenizer

    texts = load_texts(args.corpus, args.split, args.seed, args.max_documents)
    tokenizer = AutoTokenizer.from_pretrained(args.folders[0], trust_remote_code=True)
    documents = encode_documents(tokenizer, texts)
    results = {"corpus": args.corpus, "split": args.split, "documents": len(texts),
               "bytes": sum(len(text.encode()) for text in texts), "reset_every": args.reset_every,
               "compressors": compressor_bits_per_byte(texts),
               "compressors_concatenated": compressor_bits_per_byte(["\n\n".join(texts)]), "models": {}}
    first = None  # the first model's first reading: every other model's same reading is compared with it, paired
    for folder in args.folders:
        name, result, scored = curves_for(folder, documents, args.reset_every, args.batch_size)
        reading, scores = next(iter(scored.items()))
        if first is None:
            first = (name, reading, scores)
        elif reading == first[1]:
            result["minus_first"] = {"model": first[0], "reading": reading, **paired_difference(scores, first[2])}
        results["models"][name] = result
    print(table(results))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2))
    if args.plot:
        plot(results, args.plot)
    return results


if __name__ == "__main__":
    main()
