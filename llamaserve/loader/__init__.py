"""Model loading: GGUF and Hugging Face checkpoints, tensor names, tokenizers."""
