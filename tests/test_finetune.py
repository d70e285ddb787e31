"""training/finetune_classification.py with --lora on a tiny subset of real 20 Newsgroups: Trainer + document
preprocessor + collator + PEFT; the merged model it saves loads with the Auto classes and reproduces its score."""

import pytest
import torch
from safetensors.torch import load_file
from training_utils import TINY_FINETUNE_RUN, cli, run_script

from training import finetune_classification as finetune

CATEGORIES = ["rec.sport.hockey", "sci.med"]
RUN = {
    "categories": f"[{', '.join(CATEGORIES)}]", "max_train_documents": 16, "max_test_documents": 8, "init": "minilm",
    "model.num_hidden_layers": 1, "model.patch_size": 64, "model.section_size": 4, "lora": "true",
    "learning_rate": 1e-3, "max_steps": 3, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 8,
    "eval_strategy": "no", "report_to": "[]", "logging_steps": 1, "model_name": "tiny-lora",
}


def test_lora_finetune_on_real_newsgroups(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hier_transformers.preprocessing import DocumentPreprocessor
    from hier_transformers.warm_start import minilm_path

    result = finetune.main(cli({**RUN, "output_dir": tmp_path}))
    assert result["steps"] == 3 and result["labels"] == CATEGORIES
    final = tmp_path / "final"
    model = AutoModelForSequenceClassification.from_pretrained(final, trust_remote_code=True).eval()
    assert list(model.config.id2label.values()) == CATEGORIES
    assert not any(path.name.startswith("adapter") for path in final.iterdir())  # LoRA merged into the weights

    # LoRA touched q/v only: k_proj of the token level is still MiniLM's, q_proj moved
    saved = load_file(final / "model.safetensors")
    minilm = load_file(minilm_path() / "model.safetensors")
    prefix = next(key for key in minilm if key.endswith("encoder.layer.0.attention.self.key.weight"))
    prefix = prefix[: -len("encoder.layer.0.attention.self.key.weight")]
    k_name = next(key for key in saved if "layers.0.token_level" in key and key.endswith("k_proj.weight"))
    q_name = k_name.replace("k_proj", "q_proj")
    torch.testing.assert_close(saved[k_name], minilm[prefix + "encoder.layer.0.attention.self.key.weight"])
    assert not torch.allclose(saved[q_name], minilm[prefix + "encoder.layer.0.attention.self.query.weight"])

    # the saved model reproduces the accuracy Trainer measured on the (whole, untruncated) test documents
    data, _ = finetune.load_documents(finetune.FinetuneConfig(categories=CATEGORIES, max_train_documents=16,
                                                              max_test_documents=8))
    tokenizer = AutoTokenizer.from_pretrained(final)
    batch = DocumentPreprocessor(tokenizer, 64, 4)(data["test"]["text"], return_tensors="pt")
    assert batch["input_ids"].shape[1] > 512  # whole documents, beyond a BERT window
    with torch.no_grad():
        predictions = model(**batch).logits.argmax(-1)
    accuracy = (predictions == torch.tensor(data["test"]["label"])).float().mean().item()
    assert abs(accuracy - result["eval"]["accuracy"]) < 1e-6
    assert (final / "README.md").read_text().count("accuracy") >= 2


# --- the user's own files: one label vocabulary from train, through the command ---------------------------------
TRAIN_ROWS = [("the match ended with a late goal and the crowd cheered", "sports"),
              ("the election results came in overnight and the minister spoke", "politics"),
              ("a new telescope found a distant galaxy full of young stars", "science")] * 4
# a subset of the training labels, in another order: encoded per split, science/sports would become 0/1
TEST_ROWS = [TRAIN_ROWS[2], TRAIN_ROWS[0], TRAIN_ROWS[2]]
INT_LABELS = {"sports": 7, "politics": 3, "science": 5}  # names "3", "5", "7" -> ids 0, 1, 2


def write_rows(path, rows, int_labels: bool):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    labels = [INT_LABELS[label] if int_labels else label for _, label in rows]
    texts = [text for text, _ in rows]
    if path.suffix == ".csv":
        lines = ["text,label", *(f'"{text}",{label}' for text, label in zip(texts, labels))]
        path.write_text("\n".join(lines) + "\n")
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({"text": text, "label": label}) + "\n" for text, label in zip(texts, labels)))
    else:
        pq.write_table(pa.table({"text": texts, "label": labels}), path)
    return path


@pytest.mark.parametrize("int_labels", [False, True], ids=["text-labels", "int-labels"])
@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_own_files_train_with_one_label_vocabulary(tmp_path, suffix, int_labels):
    import json

    train = write_rows(tmp_path / f"train{suffix}", TRAIN_ROWS, int_labels)
    test = write_rows(tmp_path / f"test{suffix}", TEST_ROWS, int_labels)
    run_script("finetune_classification.py", {**TINY_FINETUNE_RUN, "output_dir": tmp_path / "run",
                                              "data_files": f"{{train: {train}, test: {test}}}"})
    final = tmp_path / "run" / "final"
    names = ["3", "5", "7"] if int_labels else ["politics", "science", "sports"]
    assert json.loads((final / "config.json").read_text())["id2label"] == {str(i): name for i, name in enumerate(names)}
    result = json.loads((final / "run_summary.json").read_text())
    assert result["labels"] == names and result["validation_documents"] == len(TEST_ROWS)
    # the reported accuracy is the saved model's on the test labels mapped through the TRAINING vocabulary
    expected = [names.index(str(INT_LABELS[label]) if int_labels else label) for _, label in TEST_ROWS]
    assert result["eval"]["accuracy"] == pytest.approx(saved_model_accuracy(final, TEST_ROWS, expected))


def saved_model_accuracy(final, rows, label_ids) -> float:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hier_transformers.preprocessing import DocumentPreprocessor

    model = AutoModelForSequenceClassification.from_pretrained(final, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(final)
    correct = 0
    for (text, _), label in zip(rows, label_ids):  # one document per batch: no padding involved
        batch = DocumentPreprocessor(tokenizer, model.config.patch_size, model.config.section_size)([text],
                                                                                                   return_tensors="pt")
        with torch.no_grad():
            correct += int(model(**batch).logits.argmax(-1).item() == label)
    return correct / len(rows)


def test_test_labels_unknown_to_training_are_a_named_error(tmp_path):
    train = write_rows(tmp_path / "train.csv", TRAIN_ROWS[:2], int_labels=False)  # sports, politics
    test = write_rows(tmp_path / "test.csv", TEST_ROWS, int_labels=False)  # science is new
    with pytest.raises(AssertionError, match=r"labels the training split does not have: \['science'\]"):
        run_script("finetune_classification.py", {**TINY_FINETUNE_RUN, "output_dir": tmp_path / "run",
                                                  "data_files": f"{{train: {train}, test: {test}}}"})
