"""What turns tokens into tokens on one device: model, weights, KV cache, batching, sampling."""
