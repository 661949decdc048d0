"""Data: tokenizers, synthetic tasks, dataset builders and input pipelines."""
