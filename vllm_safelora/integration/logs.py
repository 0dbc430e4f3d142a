"""Our log lines in vLLM's server log: one helper, used at plugin registration and
again once the engine is built (:mod:`.plugin`, :mod:`.patches`)."""

from __future__ import annotations

import logging


def share_vllm_logging() -> None:
    """Route our loggers through vLLM's handlers so operators see them in the server log.

    vLLM applies its logging dictConfig after plugins load, which disables
    loggers it does not name; this is called again once the engine is built.
    """
    theirs = logging.getLogger("vllm")
    for name, obj in list(logging.root.manager.loggerDict.items()):
        if (name == "vllm_safelora" or name.startswith("vllm_safelora.")) and isinstance(obj, logging.Logger):
            obj.disabled = False
    ours = logging.getLogger("vllm_safelora")
    ours.disabled = False
    if theirs.handlers and not any(h in ours.handlers for h in theirs.handlers):
        ours.handlers = list(theirs.handlers)
        ours.setLevel(logging.INFO)
        ours.propagate = False
