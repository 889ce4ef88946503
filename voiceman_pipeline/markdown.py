"""Text from recordings, made safe to show in Dagster markdown metadata.

Transcripts and matched evidence are whatever a caller said (or a speech
model heard): they can contain ``|`` that splits a table cell, ``*`` or ``_``
that turn into emphasis, ``[x](url)`` links, raw HTML, or a leading ``#`` or
``1.`` that makes a heading or list. ``escape_markdown`` turns such text into
markdown that renders as exactly that text, on one line.
"""

from __future__ import annotations

import re

# Backslash-escaped (CommonMark escapes any ASCII punctuation): emphasis,
# code, links/images, headings, table cells, GFM strikethrough, and ':' and
# '@' so that URLs and e-mail addresses in a transcript are not auto-linked.
_ESCAPED = "\\`*_[]#|~!:@"
# As HTML entities: raw HTML and entity references then render as text, even
# where a renderer passes HTML through.
_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}
_TABLE = str.maketrans({**{c: "\\" + c for c in _ESCAPED}, **_ENTITIES})
# Any run of whitespace or control characters (newlines, tabs, NUL, U+2028):
# one line, no indentation that would start a code block.
_SPACES = re.compile(r"[\s\x00-\x1f\x7f]+")
# What starts a list or a heading underline when it begins a line.
_LEADING_SIGN = re.compile(r"^([-+=])")
_LIST_NUMBER = re.compile(r"^(\d{1,9})([.)])")
_WWW = re.compile(r"(?i)\b(www)\.")


def escape_markdown(text: str | None) -> str:
    """``text`` as markdown that renders as that text, on a single line.

    Whitespace runs (newlines included) become one space; markdown
    punctuation is backslash-escaped; ``& < > "`` become HTML entities; a
    leading ``-``, ``+``, ``=`` or ``1.`` is escaped so the text cannot start a
    list or heading where it is placed at the start of a line. Safe inside a
    GFM table cell.
    """
    if not text:
        return ""
    flat = _SPACES.sub(" ", str(text)).strip()
    escaped = flat.translate(_TABLE)
    escaped = _WWW.sub(r"\1\\.", escaped)  # "www.x.org" is auto-linked without a scheme
    escaped = _LEADING_SIGN.sub(r"\\\1", escaped)
    return _LIST_NUMBER.sub(r"\1\\\2", escaped)
