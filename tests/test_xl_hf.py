"""HierarchicalXL inside the Hugging Face stack: Auto classes, save/load, remote code, pipeline, PEFT, Trainer."""

from __future__ import annotations

import json
import os

import pytest
import torch
from datasets import Dataset
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainingArguments,
    pipeline,
)

from conftest import last_json_line, run_without_package
from hier_transformers import (
    ByteTokenizer,
    HierarchicalXLConfig,
    HierarchicalXLForCausalLM,
    HierarchicalXLModel,
)


def tiny_config(**overrides) -> HierarchicalXLConfig:
    values = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        patch_size=4, local_window=8, max_patch_summaries=3, section_size=2, max_section_summaries=2,
    )
    return HierarchicalXLConfig(**(values | overrides))


def tiny_model(**overrides) -> HierarchicalXLForCausalLM:
    torch.manual_seed(0)
    return HierarchicalXLForCausalLM(tiny_config(**overrides)).eval()


def test_auto_classes_resolve():
    options = {key: value for key, value in tiny_config().to_diff_dict().items() if key != "model_type"}
    config = AutoConfig.for_model("hierarchical_xl", **options)
    assert isinstance(config, HierarchicalXLConfig)
    assert isinstance(AutoModel.from_config(config), HierarchicalXLModel)
    assert isinstance(AutoModelForCausalLM.from_config(config), HierarchicalXLForCausalLM)


@pytest.mark.parametrize("tie_word_embeddings", [True, False])
def test_save_load_round_trip_is_exact_and_safetensors_only(tmp_path, tie_word_embeddings):
    model = tiny_model(tie_word_embeddings=tie_word_embeddings)
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert "model.safetensors" in files and not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == (
        "modeling_hierarchical_xl.HierarchicalXLForCausalLM"
    )
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert (loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()) == tie_word_embeddings
    input_ids = torch.randint(4, 260, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, model(input_ids).logits, atol=0, rtol=0)


def test_byte_tokenizer_round_trips_text_and_saves_without_vocabulary(tmp_path):
    tokenizer = ByteTokenizer()
    text = "Grüße, 世界! </s>"  # the literal "</s>" is text: four bytes, not the eos id
    ids = tokenizer(text)["input_ids"]
    assert len(tokenizer) == 260 and tokenizer.padding_side == "left"
    assert len(ids) == len(text.encode()) and tokenizer.eos_token_id not in ids and tokenizer.decode(ids) == text
    assert tokenizer.decode(ids + [tokenizer.eos_token_id], skip_special_tokens=True) == text
    assert tokenizer.decode([4 + 0xE4]) == "\ufffd"  # a cut UTF-8 sequence decodes with errors="replace"
    tokenizer.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["tokenization_byte.py", "tokenizer_config.json"]  # code, no vocab
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(loaded, ByteTokenizer) and loaded(text)["input_ids"] == ids


def test_saved_folder_loads_and_generates_in_a_process_without_the_package(tmp_path):
    model = tiny_model(vocab_size=260)
    model.generation_config.eos_token_id = None
    tokenizer = ByteTokenizer()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    prompts = ["Once upon a time", "Hi"]
    inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    expected = model.generate(**inputs, max_new_tokens=25, do_sample=False).tolist()
    stdout = run_without_package(
        f"""
        import json, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
        tokenizer = AutoTokenizer.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)
        model.generation_config.eos_token_id = None
        inputs = tokenizer({prompts!r}, return_tensors="pt", padding=True)
        output = model.generate(**inputs, max_new_tokens=25, do_sample=False)
        print(json.dumps({{"module": type(model).__module__, "tokenizer": type(tokenizer).__name__,
                          "tokens": output.tolist()}}))
        """
    )
    result = last_json_line(stdout)
    assert not result["module"].startswith("hier_transformers")
    assert result["tokenizer"] == "ByteTokenizer"
    assert result["tokens"] == expected


def test_text_generation_pipeline():
    model = tiny_model(vocab_size=260)
    generator = pipeline("text-generation", model=model, tokenizer=ByteTokenizer())
    outputs = generator(["Hello", "A longer prompt"], max_new_tokens=12, do_sample=False)
    assert outputs[0][0]["generated_text"].startswith("Hello")
    assert outputs[1][0]["generated_text"].startswith("A longer prompt")


def test_any_hf_tokenizer_works():
    from hier_transformers.warm_start import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), padding_side="left")
    model = tiny_model(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
    inputs = tokenizer(
        ["the cat sat on the mat", "hello"], return_tensors="pt", padding=True, return_token_type_ids=False
    )
    output = model.generate(**inputs, max_new_tokens=10, do_sample=False, eos_token_id=None)
    assert output.shape == (2, inputs["input_ids"].shape[1] + 10) and int(output.max()) < len(tokenizer)


@pytest.mark.parametrize("retrieval", [{}, dict(retrieval_top_k=2, retrieval_window=24, key_shift=True)])
def test_peft_lora_trains_saves_reloads_and_generates(tmp_path, retrieval):
    from peft import LoraConfig, PeftModel, get_peft_model

    model = tiny_model(vocab_size=260, **retrieval)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    input_ids = torch.randint(4, 60, (4, 5)).repeat(1, 8)  # periodic: learnable by attending back one period
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=5e-2)
    peft_model.train()
    losses = []
    for _ in range(30):
        loss = peft_model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.25
    peft_model.eval()
    peft_model.save_pretrained(tmp_path)
    assert "adapter_model.safetensors" in os.listdir(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_model(vocab_size=260, **retrieval), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids).logits, peft_model(input_ids).logits, atol=1e-5, rtol=1e-5)
    prompt = input_ids[:1, :5]
    assert torch.equal(
        reloaded.generate(input_ids=prompt, max_new_tokens=8, do_sample=False),
        peft_model.generate(input_ids=prompt, max_new_tokens=8, do_sample=False),
    )


def test_trainer_gradient_accumulation_matches_a_double_batch(tmp_path):
    tokenizer = ByteTokenizer(padding_side="right")
    texts = ["short", "a somewhat longer line of text", "mid length text", "x" * 25]
    dataset = Dataset.from_dict({"text": texts}).map(lambda batch: tokenizer(batch["text"]), batched=True)
    dataset = dataset.remove_columns("text")
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)

    def train(batch_size: int, accumulation: int) -> dict[str, torch.Tensor]:
        model = tiny_model(vocab_size=260)
        args = TrainingArguments(
            output_dir=str(tmp_path / f"run{batch_size}"), per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=1e-2, optim="sgd",
            lr_scheduler_type="constant", report_to=[], save_strategy="no", logging_strategy="no",
            dataloader_drop_last=False, use_cpu=True, seed=0, data_seed=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
        trainer._get_train_sampler = lambda *unused: torch.utils.data.SequentialSampler(dataset)
        trainer.train()
        return {name: p.detach().clone() for name, p in model.named_parameters()}

    double = train(batch_size=4, accumulation=1)
    accumulated = train(batch_size=2, accumulation=2)
    for name, value in double.items():
        torch.testing.assert_close(accumulated[name], value, atol=1e-6, rtol=1e-5, msg=name)
