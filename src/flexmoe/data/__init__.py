"""From text files to token blocks: documents, splits, tokenizer, packing, demo corpora."""
