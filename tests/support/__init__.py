"""Test helpers: loopback stand-ins for the outside network (Git LFS, a hub, HTTP files), cluster harnesses, tiny
models, and the serving and prompt-seam helpers."""
