"""`ctrltok generate` and `ctrltok chat`."""

from __future__ import annotations

from ctrltok.generation.generate import chat_loop, generate_file, load_for_generation
from ctrltok.generation.generate import generate as generate_replies


def generate(a):
    if a.input:
        generate_file(a.model, a.input, a.out, template=a.template, max_new_tokens=a.max_new_tokens,
                      temperature=a.temperature)
        return
    model, tok, template = load_for_generation(a.model)
    results = generate_replies(model, tok, [[{"role": "user", "content": a.prompt}]], a.template or template,
                               max_new_tokens=a.max_new_tokens, temperature=a.temperature)
    print(results[0]["text"])


def chat(a):
    chat_loop(a.model, template=a.template)
