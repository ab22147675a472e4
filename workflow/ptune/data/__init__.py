"""Data sets and prompts: ADGEN and your own files, the generated data set, the one prompt builder, batching."""
