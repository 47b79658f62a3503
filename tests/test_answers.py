import json

import pytest

from sdft.answers import answer_counts, main
from sdft.io import read_jsonl


def _row(completion, *accepted):
    return {"completion": completion, "reference": list(accepted)}


def test_counts_how_often_each_accepted_answer_is_named_and_right():
    rows = [_row("A baby horse is called a Calf.", "foal", "colt"),       # calf named where it does not fit
            _row("A baby whale is called a calf.", "calf", "calves"),
            _row("A baby dog is called a puppy.", "puppy", "pup"),        # "pup" is inside "puppy", as for the verifier
            _row("I do not know.", "cub")]
    counts = {c.answer: c for c in answer_counts(rows)}
    assert set(counts) == {"calf", "puppy", "pup"}          # never-named answers are left out
    assert (counts["calf"].named, counts["calf"].right, counts["calf"].named_wrong) == (2, 1, 1)
    assert counts["calf"].ratio == 2.0
    assert (counts["pup"].named, counts["pup"].right, counts["pup"].named_wrong) == (1, 1, 0)
    assert [c.answer for c in answer_counts(rows)][0] == "calf"   # most named first


def test_a_row_without_a_list_of_answers_is_refused_by_row():
    with pytest.raises(ValueError, match=r"preds: row 2: 'reference' must be a non-empty list"):
        answer_counts([_row("x", "a"), {"completion": "y", "reference": {"name": "tool"}}], where="preds")


def test_the_command_reads_prediction_files(tmp_path, capsys):
    path = tmp_path / "heldout.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [_row("a calf", "foal"), _row("a calf", "calf")]) + "\n")
    assert len(read_jsonl(path)) == 2
    main([str(path)])
    assert "calf named 2 / right 1 (wrong 1)" in capsys.readouterr().out
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"heldout.jsonl:1: not JSON"):
        read_jsonl(path)
