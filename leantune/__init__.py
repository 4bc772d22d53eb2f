"""leantune: memory-lean post-training of causal language models, with an honest ledger for every run."""

__version__ = "0.1.0"
