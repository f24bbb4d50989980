"""Merging: plan (validate, assign slots, dry run), then stream tensors into shards."""
