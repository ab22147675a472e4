"""What a client is told when the server itself fails: a request id to quote, never the exception.

An exception's text and traceback can name local paths, library internals and what other requests sent; they go to
the server's log under a fresh id, and the client (the API's 500, the page's error box) gets only that id. Refusals
of a bad request (limits.RequestError) are not failures: their messages are written for the client.
"""

from __future__ import annotations

import logging
import uuid

log = logging.getLogger(__name__)


def reported(exc: BaseException, message: str = "the server failed to answer") -> str:
    """Log `exc` with its traceback under a new request id; the text a client may see, naming only that id."""
    ident = uuid.uuid4().hex[:12]
    log.error("request %s failed", ident, exc_info=exc)
    return f"{message} (request id {ident}; the server's log has the details)"
