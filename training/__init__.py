"""Training entry points for hier-transformers (run from the repository root).

`pretrain_clm.py` / `pretrain_mlm.py` pretrain with Accelerate, `finetune_classification.py` fine-tunes with `Trainer`,
`generate.py` streams text from a trained decoder, `push_to_hub.py` pushes a saved folder. Shared code: `common.py`.
"""
