"""The pruning engine: pure torch + transformers, no Celery, database or HTTP. Entry point: pipeline.run()."""
