"""ctrltok: teach pretrained language models new control tokens.

Start with ``ctrltok demo`` and ``ARCHITECTURE.md``; the library's entry points are
``ctrltok.core.tokens.add_tokens``, ``ctrltok.core.chat.encode_chat``, ``ctrltok.training.train.train``.
"""

__version__ = "0.1.0"
