"""tinylm: the shared code of the TinyStories pretraining pipeline.

One idea per module: config (typed params), files (atomic writes, hashes), data (download),
clean, bpe (tokenizer), shards, model, trainer, evaluate, sampling, report.
"""
