"""escape_markdown: text from recordings renders as itself, in a paragraph or a table cell."""

from __future__ import annotations

import markdown_it  # a CommonMark + GFM-table reference parser (dev dependency)
import pytest

from voiceman_pipeline.markdown import escape_markdown

HOSTILE = [
    "col a | col b | col c",
    "path C:\\Users\\victim\\ and a trailing backslash \\",
    "`rm -rf /` and ```fenced```",
    "*shouted* **loud** _quiet_ __under__ ~~struck~~",
    "[click here](https://evil.example/phish) ![img](x.png) [ref][1]",
    "<script>alert('x')</script> <img src=x onerror=alert(1)> <!-- hidden -->",
    "AT&T &lt;b&gt; &#60;i&#62; &amp;",
    "# not a heading",
    "## nor this",
    "- not a list",
    "+ nor this",
    "* nor this",
    "1. not numbered",
    "2) nor this",
    "> not a quote",
    "===",
    "---",
    "    four spaces would be code",
    "line one\nline two\r\n\nline three\ttabbed\u2028separated",
    "call me at www.example.com or https://example.com or me@example.com",
    "nul\x00bell\x07 end",
    "통화 녹음: 협박 *하지* 마세요 | 끝",
]


def _parser():
    return markdown_it.MarkdownIt("commonmark").enable(["table", "strikethrough"])


def _flat(text: str) -> str:
    return " ".join(text.replace("\x00", " ").replace("\x07", " ").split())


@pytest.mark.parametrize("text", HOSTILE)
def test_escaped_text_renders_as_plain_text_on_one_line(text):
    tokens = _parser().parse(escape_markdown(text))
    assert [t.type for t in tokens] == ["paragraph_open", "inline", "paragraph_close"]
    children = tokens[1].children
    assert {c.type for c in children} == {"text"}  # no emphasis, code, link, html, break
    assert "".join(c.content for c in children) == _flat(text)


@pytest.mark.parametrize("text", HOSTILE)
def test_escaped_text_stays_in_its_table_cell(text):
    table = f"| key | transcript |\n| --- | --- |\n| call.wav | {escape_markdown(text)} |\n"
    tokens = _parser().parse(table)
    cells = [i for i, t in enumerate(tokens) if t.type == "td_open"]
    assert len(cells) == 2  # a pipe in the text did not add a column
    inline = tokens[cells[1] + 1]
    assert {c.type for c in inline.children} == {"text"}
    assert "".join(c.content for c in inline.children) == _flat(text)


@pytest.mark.parametrize("text", ["# h", "- item", "1. item", "> quote", "===", "+ x"])
def test_escaped_text_at_the_start_of_a_line_starts_no_block(text):
    """As a line of its own after other markdown (e.g. one transcript segment per line)."""
    tokens = _parser().parse("Segments:\n\n" + escape_markdown(text) + "\n")
    assert [t.type for t in tokens] == ["paragraph_open", "inline", "paragraph_close"] * 2


def test_escaping_examples():
    assert escape_markdown("a|b") == "a\\|b"
    assert escape_markdown("<b>bold</b>") == "&lt;b&gt;bold&lt;/b&gt;"
    assert escape_markdown("one\ntwo\r\nthree") == "one two three"
    assert escape_markdown("# title") == "\\# title"
    assert escape_markdown("1. first") == "1\\. first"
    assert escape_markdown("plain words") == "plain words"
    assert escape_markdown("") == escape_markdown(None) == ""


def test_links_are_not_auto_linked():
    """GFM turns bare URLs, www. names and e-mail addresses into links; the
    reference parser here lacks that extension, so check what it keys on."""
    escaped = escape_markdown("see https://evil.example, www.evil.example and me@evil.example")
    assert "https://" not in escaped and "www." not in escaped and "me@" not in escaped
