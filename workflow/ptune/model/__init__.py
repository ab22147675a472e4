"""Models at run time: the backend interface and its two implementations, loading, the prefix, generation, the
embedded model, the legacy environment, and what a model folder may make ptune run (trust.py).

Nothing is imported here: the legacy environment (transformers 4.33) imports model.chatglm without transformers 5."""
