"""Scoring exactly as BLINK does: the answer parsers, distributed evaluation, hidden-answer (test) splits."""
import json
import os
import re
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny_overrides

import livr.training.evaluate as ev
from livr.config import ConfigError, load_config
from livr.data.prompts import PARSERS, is_correct, parse_answer, predicted
from livr.data.synthetic import generate_task
from livr.data.tasks import DataError
from livr.training.distributed import teardown_distributed

# (output, number of choices, BLINK's prediction, livr lenient): hand-derived from BLINK's analyze_answer
# (eval/test_benchmark.py): whole output == "A".."E" or "(A)".."(E)" (no strip); else "(X)" must be a whole
# whitespace token, unique in the last "\n\n" paragraph or in the whole output; otherwise its LLM judge (None).
MC_CASES = [
    ("A", 4, "A", "A"),
    ("(B)", 4, "B", "B"),
    ("(B).", 4, None, "B"),  # token "(B)." is not "(B)"
    ("**(A)**", 4, None, "A"),  # markdown bold: no whole token
    ("(D),", 4, None, "D"),  # punctuation glued to the letter
    ("The answer is (C) because it is darker.", 4, "C", "C"),
    ("The answer is (C).", 4, None, "C"),
    ("(A) or (B)", 4, None, None),  # two letters in one paragraph
    ("(B) B is darker than (B)", 4, "B", "B"),  # the same letter twice is one letter
    ("Options (A) and (C) look alike.\n\nSo the answer is (C)", 4, "C", "C"),  # last paragraph decides
    ("(A) is wrong, (B) is wrong.\n\n(C) and (D) both fit", 4, None, None),
    ("(A)\n\n(B)", 4, "B", "B"),
    ("answer: (D)\n\nI am not sure", 4, "D", "D"),  # unique overall, nothing in the last paragraph
    ("(A)\n\n", 4, "A", "A"),
    (" A", 4, None, "A"),  # no strip(): not a bare letter, and no "(X)" token
    ("A\n", 4, None, "A"),
    ("(B)\n", 4, "B", "B"),  # not the whole output, but a unique whole token
    (" (B) ", 4, "B", "B"),
    ("\n(A)", 4, "A", "A"),
    ("E", 2, "E", None),  # BLINK turns any bare A-E into "(E)" (scored wrong)
    ("(E)", 4, "E", None),
    ("C", 2, "C", None),
    ("(C) the third image", 2, None, None),  # out-of-range token: not among the valid "(X)"
    ("F", 4, None, None),
    ("F", 6, "F", "F"),  # more than five choices: any valid letter
    ("(F)", 6, "F", "F"),
    ("The answer is (F)", 6, "F", "F"),
    ("a", 4, None, None),  # case-sensitive
    ("(a)", 4, None, None),
    ("", 4, None, None),
    ("B.", 4, None, None),
    ("A.", 4, None, None),
    ("The answer is A", 4, None, None),
    ("I pick (A).\n\n(B)", 4, "B", "B"),
]

# (output, gold answer, correct under "blink", correct under "lenient"): open-ended = exact match of the whole
# normalised output (strip, lower-case, one trailing period dropped), as a numeral or an English number word.
OPEN_CASES = [
    ("3", "3", True, True),
    ("three", "3", True, False),
    ("Three.", "3", True, False),
    (" 3 ", "3", True, True),
    ("3\n", "3", True, True),
    ("3.", "3", True, True),
    ("3 or 4", "3", False, True),
    ("3, 4, 5, 6", "3", False, True),
    ("3 apples", "3", False, True),
    ("There are 3.", "3", False, True),
    ("4", "3", False, False),
    ("", "3", False, False),
    ("3.0", "3", False, True),
    ("10", "10", True, True),
    ("ten", "10", True, False),
    ("1", "10", False, False),
    ("100", "10", False, False),
    ("Twelve", "12", True, False),
    ("twenty", "20", True, False),
    ("seven", "7", True, False),
    ("7", "seven", True, True),
]


@pytest.mark.parametrize("output,n,blink,lenient", MC_CASES)
def test_multiple_choice_parsing(output, n, blink, lenient):
    assert parse_answer(output, n) == blink
    assert parse_answer(output, n, "blink") == blink
    assert parse_answer(output, n, "lenient") == lenient
    row = {"idx": "x", "choices": [f"c{i}" for i in range(n)], "answer": "(B)"}
    assert is_correct(output, row) == (blink == "B")
    assert predicted(output, row) == (None if blink is None else f"({blink})")


@pytest.mark.parametrize("output,answer,blink,lenient", OPEN_CASES)
def test_open_ended_exact_match(output, answer, blink, lenient):
    row = {"idx": "x", "choices": [], "answer": answer}
    assert is_correct(output, row) is blink
    assert is_correct(output, row, "blink") is blink
    assert is_correct(output, row, "lenient") is lenient


def test_parser_names_and_config():
    assert PARSERS == ("blink", "lenient", "match")
    assert predicted(" Three. ", {"choices": [], "answer": "3"}) == "3"
    assert predicted("3 or 4", {"choices": [], "answer": "3"}) is None
    assert predicted("3 or 4", {"choices": [], "answer": "3"}, "lenient") == "3"
    with pytest.raises(DataError, match="parser"):
        parse_answer("A", 2, "strict")
    assert load_config(None, []).eval.parser == "blink"
    assert load_config(None, ["eval.parser=lenient"]).eval.parser == "lenient"
    assert load_config(None, ["eval.parser=match"]).eval.parser == "match"
    with pytest.raises(ConfigError, match="eval.parser") as e:
        load_config(None, ["eval.parser=gpt"])
    assert "\n" not in str(e.value) and "match" in str(e.value)


# ----------------------------------------------------------------------------- evaluate_rows (canned outputs)
class _Model:
    training = False

    def eval(self):
        pass

    def train(self):
        pass


def _encode(row, with_answer=False):  # a one-token "prompt" per row: the canned generate reads the row's meta
    return {"input_ids": torch.tensor([0]), "labels": torch.tensor([-100]), "groups": torch.tensor([2])}


FAKE_LM = SimpleNamespace(model=_Model(), builder=SimpleNamespace(encode=_encode), device=torch.device("cpu"),
                          tokenizer=SimpleNamespace(pad_token_id=0))


def _rows(answer=None):
    rows = [dict(r) for r in generate_task("Jigsaw", 4, seed=1, split="test")]
    rows += [dict(r, choices=[], prompt="", answer="3") for r in generate_task("Counting", 2, seed=1, split="test")]
    if answer is not None:
        rows = [dict(r, answer=answer) for r in rows]
    return rows


def test_evaluate_rows_reports_both_parsers(monkeypatch):
    rows = _rows()
    gold = [r["answer"] for r in rows[:4]]
    outputs = {rows[0]["idx"]: gold[0], rows[1]["idx"]: f"**{gold[1]}**", rows[2]["idx"]: f" {gold[2][1]}",
               rows[3]["idx"]: "(A) or (B)", rows[4]["idx"]: "three", rows[5]["idx"]: "3 or 4"}
    monkeypatch.setattr(ev, "generate", lambda lm, batch, **kw: [outputs[m["idx"]] for m in batch["meta"]])
    res = ev.evaluate_rows(FAKE_LM, rows, batch_size=4)
    assert res["parser"] == "blink" and res["hidden"] is False
    assert res["accuracy"] == {"Jigsaw": 1 / 4, "Counting": 1 / 2}
    assert res["accuracy_by_parser"] == {"blink": {"Jigsaw": 1 / 4, "Counting": 1 / 2},
                                         "lenient": {"Jigsaw": 3 / 4, "Counting": 1 / 2},
                                         "match": {"Jigsaw": 3 / 4, "Counting": 1 / 2}}
    assert res["mean"] == pytest.approx((1 / 4 + 1 / 2) / 2)
    assert [p["idx"] for p in res["predictions"]] == [r["idx"] for r in rows]
    assert [p["prediction"] for p in res["predictions"]] == [gold[0], None, None, None, "3", None]
    assert [p["correct"] for p in res["predictions"]] == [True, False, False, False, True, False]
    assert res["predictions"][1]["output"] == f"**{gold[1]}**"
    lenient = ev.evaluate_rows(FAKE_LM, rows, batch_size=4, parser="lenient")
    assert lenient["accuracy"] == res["accuracy_by_parser"]["lenient"] and lenient["parser"] == "lenient"
    assert [p["prediction"] for p in lenient["predictions"]] == [gold[0], gold[1], gold[2], None, None, "3"]


def test_hidden_split_has_no_accuracy_and_a_submission(monkeypatch, tmp_path):
    rows = _rows("hidden")[:4]
    outs = ["A", "(B)", "**(A)**", "I cannot tell"]
    canned = dict(zip((r["idx"] for r in rows), outs))
    monkeypatch.setattr(ev, "generate", lambda lm, batch, **kw: [canned[m["idx"]] for m in batch["meta"]])
    res = ev.evaluate_rows(FAKE_LM, rows, batch_size=3, split="test")
    assert res["accuracy"] is None and res["mean"] is None and res["hidden"] is True
    assert res["accuracy_by_parser"] == {"blink": None, "lenient": None, "match": None} and res["n"] == {"Jigsaw": 4}
    assert [p["prediction"] for p in res["predictions"]] == ["(A)", "(B)", None, None]
    assert all(p["correct"] is None for p in res["predictions"])
    path = ev.write_submission(str(tmp_path / "sub" / "blink_submission_test.json"), res["predictions"])
    with open(path) as f:
        sub = json.load(f)
    assert sub == {rows[0]["idx"]: "(A)", rows[1]["idx"]: "(B)", rows[2]["idx"]: "(Z)", rows[3]["idx"]: "(Z)"}
    assert "n/a" in ev.table1([("run", None)], ["Jigsaw"])


def test_mixed_hidden_split_is_a_data_error():
    rows = _rows()[:4]
    rows[2] = dict(rows[2], answer="hidden")
    with pytest.raises(DataError, match=r"test: task Jigsaw idx=Jigsaw_test_2 .*all hidden") as e:
        ev.evaluate_rows(FAKE_LM, rows, split="test")  # raised before any generation
    assert "\n" not in str(e.value)
    assert ev.hidden_answers([]) is False and ev.hidden_answers(_rows("hidden")) is True


# ----------------------------------------------------------------------------- 2 processes
def _eval_rows(answers=None):
    rows = [dict(r) for r in generate_task("Jigsaw", 3, seed=5, split="test")]
    rows += [dict(r, choices=[], prompt="", answer="2") for r in generate_task("Counting", 2, seed=5, split="test")]
    return [dict(r, answer=(answers or {}).get(r["idx"], r["answer"])) for r in rows]
    # 5 rows: rank 0 scores 3, rank 1 scores 2 and runs a dummy batch


def _dist_worker(rank, world, overrides, answers, tmp, out):
    from livr.model.build import build_model

    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        lm = build_model(load_config(None, overrides))
        res = ev.evaluate_rows(lm, _eval_rows(answers), batch_size=1, max_new_tokens=3, rank=rank, world=world)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(res, f)
    finally:
        teardown_distributed()


@pytest.mark.slow
def test_two_process_eval_gathers_every_prediction(backbone_cache, data_cache, tmp_path):
    from livr.backbones import resolve_backbone_path
    from livr.model.build import build_model

    overrides = tiny_overrides(backbone_cache, data_cache, tmp_path, **{"model.backbone": "tiny-qwen2.5-vl",
                                                                        "latents.num_latents": 2})
    cfg = load_config(None, overrides)
    resolve_backbone_path(cfg.model.backbone, os.path.expanduser(cfg.model.cache_dir))  # materialised once, here
    torch.manual_seed(0)
    lm = build_model(cfg)
    # open-ended gold answers set to what the model's output holds, so that the lenient accuracy is not 0
    first = ev.evaluate_rows(lm, _eval_rows(), batch_size=1, max_new_tokens=3, parser="lenient")
    answers = {p["idx"]: p["prediction"] for p in first["predictions"] if p["task"] == "Counting" and p["prediction"]}
    out = str(tmp_path / "rank0.json")
    mp.spawn(_dist_worker, args=(2, overrides, answers, str(tmp_path), out), nprocs=2, join=True)
    with open(out) as f:
        res = json.load(f)
    rows = _eval_rows(answers)
    assert res["n"] == {"Counting": 2, "Jigsaw": 3}
    assert [p["idx"] for p in res["predictions"]] == [r["idx"] for r in rows]
    single = ev.evaluate_rows(lm, rows, batch_size=1, max_new_tokens=3)
    assert res["predictions"] == single["predictions"]
    assert res["accuracy"] == single["accuracy"] and res["accuracy_by_parser"] == single["accuracy_by_parser"]
    assert res["mean"] == single["mean"]


# ----------------------------------------------------------------------------- run + CLI on a hidden test split
def test_training_and_cli_write_a_blink_submission(backbone_cache, data_cache, tmp_path, capsys):
    import datasets

    from livr.cli import main
    from livr.training.train import train_worker

    hidden = [dict(r, answer="hidden", idx=f"test_Jigsaw_{i + 1}")
              for i, r in enumerate(generate_task("Jigsaw", 3, seed=7, split="test"))]
    src = tmp_path / "blink_test"
    datasets.Dataset.from_list(hidden).save_to_disk(str(src / "Jigsaw" / "test"))
    cfg = load_config(None, tiny_overrides(backbone_cache, data_cache, tmp_path, **{
        "name": "hidden", "data.tasks": "[Jigsaw]", "data.test_source": str(src), "train.stage1_steps": 1,
        "train.stage2_steps": 1, "eval.splits": "[test]", "eval.max_new_tokens": 2, "latents.num_latents": 2,
        "model.backbone": "tiny-qwen2.5-vl"}))
    final = train_worker(cfg)
    assert final["test_accuracy"] is None
    with open(os.path.join(cfg.run_dir, "final_metrics.json")) as f:
        assert json.load(f)["test_accuracy"] is None
    path = os.path.join(cfg.run_dir, "blink_submission_test.json")
    with open(path) as f:
        sub = json.load(f)
    assert list(sub) == [r["idx"] for r in hidden]
    assert all(re.fullmatch(r"\([A-Z]\)", v) for v in sub.values()), sub
    with open(os.path.join(cfg.run_dir, "eval.json")) as f:
        results = json.load(f)["results"]["test"]
    assert results["accuracy"] is None and len(results["predictions"]) == 3

    os.remove(path)
    capsys.readouterr()
    assert main(["eval", "--run", cfg.run_dir, "--split", "test"]) == 0
    printed = capsys.readouterr().out
    assert "n/a" in printed and "blink_submission_test.json" in printed
    with open(path) as f:
        assert json.load(f) == sub
    # livr inspect needs public answers: a one-line error, not a crash on the missing accuracy
    assert main(["inspect", "--run", cfg.run_dir, "--split", "test"]) == 2
    err = capsys.readouterr().err
    msg = err[err.index("livr: error:"):].strip()  # after the weight-loading progress bar
    assert msg.startswith("livr: error: livr inspect: split 'test' has hidden answers") and "\n" not in msg


def test_table1_mean_is_over_the_tasks_a_method_has():
    table = ev.table1([("A", {"Counting": 0.5, "Jigsaw": 1.0}), ("B", {"Counting": 0.25})])
    lines = table.splitlines()
    assert lines[0] == "| method | Count | Jigsaw | mean |"
    assert lines[2] == "| A | 50.00 | 100.00 | 75.00 |"
    assert lines[3] == "| B | 25.00 | – | 25.00 |"  # a missing task is not counted as 0


def test_generation_stops_at_end_of_turn_for_each_row(backbone_cache, data_cache, tmp_path):
    """A row that emitted end-of-turn is finished: whatever the model would say next is not appended, while
    the other rows of the batch keep decoding."""
    from livr.model.build import build_model

    lm = build_model(load_config(None, tiny_overrides(backbone_cache, data_cache, tmp_path)))
    lm.model.eval()
    eos = lm.tokenizer.convert_tokens_to_ids(lm.family.end_of_turn)
    word = lm.tokenizer("7", add_special_tokens=False)["input_ids"][0]
    calls = []

    def steer(module, args, kwargs, out):  # row 0: end-of-turn first, then "7"; row 1: always "7"
        logits = torch.full_like(out.logits[:, -1:], -1e4)
        logits[:, :, word] = 0
        if not calls:
            logits[0, :, eos], logits[0, :, word] = 0, -1e4
        calls.append(1)
        out.logits[:, -1:] = logits
        return out

    handle = lm.model.register_forward_hook(steer, with_kwargs=True)
    try:
        rows = generate_task("Counting", 2, seed=3)
        outs = ev.generate(lm, [lm.builder.encode(r, with_answer=False) for r in rows], max_new_tokens=3)
    finally:
        handle.remove()
    assert outs == ["", "777"]


# ----------------------------------------------------------------------------- eval.parser=match (judge-free)
REFL = ["A is darker", "B is darker", "About the same"]
IMGS = ["the second image", "the third image"]
POINTS = ["Point A", "Point B", "Point C", "Point D"]
# (output, choices, letter under "match"); blink's rule decides none of these except where noted
MATCH_CASES = [
    ("Point C", POINTS, "C"),
    ("Point C", None, "C"),  # the letter form needs no choice texts
    ("I think Point C is the corresponding point.", None, "C"),
    ("Box B", ["Box A", "Box B"], "B"),
    ("（C）", POINTS, "C"),  # full-width brackets
    ("答案是（B）", POINTS, "B"),
    ("Option C", None, "C"),
    ("C. Point C", POINTS, "C"),
    ("C) the third", None, "C"),
    ("C.", None, "C"),
    ("B\nThe third image shares the style.", IMGS, "B"),
    ("<|im_start|>B", IMGS, "B"),  # a leading special token
    ("<s> B", IMGS, "B"),
    ("B</s>", IMGS, "B"),
    ("The answer is C", None, "C"),
    ("Answer: (C).", None, "C"),
    ("**(A)**", IMGS, "A"),
    ("The third image shares the reference's style.", IMGS, "B"),
    ("the SECOND image!", IMGS, "A"),
    ("B is darker.", REFL, "B"),
    ("A is darker than B", REFL, "A"),
    ("They are about the same", REFL, "C"),
    ("ABOUT THE SAME", REFL, "C"),
    ("It is very dark.", ["dark", "very dark"], "B"),  # the longer choice text wins over the one inside it
    ("Dark, or very dark", ["very dark", "dark"], None),  # both found outside each other: ambiguous
    ("The second image fits. The third image does not.", IMGS, "A"),  # the first sentence decides
    ("Either the second image or the third image", IMGS, None),  # ambiguous
    ("Point A or Point B", POINTS, None),
    ("Point E", POINTS, None),  # not a choice letter
    ("I cannot tell.", IMGS, None),
    ("", IMGS, None),
]


@pytest.mark.parametrize("output,choices,letter", MATCH_CASES)
def test_match_parser(output, choices, letter):
    n = len(choices or POINTS)
    assert parse_answer(output, n, "match", choices) == letter
    assert parse_answer(output, n, "blink") is None  # BLINK's rule leaves all of these to its judge
    if choices:
        row = {"idx": "x", "choices": choices, "answer": f"({letter or 'A'})"}
        assert predicted(output, row, parser="match") == (None if letter is None else f"({letter})")
        assert is_correct(output, row, "match") is (letter is not None)
        assert predicted(output, row) is None  # blink: unchanged


def test_match_parser_takes_blinks_rule_first():
    # BLINK's rule decides: its letter, though the text names the other choice
    assert parse_answer("(A) the third image", 2, "match", IMGS) == "A"
    assert parse_answer("The third image\n\n(A)", 2, "match", IMGS) == "A"
    assert parse_answer("(A) looks close, but\n\n(B)", 2, "match", IMGS) == "B"  # BLINK's last paragraph
    assert parse_answer("B is darker", 3, "match", REFL) == "B"
    assert parse_answer("A", 3, "match", REFL) == "A" and parse_answer("E", 2, "match", IMGS) == "E"  # as BLINK
    # open-ended rows: exact numeric match, as blink
    assert predicted("three", {"choices": [], "answer": "3"}, parser="match") == "3"
    assert predicted("3 or 4", {"choices": [], "answer": "3"}, parser="match") is None


def test_eval_reports_match_beside_blink_and_report_shows_it(monkeypatch, tmp_path, capsys):
    from livr.cli import main

    rows = [dict(r, choices=IMGS) for r in generate_task("Jigsaw", 2, seed=1, split="test")]
    texts = {"(A)": "the second image", "(B)": "the third image"}
    outs = {r["idx"]: texts[r["answer"]] for r in rows}
    monkeypatch.setattr(ev, "generate", lambda lm, batch, **kw: [outs[m["idx"]] for m in batch["meta"]])
    res = ev.evaluate_rows(FAKE_LM, rows, batch_size=2, parser="match")
    assert res["accuracy"] == {"Jigsaw": 1.0} and res["accuracy_by_parser"]["blink"] == {"Jigsaw": 0.0}
    assert [p["prediction"] for p in res["predictions"]] == [r["answer"] for r in rows]
    assert ev.eval_metrics("test", res) == {"test_accuracy": 1.0, "test/Jigsaw": 1.0,
                                            "test_blink_accuracy": 0.0, "test_blink/Jigsaw": 0.0}
    blink = ev.evaluate_rows(FAKE_LM, rows, batch_size=2)
    assert ev.eval_metrics("test", blink)["test_match/Jigsaw"] == 1.0
    run = tmp_path / "run"
    ev.write_eval(str(run / "eval.json"), {"test": blink}, meta={"mode": "sft"})
    capsys.readouterr()
    assert main(["report", str(run)]) == 0
    assert "| SFT | 0.00 | 0.00 |" in capsys.readouterr().out  # the default: unchanged, the configured parser
    assert main(["report", str(run), "--parser", "match"]) == 0
    assert "| SFT | 100.00 | 100.00 |" in capsys.readouterr().out
