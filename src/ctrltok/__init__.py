"""ctrltok: teach pretrained language models new control tokens.

Start with ``ctrltok demo`` and ``ARCHITECTURE.md``; the library's entry points are
``ctrltok.tokens.add_tokens``, ``ctrltok.chat.encode_chat``, ``ctrltok.train.train``.
"""

__version__ = "0.1.0"
