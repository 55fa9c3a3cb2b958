"""prunekit HTTP layer. Never imports torch."""
