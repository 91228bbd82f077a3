"""The Llama transformer and its paged KV cache."""
