"""Hugging Face integration of the hierarchical encoder: Auto classes, saving, remote code, Hub cache, Trainer,
PEFT and pipelines."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from conftest import last_json_line, run_without_package
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    Trainer,
    TrainingArguments,
    pipeline,
)

from hier_transformers import (
    HierarchicalConfig,
    HierarchicalForMaskedLM,
    HierarchicalForSequenceClassification,
    HierarchicalForTokenClassification,
    HierarchicalModel,
    minilm_path,
)

LABELS = {0: "sports", 1: "politics", 2: "science"}


def tiny_config(**overrides) -> HierarchicalConfig:
    fields = dict(
        vocab_size=120,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=9,
        patch_size=8,
        section_size=2,
        hidden_dropout_prob=0.0,
        attention_dropout=0.0,
        id2label=LABELS,
        label2id={name: index for index, name in LABELS.items()},
    )
    fields.update(overrides)
    return HierarchicalConfig(**fields)


def test_auto_classes_resolve():
    fields = {k: v for k, v in tiny_config().to_dict().items() if k != "model_type"}
    config = AutoConfig.for_model("hierarchical", **fields)
    assert isinstance(config, HierarchicalConfig)
    for auto_class, expected in (
        (AutoModel, HierarchicalModel),
        (AutoModelForSequenceClassification, HierarchicalForSequenceClassification),
        (AutoModelForMaskedLM, HierarchicalForMaskedLM),
        (AutoModelForTokenClassification, HierarchicalForTokenClassification),
    ):
        assert type(auto_class.from_config(config)) is expected


def test_save_and_load_with_safetensors_only_and_remote_code(tmp_path):
    model = HierarchicalForSequenceClassification(tiny_config(summary_type="attention_pooling")).eval()
    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    files = sorted(path.name for path in folder.iterdir())
    assert files == [
        "config.json", "configuration_checks.py", "configuration_hierarchical.py", "model.safetensors",
        "modeling_blocks.py", "modeling_hierarchical.py",
    ], files
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert auto_map["AutoConfig"] == "configuration_hierarchical.HierarchicalConfig"
    assert auto_map["AutoModelForSequenceClassification"] == "modeling_hierarchical.HierarchicalForSequenceClassification"

    input_ids = torch.randint(1, 120, (2, 37))
    expected = model(input_ids).logits
    loaded = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    # same weights; the loaded tensors sit at other addresses, which can change CPU kernel blocking in the last bit
    torch.testing.assert_close(loaded(input_ids).logits, expected, atol=1e-6, rtol=0)

    # the same folder as a Hub repo in a local cache, read offline by repo id
    cache = tmp_path / "hub"
    snapshot = cache / "models--org--tiny-hierarchical" / "snapshots" / ("a" * 40)
    shutil.copytree(folder, snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("a" * 40)

    stdout = run_without_package(
        f"""
        import json, torch
        from transformers import AutoModelForSequenceClassification
        input_ids = torch.tensor({input_ids.tolist()})
        results = {{}}
        for name in ({str(folder)!r}, "org/tiny-hierarchical"):
            model = AutoModelForSequenceClassification.from_pretrained(name, trust_remote_code=True).eval()
            with torch.no_grad():
                results[name] = model(input_ids).logits.tolist()
        results["module"] = type(model).__module__
        print(json.dumps(results))
        """,
        env={"HF_HUB_CACHE": str(cache), "HF_MODULES_CACHE": str(tmp_path / "modules")},
    )
    results = last_json_line(stdout)
    assert not results.pop("module").startswith("hier_transformers")
    for logits in results.values():
        torch.testing.assert_close(torch.tensor(logits), expected, atol=1e-6, rtol=1e-5)


def _train_one_step(model, dataset, tmp_path, batch_size: int, accumulation: int):
    args = TrainingArguments(
        output_dir=str(tmp_path / f"run-{batch_size}-{accumulation}"),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=dataset).train()
    return model


@pytest.mark.parametrize("head", ["sequence", "token"])
def test_trainer_gradient_accumulation_equals_one_big_batch(head, tmp_path):
    """2 x batch 2 with accumulation == 1 x batch 4 (SGD, dropout off), also for token labels of uneven counts."""
    seq_len = 20
    input_ids = torch.randint(1, 120, (4, seq_len))
    if head == "sequence":
        model = HierarchicalForSequenceClassification(tiny_config())
        labels = torch.tensor([0, 2, 1, 2])
    else:
        model = HierarchicalForTokenClassification(tiny_config())
        labels = torch.randint(0, 3, (4, seq_len))
        labels[0, 2:] = -100  # uneven numbers of scored tokens per document
        labels[3, 15:] = -100
    dataset = [{"input_ids": input_ids[i], "labels": labels[i]} for i in range(4)]
    accumulated = _train_one_step(copy.deepcopy(model), dataset, tmp_path, batch_size=2, accumulation=2)
    big_batch = _train_one_step(copy.deepcopy(model), dataset, tmp_path, batch_size=4, accumulation=1)
    moved = False
    for (name, ours), theirs, initial in zip(
        accumulated.named_parameters(), big_batch.parameters(), model.parameters()
    ):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5, msg=name)
        moved = moved or not torch.equal(ours, initial)
    assert moved


def test_peft_lora_trains_saves_reloads_and_merges(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    base = HierarchicalForSequenceClassification(tiny_config(initializer_range=0.2))  # see the learning test
    base.save_pretrained(tmp_path / "base")
    lora = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8))
    trainable = {name for name, param in lora.named_parameters() if param.requires_grad}
    assert any("lora_A" in name for name in trainable) and any("classifier" in name for name in trainable)
    assert not any("embeddings" in name or "up_proj" in name for name in trainable)

    input_ids, labels = torch.randint(1, 120, (4, 30)), torch.tensor([0, 1, 2, 1])
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = lora(input_ids=input_ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.2, losses
    assert all(param.abs().max() > 0 for name, param in lora.named_parameters() if "lora_B" in name)

    lora.eval()
    with torch.no_grad():
        expected = lora(input_ids=input_ids).logits
    lora.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    reloaded = PeftModel.from_pretrained(
        HierarchicalForSequenceClassification.from_pretrained(tmp_path / "base"), tmp_path / "adapter"
    ).eval()
    merged = reloaded.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=input_ids).logits, expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(merged(input_ids).logits, expected, atol=1e-5, rtol=1e-4)
    assert type(merged) is HierarchicalForSequenceClassification


def test_text_classification_pipeline_returns_label_names():
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    model = HierarchicalForSequenceClassification(tiny_config(vocab_size=tokenizer.vocab_size)).eval()
    classifier = pipeline("text-classification", model=model, tokenizer=tokenizer)
    documents = ["the match went to extra time. " * 20, "parliament voted on the budget."]
    predictions = classifier(documents, top_k=None)
    for document, scores in zip(documents, predictions):
        assert sorted(entry["label"] for entry in scores) == sorted(LABELS.values())
        assert abs(sum(entry["score"] for entry in scores) - 1) < 1e-5
        with torch.no_grad():
            logits = model(**tokenizer(document, return_tensors="pt")).logits[0]
        assert scores[0]["label"] == LABELS[int(logits.argmax())]
