"""evalkit: adapter evaluation and regression harness for fine-tuned LLMs."""
__version__ = "0.1.0"
