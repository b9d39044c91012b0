"""Runs models: one worker process per model, hosting vllm-mlx. Imports state only."""
