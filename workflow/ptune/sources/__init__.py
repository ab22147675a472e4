"""Where base models and data sets come from: Git LFS, the Hugging Face and ModelScope hubs, a URL, a local path.

Each source materialises a plain folder; the fetch stages then move it into their DVC-tracked output, so later
stages never know where it came from. Partial downloads live in .ptune/state/<stage>/<key>/ and resume.
"""
