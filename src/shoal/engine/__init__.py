"""The PyTorch inference engine: model code, loading, tokenization, sampling, batching."""
