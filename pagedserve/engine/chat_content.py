"""How a chat template reads a message's content: as one string, or as OpenAI's list of content parts.

Most templates write ``message['content']`` as text; some (those of vision-language models, and others written
for OpenAI's shape) loop over it as parts and write each text part's ``text``. Given a string, such a loop walks
its characters and writes nothing: the user's text vanished from the prompt without a word. vLLM tells the two
apart from the template itself (a ``for`` over a message's content) and hands the second kind parts; so does this.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

ContentFormat = Literal["string", "openai"]


def _reads_content(node: Any, content_names: set[str]) -> bool:
    """Whether ``node`` is a message's content: ``m['content']``, ``m.content``, a name set to one of those, or
    any of them through filters (``m['content'] | selectattr(...)``) and slices (``m['content'][1:]``)."""
    from jinja2 import nodes

    while (isinstance(node, nodes.Filter) and node.node is not None
           or isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Slice)):
        node = node.node
    if isinstance(node, nodes.Getitem):
        return isinstance(node.arg, nodes.Const) and node.arg.value == "content"
    if isinstance(node, nodes.Getattr):
        return node.attr == "content"
    return isinstance(node, nodes.Name) and node.name in content_names


def content_format(template: object) -> ContentFormat:
    """``"openai"`` where ``template`` (a tokenizer's ``chat_template``: text, or None) loops over a message's
    content (it wants parts), else ``"string"``; a template Jinja cannot parse is ``"string"`` (rendering it says
    what is wrong)."""
    return _template_format(template) if isinstance(template, str) and template else "string"


@functools.lru_cache(maxsize=32)
def _template_format(template: str) -> ContentFormat:
    import jinja2
    from jinja2 import nodes

    try:
        tree = jinja2.Environment().parse(template)
    except jinja2.TemplateSyntaxError:
        return "string"
    content_names = {target.name for assign in tree.find_all(nodes.Assign)
                     if isinstance(target := assign.target, nodes.Name) and _reads_content(assign.node, set())}
    loops = tree.find_all(nodes.For)
    return "openai" if any(_reads_content(loop.iter, content_names) for loop in loops) else "string"


def as_parts(content: Any) -> Any:
    """A string content as one text part, for a template that loops over parts (vLLM's shape for it); anything
    else as it is."""
    return [{"type": "text", "text": content}] if isinstance(content, str) else content
