"""Loaded by every Python process of a test run whose PYTHONPATH holds this folder: each module of the ptune package
that the process imports is appended to $PTUNE_TEST_IMPORT_TRACE as it is found, one JSON line each, with a token
naming the process (an exec'd process gets a new one) and the stage it runs for once the stage runner has set
PTUNE_STAGE (the processes a stage starts inherit it). Recorded at import, not at exit: deploy's server and its
scheduler end with os._exit. tests/test_code_deps.py reads the lines."""

import json
import os
import sys

_TRACE = os.environ.get("PTUNE_TEST_IMPORT_TRACE")
_PROCESS = os.urandom(8).hex()


class _Recorder:
    """A meta path finder that finds nothing itself: it asks the others and writes down where ptune's modules are."""

    def find_spec(self, name, path=None, target=None):
        if name != "ptune" and not name.startswith("ptune."):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                stage = os.environ.get("PTUNE_STAGE")
                line = {"process": _PROCESS, "stage": stage, "argv": sys.argv, "file": spec.origin}
                fd = os.open(_TRACE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    os.write(fd, (json.dumps(line) + "\n").encode())
                finally:
                    os.close(fd)
                return spec
        return None


if _TRACE:
    sys.meta_path.insert(0, _Recorder())
