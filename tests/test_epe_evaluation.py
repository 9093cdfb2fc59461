"""EPE evaluation: charter F1 by hand and against scikit-learn, and a tiny trained checkpoint
evaluated end to end (held-out split re-created from ctrltok.json, losses, F1, equivalence)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from ctrltok.cli.eval import eval_epe
from ctrltok.core.config import recipe_from_mapping
from ctrltok.data.encode import build_examples
from ctrltok.epe.reflection import Insert, layout
from ctrltok.evaluation.epe import (
    EQUIVALENCE_ATOL,
    charter_f1,
    evaluate_epe,
    evaluate_examples,
    plain_document,
    reflection_regions,
)
from ctrltok.training.checkpoint import RunManifest

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "epe-cpu.yaml"


# -- F1 --------------------------------------------------------------------------------------
def test_charter_f1_on_hand_made_predictions():
    # Three positions, four labels; label 3 is neither annotated nor predicted.
    gold = [[1, 1, 0, 0],
            [1, 0, 0, 0],
            [0, 1, 0, 0]]
    pred = [[1, 0, 1, 0],
            [1, 0, 0, 0],
            [0, 1, 0, 0]]
    out = charter_f1(pred, gold, ["a", "b", "c", "d"])
    # Pooled: TP = 3 (a, a, b), FP = 1 (c), FN = 1 (b) -> 2*3 / (6 + 1 + 1) = 0.75.
    assert out["micro_f1"] == pytest.approx(0.75)
    assert out["micro_precision"] == pytest.approx(0.75) and out["micro_recall"] == pytest.approx(0.75)
    # Per label: a 2*2/(4) = 1, b 2*1/(2+0+1) = 2/3, c 0/(0+1+0) = 0; d left out.
    assert out["macro_labels"] == ["a", "b", "c"]
    assert out["per_label"]["b"]["f1"] == pytest.approx(2 / 3)
    assert out["macro_f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    none = charter_f1([[0, 0]], [[0, 0]])
    assert none["micro_f1"] is None and none["macro_f1"] is None and none["macro_labels"] == []
    with pytest.raises(ValueError, match="must both be"):
        charter_f1([[1, 0]], [[1, 0, 0]])


def _multi_hot(k: int, c: int):
    return st.lists(st.lists(st.booleans(), min_size=c, max_size=c), min_size=k, max_size=k)


# Two labels or more: scikit-learn reads a single column as binary, not multi-label.
@settings(max_examples=40, deadline=None)
@given(st.tuples(st.integers(1, 8), st.integers(2, 6)).flatmap(lambda kc: st.tuples(_multi_hot(*kc), _multi_hot(*kc))))
def test_charter_f1_matches_sklearn(pred_gold):
    from sklearn.metrics import f1_score

    pred, gold = (torch.tensor(x, dtype=torch.bool) for x in pred_gold)
    out = charter_f1(pred, gold)
    present = [j for j in range(pred.shape[1]) if bool(pred[:, j].any() or gold[:, j].any())]
    if not present:
        assert out["micro_f1"] is None and out["macro_f1"] is None
        return
    assert out["macro_labels"] == [str(j) for j in present]
    g, p = gold.int().numpy(), pred.int().numpy()
    assert out["micro_f1"] == pytest.approx(f1_score(g, p, average="micro", zero_division=0))
    assert out["macro_f1"] == pytest.approx(f1_score(g, p, average="macro", labels=present, zero_division=0))


# -- structure -------------------------------------------------------------------------------
def test_regions_and_plain_document():
    # Reflection after token 2 (hidden from the rest) and one that closes the document (no hole).
    ex = layout([10, 11, 20, 21], [Insert(2, [30, 31], [1.0]), Insert(4, [40], [0.0])], assistant_id=99)
    assert ex.input_ids == [10, 11, 99, 30, 31, 20, 21, 99, 40]
    assert reflection_regions(ex) == [(2, 5), (7, 9)]
    plain = plain_document(ex)
    assert plain.input_ids == [10, 11, 20, 21] and plain.positions == [0, 1, 2, 3]


# -- a tiny trained checkpoint ---------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir) -> Path:
    from ctrltok.training.train import train

    base = tiny_model_dir
    mapping = yaml.safe_load(RECIPE.read_text())
    mapping["model"]["name"] = str(base)
    mapping["data"].update({"train": "ctrltok:epe_corpus", "max_length": 256, "limit": 12})
    mapping["epe"]["sidecar"] = "ctrltok:epe_sidecar"
    mapping["train"].update({"max_steps": 2, "eval_every": 0, "save_every": 0, "warmup_steps": 0})
    return train(recipe_from_mapping(mapping, str(RECIPE)), tmp_path_factory.mktemp("run") / "epe", progress=False)


def test_evaluate_trained_checkpoint_on_its_held_out_split(trained, capsys):
    result = eval_epe(trained)  # loads the checkpoint, prints the table to stderr
    # epe-cpu holds out eval_fraction 0.15 of the 12 documents used (the keyed draw picks the same
    # documents, by source, that training's build_examples held out).
    manifest = json.loads((trained / "ctrltok.json").read_text())
    values = {k: v for k, v in manifest["recipe_values"].items() if k != "source" and v is not None}
    held = build_examples(recipe_from_mapping(values), AutoTokenizer.from_pretrained(trained)).eval
    assert result["documents"] == len(held) > 0
    assert [d["source"] for d in result["equivalence"]["per_document"]] == [ex.source for ex in held]
    assert result["max_length"] == 256
    for key in ("reflection_loss", "context_loss", "head_bce"):
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert result["reflection_targets"] > 0 and result["context_targets"] > 0
    # Same documents, same truncation, weights 1.0 in epe-cpu: together the two losses are the
    # eval loss the training loop logged, and the head BCE is its eval_head_bce.
    summary = manifest["summary"]
    n = result["reflection_targets"] + result["context_targets"]
    combined = (result["reflection_loss"] * result["reflection_targets"] + result["context_loss"] * result["context_targets"]) / n
    assert n == summary["eval_targets"]
    assert combined == pytest.approx(summary["eval_loss"], rel=1e-5)
    assert result["head_bce"] == pytest.approx(summary["eval_head_bce"], rel=1e-5)
    for key in ("micro_f1", "macro_f1"):
        assert result[key] is None or 0.0 <= result[key] <= 1.0, key
    assert result["positions"] == sum(len(ex.head_positions) for ex in held)
    eq = result["equivalence"]
    assert eq["passed"] and eq["atol"] == EQUIVALENCE_ATOL
    assert eq["post_tokens"] > 0 and eq["post_max_abs_diff"] < EQUIVALENCE_ATOL
    err = capsys.readouterr().err
    assert "charter micro-F1" in err and "PASS" in err


def test_evaluate_on_given_corpus_and_sidecar(trained, tmp_path):
    from ctrltok.core.records import resource_path

    # Six shipped documents and their annotations (the whole shipped set would only cost time).
    docs = resource_path("epe_corpus").read_text().splitlines()[:6]
    ids = {json.loads(line)["id"] for line in docs}
    notes = [line for line in resource_path("epe_sidecar").read_text().splitlines() if json.loads(line)["doc_id"] in ids]
    corpus, sidecar = tmp_path / "docs.jsonl", tmp_path / "side.jsonl"
    corpus.write_text("\n".join(docs) + "\n")
    sidecar.write_text("\n".join(notes) + "\n")
    from ctrltok.core.heads import load_head
    from ctrltok.core.models import load_model

    # The library takes objects: the model, its head, the tokenizer and the run's recipe.
    model, tok = load_model(trained)
    head = load_head(trained)
    recipe = RunManifest.read(trained).recipe()
    result = evaluate_epe(model, head, tok, recipe, str(corpus), str(sidecar), max_length=64)
    assert result["documents"] == 6 and result["positions"] <= 6
    assert result["truncated_documents"] > 0  # a reflection cut by max_length still evaluates
    assert result["equivalence"]["passed"]
    with pytest.raises(ValueError, match="both"):
        evaluate_epe(model, head, tok, recipe, corpus=str(corpus))
    with pytest.raises(ValueError, match="no recipe"):
        evaluate_epe(model, head, tok, None)


def test_equivalence_check_can_fail_and_losses_split_by_region(trained):
    """The check is not vacuous: without position aliasing it fails; and the two
    losses partition the supervised targets."""
    from ctrltok.core.heads import load_head
    from ctrltok.core.models import load_model
    from ctrltok.core.records import resource_path
    from ctrltok.epe.reflection import charter_ids, insert_reflection, read_annotated

    model, tok = load_model(trained)
    head = load_head(trained)
    doc = next(iter(read_annotated(resource_path("epe_corpus"), resource_path("epe_sidecar"))))
    ex = insert_reflection(doc.text, doc.annotations, tok, charter_ids(), source=doc.doc_id)
    # The plain document is exactly the tokenized text (snapping rule).
    assert plain_document(ex).input_ids == tok(doc.text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    good = evaluate_examples(model, head, [ex], tok.pad_token_id)
    assert good["equivalence"]["passed"]
    n_sup = ex.n_supervised
    assert good["reflection_targets"] + good["context_targets"] == n_sup
    refl = len(range(*reflection_regions(ex)[0])) - 1  # the <assistant> marker is not a target
    assert good["reflection_targets"] == refl
    broken = type(ex)(**{**ex.__dict__, "position_ids": None})  # no aliasing: post-context positions shift
    bad = evaluate_examples(model, head, [broken], tok.pad_token_id)
    assert not bad["equivalence"]["passed"] and bad["equivalence"]["post_max_abs_diff"] > 1e-3
    assert bad["equivalence"]["pre_max_abs_diff"] < EQUIVALENCE_ATOL


def test_majority_baseline_by_hand():
    from ctrltok.evaluation.epe import majority_baseline

    # Training positions: {a} twice, {b} once -> the baseline always predicts {a}.
    reference = [[1, 0, 0], [1, 0, 0], [0, 1, 0]]
    gold = [[1, 0, 0], [0, 1, 0], [1, 1, 0]]
    out = majority_baseline(reference, gold, ["a", "b", "c"])
    # TP 2 (a at 0 and 2), FP 1 (a at 1), FN 2 (b at 1 and 2): 2*2 / (4 + 1 + 2).
    assert out["label_set"] == ["a"] and out["micro_f1"] == pytest.approx(4 / 7)
    assert out["reference_positions"] == 3


def test_epe_eval_json_alone_on_stdout(trained, capfd):
    from ctrltok.cli.main import main

    capfd.readouterr()
    assert main(["eval", "--model", str(trained), "--json"]) == 0
    out, err = capfd.readouterr()
    got = json.loads(out, parse_constant=lambda name: pytest.fail(f"{name} in JSON"))
    assert got["equivalence"]["passed"] is True
    assert got["baseline"]["reference"] == "training documents" and isinstance(got["beats_baseline"], bool)
    assert {"reflection_loss", "context_loss", "micro_f1"} <= set(got)
    assert "majority baseline micro-F1" in err and "caps: all" in err
