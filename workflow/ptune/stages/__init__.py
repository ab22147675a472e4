"""The pipeline's seven stages, one module each: `run(params)` reads its inputs and writes its outputs."""
