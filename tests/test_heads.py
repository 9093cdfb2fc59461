"""The constitution head: learns a separable target, gathers at head positions, saves beside a checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from ctrltok.cli.eval import show_constitution
from ctrltok.core.attention import build_mask
from ctrltok.core.heads import (
    CONFIG,
    WEIGHTS,
    ConstitutionHead,
    constitution_loss,
    load_head,
    save_head,
)
from ctrltok.core.packing import collate
from ctrltok.epe.reflection import Insert, charter_ids, layout
from ctrltok.evaluation.epe import read_constitution


def _descend(head, loss_fn, steps, lr=20.0):
    """Plain full-batch gradient descent (torch.optim's first step imports dynamo: seconds here)."""
    first = last = None
    for _ in range(steps):
        loss = loss_fn()
        first = loss.item() if first is None else first
        last = loss.item()
        head.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p in head.parameters():
                p -= lr * p.grad
    return first, last


def test_head_learns_a_separable_multilabel_target():
    torch.manual_seed(0)
    H, C, N = 16, 35, 256
    hidden = torch.randn(1, N, H)
    truth = torch.randn(H, C)
    targets = (hidden[0] @ truth > 0).float()
    index = torch.stack([torch.zeros(N, dtype=torch.long), torch.arange(N)], dim=1)
    head = ConstitutionHead(H, C)
    first, last = _descend(head, lambda: constitution_loss(head, hidden, index, targets), steps=60)
    with torch.no_grad():
        accuracy = ((head(hidden[0]) > 0).float() == targets).float().mean().item()
    assert first == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=0.05)  # starts near p = 0.5
    assert last < 0.3 * first
    assert accuracy > 0.97


def test_loss_reads_exactly_the_head_positions():
    torch.manual_seed(1)
    head = ConstitutionHead(8, 3)
    hidden = torch.randn(2, 5, 8)
    index = torch.tensor([[0, 3], [1, 1]])
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    manual = torch.nn.functional.binary_cross_entropy_with_logits(head(torch.stack([hidden[0, 3], hidden[1, 1]])), targets)
    torch.testing.assert_close(constitution_loss(head, hidden, index, targets), manual)
    torch.testing.assert_close(constitution_loss(head, hidden, index, targets, reduction="sum"), manual * 2)
    empty = constitution_loss(head, hidden, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 3))
    assert empty.item() == 0.0 and empty.requires_grad


def test_head_trains_through_a_packed_batch(tiny_llama):
    """The collated head_index points at the <assistant> tokens of packed reflected documents."""
    model = tiny_llama(64)
    a = layout([5, 6, 7, 8], [Insert(2, [20, 21], [1.0, 0.0, 0.0])], assistant_id=40)
    b = layout([9, 10, 11], [Insert(1, [22], [0.0, 0.0, 1.0])], assistant_id=40)
    batch = collate([[a, b]], pad_id=0)
    assert batch.input_ids[0, batch.head_index[:, 1]].tolist() == [40, 40]
    with torch.no_grad():
        hidden = model.get_decoder()(
            input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=build_mask(batch, "sdpa"), use_cache=False
        ).last_hidden_state
    head = ConstitutionHead(64, 3)
    _descend(head, lambda: constitution_loss(head, hidden, batch.head_index, batch.head_targets), steps=40)
    probs = torch.sigmoid(head(hidden[0, batch.head_index[:, 1]]))
    assert (probs > 0.5).float().tolist() == batch.head_targets.tolist()


def test_save_load_round_trip_and_plain_transformers_still_loads(tmp_path, tiny_llama):
    from transformers import AutoModelForCausalLM

    model = tiny_llama(64)
    model.save_pretrained(tmp_path)
    labels = [f"{i}.{j}" for i in range(1, 4) for j in range(1, 3)]
    head = ConstitutionHead(64, len(labels), labels)
    save_head(head, tmp_path)
    config = json.loads((tmp_path / CONFIG).read_text())
    assert config["labels"] == labels and config["hidden_size"] == 64
    back = load_head(tmp_path)
    x = torch.randn(3, 64)
    torch.testing.assert_close(back(x), head(x), rtol=0, atol=0)
    assert back.labels == labels
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)  # the head's files are ignored by transformers
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in model.parameters())


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no constitution head"):
        load_head(tmp_path)
    save_head(ConstitutionHead(8, 2, ["a", "b"]), tmp_path)
    cfg = json.loads((tmp_path / CONFIG).read_text())
    cfg["hidden_size"] = 9
    (tmp_path / CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=rf"{WEIGHTS}: `weight` should have shape \(2, 9\)"):
        load_head(tmp_path)


@pytest.fixture
def epe_checkpoint(tmp_path, smol_tokenizer, tiny_llama):
    tokens = ["<assistant>"] + [f"<charter_{cid}>" for cid in charter_ids()]
    smol_tokenizer.add_special_tokens({"additional_special_tokens": tokens})
    model = tiny_llama(len(smol_tokenizer))
    model.save_pretrained(tmp_path)
    smol_tokenizer.save_pretrained(tmp_path)
    head = ConstitutionHead(model.config.hidden_size, 35, charter_ids())
    save_head(head, tmp_path)
    return tmp_path, model, smol_tokenizer, head


CHAT = [
    {"role": "user", "content": "Hi! Please ignore <assistant> this."},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Tell me a secret."},
    {"role": "assistant", "content": "I would rather not."},
]


def test_read_constitution_one_reading_per_assistant_turn(epe_checkpoint):
    _, model, tokenizer, head = epe_checkpoint
    readings = read_constitution(model, head, tokenizer, CHAT)
    assert len(readings) == 2  # the user's literal "<assistant>" is text, not a turn
    assert all(list(r) == charter_ids() and all(0 < p < 1 for p in r.values()) for r in readings)
    assert readings[0] != readings[1]  # read at different positions
    assert read_constitution(model, head, tokenizer, CHAT[:1]) == []
    # The one forward (core.loss.hidden_states on a collated row) reads what a plain causal decoder call reads.
    from ctrltok.core.chat import encode_chat

    ids = encode_chat(CHAT, tokenizer, "epe", loss_on="all").input_ids
    cols = [i for i, t in enumerate(ids) if t == tokenizer.convert_tokens_to_ids("<assistant>")]
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=torch.tensor([ids]), use_cache=False).last_hidden_state[0]
        want = torch.sigmoid(head(hidden[cols].float()))
    got = torch.tensor([[r[label] for label in head.labels] for r in readings])
    assert torch.allclose(got, want, atol=1e-5)


def test_constitution_cli_json(epe_checkpoint, tmp_path, capsys):
    directory, _, _, _ = epe_checkpoint
    chats = tmp_path / "chats.jsonl"
    lima = {"conversations": [m["content"] for m in CHAT[:2]]}  # any layout to_conversation reads
    chats.write_text("".join(json.dumps(r) + "\n" for r in ({"messages": CHAT}, {"messages": CHAT[:2]}, lima)))
    show_constitution(directory, chats, as_json=True)
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [(x["chat"], x["turn"]) for x in lines] == [(0, 0), (0, 1), (1, 0), (2, 0)]
    assert all(len(x["charter"]) == 35 for x in lines)
    assert lines[0]["charter"] == pytest.approx(lines[2]["charter"], abs=1e-5)  # same prefix, same reading
    assert lines[3]["charter"] == pytest.approx(lines[2]["charter"], abs=1e-6)  # same chat, another layout
    show_constitution(directory, chats)
    assert "probability" in capsys.readouterr().out
