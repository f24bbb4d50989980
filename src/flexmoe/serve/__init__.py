"""The HTTP server: OpenAI-compatible completions with per-request expert choice, attribution,
owners' tokens and a usage ledger."""
