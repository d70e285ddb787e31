"""Generate the model card (the README.md the Hub shows) of a checkpoint folder written by our training scripts.

The card is rendered from the Jinja template ``model_cards/template.md`` through ``huggingface_hub.ModelCard``, with
metadata (license, pipeline tag, tags, and a ``model-index`` holding the measured evaluation results) in its YAML
header. Inputs: the folder's ``config.json`` (architecture, hierarchy sizes), ``run_summary.json`` (written by the
training scripts: data, hyperparameters, metrics) and ``model.safetensors`` (parameter count).

    python -m model_cards.generate_card runs/xl_news_small/final                    # writes <folder>/README.md
    python -m model_cards.generate_card runs/xl_news_small/final --repo-id you/hier-xl-news-small \\
        --out model_cards/hier-xl-news-small.md
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

TEMPLATE = Path(__file__).with_name("template.md")

# config fields that describe no architecture (token ids, initialisation, runtime switches)
NON_ARCHITECTURE_FIELDS = {"pad_token_id", "bos_token_id", "eos_token_id", "initializer_range", "use_cache",
                           "add_cross_attention", "is_decoder"}


def architecture_fields(config: dict) -> list[str]:
    """The fields of the card's architecture table: ``model_type``, ``architectures``, then every field the config
    class declares (read from the class, so a renamed or new hierarchy field is never dropped), then ``num_labels``."""
    import hier_transformers  # noqa: F401  (registers the hierarchical families with AutoConfig)
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    declared = list(vars(CONFIG_MAPPING[model_type]).get("__annotations__", {})) if model_type in CONFIG_MAPPING else []
    fields = ["model_type", "architectures", *(name for name in declared if name not in NON_ARCHITECTURE_FIELDS)]
    if "id2label" in config:
        fields.append("num_labels")
    return fields


TASKS = {
    "causal-lm": {
        "pipeline_tag": "text-generation",
        "summary": "A hierarchical, Transformer-XL-style causal language model: every token attends to a local window "
                   "of recent tokens at full resolution and to summaries of completed earlier patches, and the "
                   "segment memory is carried across calls, so generation can stream without bound.",
        "procedure": "Pretrained from scratch with `training/pretrain_clm.py` (Accelerate), Transformer-XL style: "
                     "each batch row follows a stream of documents, read segment by segment with the memory carried "
                     "and detached from segment to segment and from step to step, and reset where a document begins "
                     "(truncated backpropagation through time; with `stream: false`, independent blocks); AdamW, "
                     "linear warm-up then cosine decay, gradient clipping.",
        "intended_use": "A small research checkpoint for streaming generation and for studying hierarchical memory. "
                        "It is trained on a tiny corpus and produces English-like text, not reliable facts; do not "
                        "use it for anything where the content matters.",
        "usage": 'from transformers import AutoModelForCausalLM, AutoTokenizer\n\n'
                 'model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)\n'
                 'tokenizer = AutoTokenizer.from_pretrained("{name}", trust_remote_code=True)\n'
                 'inputs = tokenizer("The government said", return_tensors="pt")\n'
                 'output = model.generate(**inputs, max_new_tokens=200, do_sample=True, top_p=0.9)\n'
                 'print(tokenizer.decode(output[0], skip_special_tokens=True))',
    },
    "masked-lm": {
        "pipeline_tag": "fill-mask",
        "summary": "A hierarchical-attention encoder pretrained with masked language modelling: tokens attend inside "
                   "their patch, patch summaries inside their section, section summaries across the document, and "
                   "the contextualised summaries flow back down, so every token sees the whole document.",
        "procedure": "Pretrained from scratch with `training/pretrain_mlm.py` (Accelerate): 15% of the non-padding "
                     "tokens selected (80% [MASK], 10% random, 10% unchanged), documents laid out by the document "
                     "preprocessor (patches aligned with sentences), AdamW, linear warm-up then cosine decay.",
        "intended_use": "A starting point for fine-tuning on long-document classification or tagging. It is trained "
                        "on a tiny corpus: expect to fine-tune before any use.",
        "usage": 'from transformers import AutoModelForMaskedLM, AutoTokenizer\n\n'
                 'model = AutoModelForMaskedLM.from_pretrained("{name}", trust_remote_code=True)\n'
                 'tokenizer = AutoTokenizer.from_pretrained("{name}")\n'
                 'inputs = tokenizer("The minister said the [MASK] would fall.", return_tensors="pt")\n'
                 'logits = model(**inputs).logits',
    },
    "text-classification": {
        "pipeline_tag": "text-classification",
        "summary": "A hierarchical-attention encoder fine-tuned for long-document classification: whole documents "
                   "(far beyond 512 tokens) are read through patch, section and document attention.",
        "procedure": "Fine-tuned with `training/finetune_classification.py` (`transformers.Trainer`), documents laid "
                     "out by the document preprocessor and padded to whole sections by the hierarchical collator.",
        "intended_use": "Topic classification of long English documents of the kind it was trained on. Labels outside "
                        "the training label set cannot be predicted; accuracy on other domains is unmeasured.",
        "usage": 'from transformers import pipeline\n\n'
                 'classify = pipeline("text-classification", model="{name}", trust_remote_code=True)\n'
                 'print(classify("a long document ..."))',
    },
}

METRIC_NAMES = {"loss": "loss (nats per token)", "bits_per_byte": "bits per byte", "perplexity": "perplexity",
                "accuracy": "accuracy", "f1": "macro F1"}



# the baselines our scripts train for comparison, described as what they are
BASELINE_SUMMARIES = {
    "bert": "MiniLM-L6 (BERT) fine-tuned on the first 512 tokens of each document: the truncation baseline the "
            "hierarchical models are compared with (finetune_classification.py --baseline truncated-minilm).",
    "chunked-minilm": "MiniLM-L6 (BERT) fine-tuned over every consecutive 512-token chunk of each document, the "
                      "document's logits the mean of its chunks' (finetune_classification.py --baseline "
                      "chunked-minilm). Saved as a plain BERT classifier: one call scores one chunk; average the "
                      "chunks' logits (training.finetune_classification.ChunkedBertForSequenceClassification) for a "
                      "document.",
    "gpt2": "A same-size GPT-2 (full attention over each training block, learned absolute positions, no memory) "
            "trained identically to the HierarchicalXL model as its full-attention baseline "
            "(pretrain_clm.py with model_type: gpt2).",
    "llama": "A same-size Llama (full attention over each training block, RoPE, no memory) trained identically to "
             "the HierarchicalXL model as its full-attention baseline (pretrain_clm.py with model_type: llama).",
}

def count_parameters(folder: Path) -> int | None:
    """Parameters stored in the folder's safetensors files (tied weights are stored once)."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                shape = handle.get_slice(key).get_shape()
                size = 1
                for dim in shape:
                    size *= dim
                total += size
    return total


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(item) for item in value) if value else "—"
    return "—" if value is None else str(value)


def hierarchy_text(config: dict) -> str:
    if config.get("model_type") == "hierarchical_xl":
        return (f"Tokens are grouped into patches of {config.get('patch_size')} tokens. Each layer lets a token attend "
                f"to the last {config.get('local_window')} tokens at full resolution and to the summaries of up to "
                f"{config.get('max_patch_summaries')} completed earlier patches"
                + (f", older patches folded into section summaries of {config.get('section_size')} patches"
                   if config.get("section_size") else "")
                + ". Positions are rotary over global token positions, so cached memory is reused as is.")
    if config.get("model_type") != "hierarchical":
        return f"No hierarchy: a standard `{config.get('model_type')}` model."
    return (f"Tokens are grouped into patches of {config.get('patch_size')} tokens and patches into sections of "
            f"{config.get('section_size')} patches; each layer runs the levels its `hierarchy_layout` entry names "
            f"(token attention inside a patch, patch attention inside a section, section attention over the document).")


def final_eval_rows(final: dict | None) -> list[tuple[str, str]]:
    """Rows for the held-out whole-document evaluation of a byte-level causal LM (training/pretrain_clm.py)."""
    if not final:
        return []
    if "masked_tokens" in final:  # training/eval_mlm.py
        return masked_accuracy_rows(final)
    rows = [(f"bits per byte, {final['documents']} whole validation documents ({final['bytes']:,} bytes), memory "
             "carried from each document's start", _format(final["bits_per_byte"]))]
    rows += [(f"`{name.replace('_', ' ')}` on the same bytes, each document alone", _format(final[name]))
             for name in ("bzip2_-9", "xz_-9e") if name in final]
    rows += [(f"`{name.replace('_', ' ')}` on the same bytes, the split as one file", _format(value))
             for name, value in final.get("concatenated", {}).items()]
    return rows


def masked_accuracy_rows(final: dict) -> list[tuple[str, str]]:
    """Rows for the held-out whole-document masked-token accuracy of an MLM (training/eval_mlm.py)."""
    where = f"{final['documents']} whole validation documents, {final['masked_tokens']:,} masked tokens"
    labels = {"hierarchical": f"masked-token accuracy, this model reading each whole document ({where})",
              "windows": f"masked-token accuracy, MiniLM (MLM-trained the same way) reading the same masked tokens in "
                         f"independent {final.get('window')}-token windows",
              "difference": "difference, this model minus the windows (paired)"}
    return [(label, f"{_format(final[name]['accuracy'])} (95% CI {_format(final[name]['ci95'][0])} to "
                    f"{_format(final[name]['ci95'][1])})") for name, label in labels.items() if name in final]


def build_card(folder: str | os.PathLike, repo_id: str | None = None, pipeline_tag: str | None = None) -> ModelCard:
    """The model card of a checkpoint folder (needs config.json and run_summary.json)."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    summary = json.loads((folder / "run_summary.json").read_text())
    task = TASKS[summary["task"]]
    name = summary["model_name"]
    dataset = summary["dataset"]
    results = {key: value for key, value in summary.get("eval", {}).items() if key in METRIC_NAMES}
    eval_results = [
        EvalResult(task_type=task["pipeline_tag"], dataset_type=dataset["type"], dataset_name=dataset["name"],
                   dataset_split=dataset.get("split"), metric_type=key, metric_name=METRIC_NAMES[key],
                   metric_value=round(float(value), 6))
        for key, value in results.items()
    ]
    card_data = ModelCardData(
        language="en", license="apache-2.0", library_name="transformers",
        pipeline_tag=pipeline_tag or task["pipeline_tag"],
        tags=["hier-transformers", config.get("model_type", "hierarchical"), "custom_code"],
        model_name=name, eval_results=eval_results or None,
    )
    parameters = count_parameters(folder)
    if "id2label" in config:
        config = {**config, "num_labels": len(config["id2label"])}
    architecture = [(key, _format(config[key])) for key in architecture_fields(config) if key in config]
    if parameters is not None:
        architecture.append(("parameters", f"{parameters:,}"))
    run_config = summary.get("run_config", {})
    hyperparameters = [(key, _format(value)) for key, value in run_config.items()
                       if not isinstance(value, dict) and key not in ("output_dir", "push_to_hub", "model_name")]
    hyperparameters += [("optimizer steps", summary.get("steps")), ("processes", summary.get("num_processes")),
                        ("mixed precision", summary.get("mixed_precision"))]
    hyperparameters = [(key, _format(value)) for key, value in hyperparameters]
    data_description = (f"{dataset['name']}: {summary.get('train_documents', '?')} training documents, "
                        f"{summary.get('validation_documents', '?')} evaluation documents"
                        + (f"; {summary['tokens_seen']:,} tokens seen in training." if summary.get("tokens_seen")
                           else "."))
    summary_text = BASELINE_SUMMARIES.get(run_config.get("baseline"),
                                          BASELINE_SUMMARIES.get(config.get("model_type"), task["summary"]))
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        model_name=name,
        summary=summary_text,
        architecture=architecture,
        hierarchy=hierarchy_text(config),
        data_description=data_description,
        procedure=task["procedure"],
        hyperparameters=hyperparameters,
        results=[(METRIC_NAMES[key], _format(value)) for key, value in results.items()]
        + final_eval_rows(summary.get("final_eval")),
        eval_split=dataset.get("split", "evaluation"),
        dataset_name=dataset["name"],
        intended_use=task["intended_use"],
        usage=task["usage"].format(name=repo_id or str(folder)),
    )


def check_card(card: ModelCard) -> None:
    """Offline validity checks: the YAML header parses, and the card data round-trips through ModelCardData
    (including the model-index built from the eval results)."""
    header = card.content.split("---")[1]
    metadata = yaml.safe_load(header)
    if not isinstance(metadata, dict):
        raise ValueError("model card metadata is not a mapping")
    again = ModelCardData(**metadata)
    if again.to_dict() != card.data.to_dict():
        raise ValueError("model card metadata does not round-trip through ModelCardData")


def write_card(folder: str | os.PathLike, repo_id: str | None = None, pipeline_tag: str | None = None,
               out: str | os.PathLike | None = None) -> Path:
    """Build, check and save the card (to ``<folder>/README.md`` unless ``out`` is given); returns its path."""
    card = build_card(folder, repo_id=repo_id, pipeline_tag=pipeline_tag)
    check_card(card)
    path = Path(out) if out is not None else Path(folder) / "README.md"
    card.save(str(path))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="a checkpoint folder with config.json and run_summary.json")
    parser.add_argument("--repo-id", help="the Hub repo id used in the card's code example")
    parser.add_argument("--out", help="where to write the card (default: <folder>/README.md)")
    args = parser.parse_args(argv)
    print(write_card(args.folder, repo_id=args.repo_id, out=args.out))


if __name__ == "__main__":
    main()
