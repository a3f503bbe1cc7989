"""Messages where the user looks: on the node in ComfyUI's editor, and in the server log.

:func:`warn` logs a line and shows the same text on the node that is running (the editor's text preview under
the node, ComfyUI's ``PromptServer.send_progress_text``). Several messages of one node in one run are shown
together, one per line. Without a server (the headless in-process executor, scripts) or outside a node's
execution, only the log line is written.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from comfy_execution.utils import get_executing_context

logger = logging.getLogger(__name__)

_shown: dict[tuple[str, str], list[str]] = {}
"""(prompt id, node id) -> the lines shown on that node in that run (only the latest prompt's are kept)."""


def prompt_server() -> Any:
    """ComfyUI's running ``PromptServer``, or ``None`` when no server was started in this process (the module is
    never imported here: without a server there is nothing to send to)."""
    server = sys.modules.get("server")
    return getattr(getattr(server, "PromptServer", None), "instance", None)


def show(text: str) -> bool:
    """Show ``text`` on the running node in the editor (added to what this node showed earlier in this run).
    Returns whether it was sent (False without a server or outside a node's execution)."""
    context = get_executing_context()
    server = prompt_server()
    if context is None or server is None:
        return False
    key = (str(context.prompt_id), str(context.node_id))
    for old in [k for k in _shown if k[0] != key[0]]:
        del _shown[old]
    lines = _shown.setdefault(key, [])
    if text not in lines:
        lines.append(text)
    try:
        server.send_progress_text("\n".join(lines), context.node_id)
    except Exception:  # a message must never fail the run
        logger.debug("could not send a node message", exc_info=True)
        return False
    return True


def warn(node: str, text: str) -> None:
    """Log ``"<node>: <text>"`` as a warning and show ``text`` on the running node."""
    logger.warning("%s: %s", node, text)
    show(f"⚠ {text}")


def note(node: str, text: str) -> None:
    """Log ``"<node>: <text>"`` as information and show ``text`` on the running node."""
    logger.info("%s: %s", node, text)
    show(text)
