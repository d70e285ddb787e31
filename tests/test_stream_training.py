"""Transformer-XL stream training (training/streams.py + pretrain_clm.py with stream: true): every batch row follows
one stream of documents across optimizer steps, the memory is carried (detached) across steps and reset exactly where
a row's next document begins, and each process of a multi-process run reads its own streams in order."""

import torch
from torch.utils.data import DataLoader
from training_utils import TINY_CLM_RUN, TINY_XL_CONFIG, cli

from hier_transformers import HierarchicalXLCache, HierarchicalXLConfig, HierarchicalXLForCausalLM
from training import pretrain_clm
from training.streams import IGNORE_INDEX, StreamDataset, assign_documents

BOS, EOS, PAD = 1, 2, 0


def documents(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [[BOS, *torch.randint(3, 260, (n,), generator=generator).tolist(), EOS] for n in lengths]


def test_assignment_is_balanced_and_keeps_every_document_whole():
    lengths = [500, 40, 300, 300, 120, 80, 700, 10]
    streams = assign_documents(lengths, 3, seed=0)
    assert sorted(i for stream in streams for i in stream) == list(range(len(lengths)))
    totals = [sum(lengths[i] for i in stream) for stream in streams]
    assert max(totals) - min(totals) <= max(lengths)
    assert assign_documents(lengths, 3, seed=0) == streams  # deterministic for a seed


def test_each_process_reads_its_own_streams_in_order():
    docs = documents([90, 200, 33, 150, 64, 310, 70, 45, 120, 99])
    rows, processes, block, segment = 2, 2, 32, 16
    data = StreamDataset(docs, rows, processes, block, segment, PAD, seed=0)
    batches = list(DataLoader(data, batch_size=rows, shuffle=False))
    # accelerate gives batch j to process j % num_processes: each process's rows continue one another exactly
    for process in range(processes):
        mine = batches[process::processes]
        for row in range(rows):
            stream = torch.cat([batch["input_ids"][row] for batch in mine])
            assert torch.equal(stream, data.input_ids[process * rows + row])
    # every document appears in exactly one stream, whole, starting at a segment boundary flagged as a reset
    for stream in range(rows * processes):
        ids, starts = data.input_ids[stream], data.starts[stream]
        for segment_index in torch.nonzero(starts).flatten().tolist():
            assert ids[segment_index * segment] == BOS
        assert (ids == BOS).sum() == starts.sum()


def test_labels_are_the_next_token_inside_the_document_only():
    docs = documents([20, 7, 40])
    data = StreamDataset(docs, rows=1, num_processes=1, block_size=16, segment_length=8, pad_token_id=PAD, seed=0)
    ids, labels, real = data.input_ids[0], data.labels[0], data.real[0]
    for position in range(ids.numel()):
        if labels[position] != IGNORE_INDEX:
            assert real[position] and real[position + 1] and labels[position] == ids[position + 1]
            assert ids[position] != EOS  # no prediction across a document boundary
    # every real token but each document's last one predicts its successor
    assert int((labels != IGNORE_INDEX).sum()) == int(real.sum()) - int(data.starts[0].sum())
    assert bool((ids[~real] == PAD).all())


def test_memory_is_carried_across_steps_and_reset_at_document_starts():
    config = HierarchicalXLConfig(vocab_size=260, **TINY_XL_CONFIG)
    model = HierarchicalXLForCausalLM(config).eval()
    run = pretrain_clm.CLMRunConfig(model=dict(TINY_XL_CONFIG), block_size=32, segment_length=16,
                                    per_device_batch_size=2)
    run.validate()
    objective = pretrain_clm.CausalLM(run)
    docs = documents([100, 20, 75, 61])
    data = StreamDataset(docs, 2, 1, 32, 16, PAD, seed=0)
    batches = list(DataLoader(data, batch_size=2, shuffle=False))
    with torch.no_grad():
        objective.train_step(model, batches[0], 0, backward=None)
        objective.train_step(model, batches[1], 0, backward=None)
    seen_after_two = objective.memory.seen.clone()
    # a row whose document went on through both steps has seen 64 tokens: the memory was not reset per step
    continuing = ~data.starts[:2, 1:4].any(dim=1)
    assert bool((seen_after_two[continuing] == 64).all()) and bool(continuing.any())

    # the row that starts a document in a later segment gets exactly the logits of a fresh cache there
    step = next(i for i, batch in enumerate(batches[2:], start=2) if bool(batch["resets"][:, 1:].any()))
    for batch in batches[2:step]:
        with torch.no_grad():
            objective.train_step(model, batch, 0, backward=None)
    batch = batches[step]
    row, segment_index = [int(v) for v in torch.nonzero(batch["resets"][:, 1:])[0]]
    segment_index += 1
    cache = objective.memory
    with torch.no_grad():
        for index in range(segment_index):
            columns = slice(index * 16, (index + 1) * 16)
            cache = model(input_ids=batch["input_ids"][:, columns], attention_mask=batch["attention_mask"][:, columns],
                          cache=cache, use_cache=True).cache
        cache.reset_rows(batch["resets"][:, segment_index])
        columns = slice(segment_index * 16, (segment_index + 1) * 16)
        carried = model(input_ids=batch["input_ids"][:, columns], cache=cache, use_cache=True).logits[row]
        fresh = model(input_ids=batch["input_ids"][row:row + 1, columns], cache=HierarchicalXLCache(config),
                      use_cache=True).logits[0]
    torch.testing.assert_close(carried, fresh, rtol=0, atol=1e-5)


def test_stream_run_learns_and_block_run_is_the_ablation(tmp_path):
    stream = pretrain_clm.main(cli({**TINY_CLM_RUN, "output_dir": tmp_path / "stream", "max_steps": 12,
                                    "final_eval": "false"}))
    blocks = pretrain_clm.main(cli({**TINY_CLM_RUN, "output_dir": tmp_path / "blocks", "max_steps": 12,
                                    "stream": "false", "final_eval": "false"}))
    assert stream["run_config"]["stream"] is True and blocks["run_config"]["stream"] is False
    assert stream["train_loss"] < 5.0 and blocks["train_loss"] < 5.0  # ln(260) = 5.56 at the start
    assert (tmp_path / "stream" / "checkpoints").is_dir()
    saved = sorted((tmp_path / "stream" / "checkpoints").glob("*/stream_memory_rank0.safetensors"))
    assert saved, "stream checkpoints must hold the carried memory"


def test_one_long_document_fills_every_stream():
    book = documents([5000])
    data = StreamDataset(book, rows=4, num_processes=1, block_size=64, segment_length=32, pad_token_id=PAD, seed=0)
    assert data.steps >= 5000 // 4 // 64 - 1
    assert int((data.input_ids == BOS).sum()) == 1  # one document: only its first piece starts with BOS
    assert bool(data.starts[:, 0].all())  # every row starts a piece: its memory starts empty there
    # the rows hold consecutive pieces of the one document, nothing lost but the tail past the last whole block
    joined = torch.cat([data.input_ids[row][data.real[row]] for row in range(4)])
    assert set(joined.tolist()) <= set(book[0])
    assert int(data.real.sum()) == 4 * data.steps * 64


def test_one_plain_text_book_trains_through_the_command(tmp_path):
    from hier_transformers.data import load_shakespeare

    book = tmp_path / "hamlet.txt"
    book.write_text(load_shakespeare()["train"]["text"][0][:60_000])
    result = pretrain_clm.main(cli({**TINY_CLM_RUN, "output_dir": tmp_path / "run", "data_files": f"[{book}]",
                                    "max_train_documents": "null", "max_eval_documents": "null", "max_steps": 4}))
    assert result["train_documents"] == 1 and result["validation_documents"] == 1 and result["steps"] == 4
    assert result["final_eval"]["bytes"] > 1000  # the validation split: the file's last 5% of bytes
