"""Merging: plan (validate, assign slots, dry run), then stream tensors into shards."""

# Experts active per token: the demo's measured choice (of 5). Here, not in ``plan``, so that
# the command line shows it without importing torch.
DEFAULT_TOP_K = 3
