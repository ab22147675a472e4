"""Models: the backend interface and its two implementations, the prefix, generation, loading, the deploy bundle.

Nothing is imported here: the legacy environment (transformers 4.33) imports model.chatglm without transformers 5."""
