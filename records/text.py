"""Text as every store and format the service writes can hold it.

A model's output is text only by convention: random or misbehaving weights emit NUL and other control
characters, which PostgreSQL refuses in a text column ("cannot contain NUL (0x00) bytes") and DICOM
(LT, UT, ST) and HL7 do not allow. Everything the model or a person writes passes through here once,
where it enters the service.
"""

from __future__ import annotations

import re

REASON_CHARS = 300  # a reason is one line of at most this many characters, whatever the input held

# C0 controls and DEL, but tab, line feed and carriage return, which reports use
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def plain_text(text: str) -> str:
    """``text`` without control characters (tabs and line breaks kept) and with any lone surrogate, which
    no UTF-8 store takes, replaced by "?"."""
    return _CONTROL.sub("", text.encode("utf-8", "replace").decode("utf-8"))


def one_line(text: str, limit: int = REASON_CHARS) -> str:
    """``text`` on one line, cut to ``limit`` characters: reasons are stored, logged and shown, and may quote
    whatever a header or an exception held."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
