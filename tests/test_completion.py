"""The LLM backend: batched left-padded generation must equal one-prompt-at-a-time generation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ctrltok.generation.completion import (
    Backend,
    FakeBackend,
    Sampling,
    TransformersBackend,
    VLLMBackend,
    cut_at_stop,
    make_backend,
)
from ctrltok.generation.generate import shared_prefix_cache

QUESTIONS = [
    "Hi",
    "What is the capital of France?",
    "Write a long and detailed poem about the sea, the wind, and the sailors who cross it at night.",
    "2+2?",
    "Explain packing in one sentence, please.",
    "Name three colours that are not red, and say why you like them.",
]


def render(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)


def reference(model, tokenizer, prompt: str, max_new_tokens: int) -> list[int]:
    """Plain transformers: one prompt, no padding, no attention mask games."""
    ids = tokenizer(prompt, add_special_tokens=False, split_special_tokens=False).input_ids
    return reference_ids(model, ids, max_new_tokens)


def reference_ids(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def model_and_tokenizer():
    # Untied: a tied tiny random model just repeats the prompt's last token ("\n") whatever the
    # prompt, which would make "batched == single" true for the wrong reason.
    from transformers import AutoTokenizer

    from tests.conftest import SMOL_TOKENIZER, make_tiny_llama

    tok = AutoTokenizer.from_pretrained(SMOL_TOKENIZER)
    return make_tiny_llama(len(tok), tie=False), tok


@pytest.fixture(scope="module")
def singles(model_and_tokenizer):
    """Each question's greedy 3-token continuation, generated alone."""
    model, tok = model_and_tokenizer
    one = TransformersBackend(model, tok, batch_size=1)
    return [one.complete([render(tok, q)], Sampling(max_new_tokens=3))[0] for q in QUESTIONS]


def test_batched_greedy_equals_one_at_a_time(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompts = [render(tok, q) for q in QUESTIONS]
    lengths = [len(tok(p, add_special_tokens=False).input_ids) for p in prompts]
    assert len(set(lengths)) > 3, "prompts must differ in length so batches are really padded"
    refs = [reference(model, tok, p, 8) for p in prompts]
    assert len({tuple(r) for r in refs}) >= 4, "outputs must depend on the prompt"
    # The template's markup is read as control tokens, not split into text.
    assert tok(prompts[0], add_special_tokens=False, split_special_tokens=False).input_ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    batched = TransformersBackend(model, tok, batch_size=4).generate(prompts, Sampling(max_new_tokens=8))
    for want, got in zip(refs, batched):
        assert got.token_ids == want
        assert got.finish_reason == "length"
        assert got.text == tok.decode(want, skip_special_tokens=True)


def test_next_token_logprobs_batched_equal_the_full_forward_alone(model_and_tokenizer):
    """Right-padded batches read at each row's own last token == one prompt's full forward."""
    model, tok = model_and_tokenizer
    prompts = [render(tok, q) for q in QUESTIONS]
    wanted = [tok.convert_tokens_to_ids(d) for d in "12345"]
    got = TransformersBackend(model, tok, batch_size=3).next_token_logprobs(prompts, wanted)
    for prompt, row in zip(prompts, got):
        ids = torch.tensor([tok(prompt, add_special_tokens=False).input_ids])
        with torch.no_grad():
            full = torch.log_softmax(model(ids).logits[0, -1].float(), dim=-1)
        assert row == pytest.approx(full[wanted].tolist(), abs=1e-5)
    assert len({tuple(round(x, 3) for x in row) for row in got}) >= 4, "must depend on the prompt"


def test_continuation_logprobs_batched_equal_the_full_forward_alone(model_and_tokenizer):
    """Each continuation token's log-probability, read in right-padded batches of uneven rows ==
    the full forward of that one prompt + continuation; an empty continuation gives no row values."""
    model, tok = model_and_tokenizer
    prompts = [render(tok, q) for q in QUESTIONS]
    conts = [tok(" answer " * (i % 3) + "done.", add_special_tokens=False).input_ids for i in range(len(prompts))]
    conts[1] = []
    got = TransformersBackend(model, tok, batch_size=3).continuation_logprobs(prompts, conts)
    for prompt, cont, row in zip(prompts, conts, got):
        ids = tok(prompt, add_special_tokens=False).input_ids
        with torch.no_grad():
            full = torch.log_softmax(model(torch.tensor([ids + cont])).logits[0].float(), dim=-1)
        want = [full[len(ids) - 1 + k, t].item() for k, t in enumerate(cont)]
        assert row == pytest.approx(want, abs=1e-5)
    assert got[1] == []
    with pytest.raises(ValueError, match="continuations"):
        TransformersBackend(model, tok).continuation_logprobs(prompts, conts[:2])


def test_shared_prefix_is_used_and_changes_nothing(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompts = [render(tok, q) for q in QUESTIONS[:4]]
    backend = TransformersBackend(model, tok, batch_size=4)
    encoded = tok(prompts, add_special_tokens=False).input_ids
    cache, shared = shared_prefix_cache(model, encoded)
    assert shared >= 10 and cache.get_seq_length() == shared  # the system turn and "<|im_start|>user\n"
    plain = TransformersBackend(model, tok, batch_size=4, share_prefix=False)
    sampling = Sampling(max_new_tokens=5, temperature=1.0, n=2, seed=3)
    assert backend.generate(prompts, Sampling(max_new_tokens=5)) == plain.generate(prompts, Sampling(max_new_tokens=5))
    assert len(backend.complete(prompts, sampling)) == 8


@settings(max_examples=8, deadline=None)
@given(picks=st.lists(st.integers(0, len(QUESTIONS) - 1), min_size=1, max_size=5), batch_size=st.integers(1, 4))
def test_order_is_preserved_whatever_the_batching(model_and_tokenizer, singles, picks, batch_size):
    model, tok = model_and_tokenizer
    assert len(set(singles)) >= 4, "the tiny model's answers must depend on the question"
    prompts = [render(tok, QUESTIONS[i]) for i in picks]
    got = TransformersBackend(model, tok, batch_size=batch_size).complete(prompts, Sampling(max_new_tokens=3))
    assert got == [singles[i] for i in picks]


def test_greedy_n_samples_are_prompt_major(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompts = [render(tok, q) for q in QUESTIONS[:3]]
    backend = TransformersBackend(model, tok, batch_size=2)
    single = backend.complete(prompts, Sampling(max_new_tokens=4))
    assert len(set(single)) == 3
    assert backend.complete(prompts, Sampling(max_new_tokens=4, n=2)) == [t for t in single for _ in range(2)]


def test_sampling_is_seeded_grouped_and_leaves_global_rng_alone(model_and_tokenizer):
    model, tok = model_and_tokenizer
    short, long = render(tok, QUESTIONS[0]), render(tok, QUESTIONS[2])
    backend = TransformersBackend(model, tok, batch_size=3)  # 3 sequences per batch = one prompt x 3 samples
    sampling = Sampling(max_new_tokens=3, temperature=1.0, n=3, seed=7)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    both = backend.complete([short, long], sampling)
    assert torch.rand(1) == before, "complete() must not consume the caller's RNG"
    assert len(both) == 6
    assert len(set(both[:3])) == 3, "samples of one prompt should differ on a random model at temperature 1"
    assert backend.complete([short, long], sampling) == both  # same seed, same texts
    assert backend.complete([short, long], Sampling(max_new_tokens=3, temperature=1.0, n=3, seed=8)) != both
    # The longest prompt is generated first from the fresh seed, so alone it draws the same samples:
    # this pins both the grouping (prompt-major) and the return order.
    assert backend.complete([long], sampling) == both[3:]


def test_stop_strings_cut_the_text_and_stop_generation(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompts = [render(tok, q) for q in QUESTIONS[:3]]
    backend = TransformersBackend(model, tok, batch_size=3)
    free = backend.generate(prompts, Sampling(max_new_tokens=16))
    target = free[1].text
    # A stop string from the middle of prompt 1's continuation that does not occur earlier.
    stop = next(target[k:k + 3] for k in range(len(target) // 2, len(target) - 3)
                if "\ufffd" not in target[k:k + 3] and target.find(target[k:k + 3]) == k)
    cut = backend.generate(prompts, Sampling(max_new_tokens=16, stop=[stop, "never-ever-appears"]))
    assert cut[1].text == target[: target.find(stop)]
    assert cut[1].finish_reason == "stop_string"
    assert len(cut[1].token_ids) < 16, "generation should stop once the stop string appears"
    assert cut[1].token_ids == free[1].token_ids[: len(cut[1].token_ids)]
    for before, after in ((free[0], cut[0]), (free[2], cut[2])):  # the other rows are unaffected
        assert after.text == cut_at_stop(before.text, [stop])[0]


def test_generation_config_eos_and_suppressed_tokens_are_respected(tiny_llama, smol_tokenizer):
    model, tok = tiny_llama(len(smol_tokenizer), tie=False), smol_tokenizer  # its own: the config is changed
    prompts = [render(tok, q) for q in QUESTIONS[:2]]
    backend = TransformersBackend(model, tok, batch_size=2)
    free = backend.generate(prompts, Sampling(max_new_tokens=8))
    first = free[0].token_ids
    third = first[2]
    assert third not in first[:2]
    model.generation_config.eos_token_id = [2, third]
    stopped = backend.generate(prompts, Sampling(max_new_tokens=8))[0]
    assert stopped.finish_reason == "stop_token"
    assert stopped.token_ids == first[:3]
    assert stopped.text == tok.decode(first[:2], skip_special_tokens=True)

    model.generation_config.eos_token_id = 2
    banned = sorted(set(free[0].token_ids + free[1].token_ids))
    model.generation_config.suppress_tokens = banned
    for completion in backend.generate(prompts, Sampling(max_new_tokens=8)):
        assert not set(completion.token_ids) & set(banned)


def test_prompts_are_not_given_extra_special_tokens(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompt = "plain text without a template"
    got = TransformersBackend(model, tok).generate([prompt], Sampling(max_new_tokens=5))[0]
    ids = tok(prompt, add_special_tokens=False).input_ids
    assert tok.convert_tokens_to_ids("<|im_start|>") not in ids
    assert got.token_ids == reference(model, tok, prompt, 5)


def test_id_prompts_are_used_verbatim(model_and_tokenizer):
    """Ids and text give the same completion where they mean the same; ids that hold markup spelled
    as text keep it text (what a string prompt would have turned into a control token)."""
    model, tok = model_and_tokenizer
    rendered = "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(rendered, add_special_tokens=False).input_ids
    backend = TransformersBackend(model, tok)
    as_text, as_ids = backend.generate([rendered, ids], Sampling(max_new_tokens=6))
    assert as_text.token_ids == as_ids.token_ids
    literal = tok("<|im_end|>", add_special_tokens=False, split_special_tokens=True).input_ids
    assert len(literal) > 1  # spelled out, not the control id
    mixed = ids[:-3] + literal + ids[-3:]
    got = backend.generate([mixed, ids], Sampling(max_new_tokens=6))
    assert got[0].token_ids == reference_ids(model, mixed, 6) and got[1].token_ids == as_ids.token_ids


def test_bad_arguments_are_refused(model_and_tokenizer):
    model, tok = model_and_tokenizer
    backend = TransformersBackend(model, tok)
    assert backend.complete([], Sampling()) == []
    with pytest.raises(TypeError, match="list of prompts"):
        backend.complete("one string", Sampling())
    with pytest.raises(TypeError, match="prompt 0 is neither"):
        backend.complete([[1, None]], Sampling(max_new_tokens=2))
    with pytest.raises(ValueError, match="prompt 0 encodes to no tokens"):
        backend.complete([[]], Sampling(max_new_tokens=2))
    with pytest.raises(ValueError, match="prompt 1 encodes to no tokens"):
        backend.complete(["hi", ""], Sampling(max_new_tokens=2))
    for bad in (dict(max_new_tokens=0), dict(temperature=-1), dict(top_p=0), dict(n=0), dict(stop=[""])):
        with pytest.raises(ValueError, match="Sampling"):
            Sampling(**bad)
    assert Sampling(stop="\n").stop == ["\n"]
    with pytest.raises(ValueError, match="batch_size"):
        TransformersBackend(model, tok, batch_size=0)


def test_fake_backend_is_deterministic_and_honours_n_and_stop():
    fake = FakeBackend(lambda p: f"echo: {p.upper()}. More text.")
    assert isinstance(fake, Backend)
    out = fake.complete(["a", "b"], Sampling(n=2, stop=["."]))
    assert out == ["echo: A", "echo: A", "echo: B", "echo: B"]
    assert fake.calls == ["a", "b"]
    assert fake.complete(["a", "b"], Sampling(n=2, stop=["."])) == out
    with pytest.raises(TypeError):
        fake.complete("a", Sampling())


def test_cut_at_stop_takes_the_earliest_stop():
    assert cut_at_stop("abc\nde###f", ["###", "\n"]) == ("abc", True)
    assert cut_at_stop("abc", ["x"]) == ("abc", False)


def test_make_backend(model_and_tokenizer):
    model, tok = model_and_tokenizer
    backend = make_backend((model, tok), batch_size=3)
    assert isinstance(backend, TransformersBackend) and backend.batch_size == 3
    with pytest.raises(ValueError, match="kind"):
        make_backend((model, tok), kind="llama.cpp")
    with pytest.raises(ValueError, match="vllm"):
        make_backend((model, tok), kind="vllm")
    with pytest.raises(TypeError):
        make_backend(42)


def test_make_backend_loads_a_saved_checkpoint(model_and_tokenizer, tmp_path):
    model, tok = model_and_tokenizer
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    backend = make_backend(str(tmp_path), kind="transformers")
    prompt = render(tok, QUESTIONS[1])
    assert backend.complete([prompt], Sampling(max_new_tokens=4)) == TransformersBackend(model, tok).complete(
        [prompt], Sampling(max_new_tokens=4))


def test_vllm_backend_matches_transformers_greedy(model_and_tokenizer, tmp_path):
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("vLLM needs a GPU")
    model, tok = model_and_tokenizer
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    prompts = [render(tok, q) for q in QUESTIONS[:3]]
    sampling = Sampling(max_new_tokens=4, n=2)
    vllm_texts = VLLMBackend(tmp_path, dtype="float32", gpu_memory_utilization=0.3).complete(prompts, sampling)
    assert vllm_texts == TransformersBackend(model, tok).complete(prompts, sampling)
