"""prunekit: pruning as a service. The `prunekit` command lives in prunekit.cli."""
