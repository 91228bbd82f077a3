"""The inference engine: scheduling, paged KV cache, sampling and detokenization."""
