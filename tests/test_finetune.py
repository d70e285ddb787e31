"""training/finetune_classification.py with --lora on a tiny subset of real 20 Newsgroups: Trainer + document
preprocessor + collator + PEFT; the merged model it saves loads with the Auto classes and reproduces its score."""

import torch
from safetensors.torch import load_file
from training_utils import cli

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
