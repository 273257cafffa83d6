"""esdllm.scripts: the trainer of the embedded default models (train_tiny.py) and the random-weight
checkpoint writer (make_tiny_checkpoint.py), importable as modules and runnable as scripts; the
shell scripts beside them (setup, test, demo, serve, train_defaults) are the README's commands."""
