"""llmscale: distributed pretraining of GPT and BERT language models on DeepSpeed."""

__version__ = "0.1.0"
