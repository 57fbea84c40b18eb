"""Data: embedded corpora, tokenizers and the grain pipeline.

  corpora.load_documents(cfg.data, split)          -> list[str]
  tokenizers.get_tokenizer(cfg.data)               -> Tokenizer (pad 0, bos 1, eos 2, mask 3)
  pipeline.make_train_iterator(cfg, tokenizer, ...) -> checkpointable iterator of int32 [B, L] dicts
  pipeline.make_eval_batches(cfg, tokenizer, ...)   -> list of the same dicts
  synthetic.make_world(seed, num_people)           -> World with ground truth
"""
