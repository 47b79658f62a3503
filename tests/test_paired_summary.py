"""summary.md shows the paired change of every benchmark evaluated before and after training on the same
items: items gained and lost and the exact McNemar p-value."""
from sdft.evaluation import EvalResult
from sdft.logs import write_summary


def _result(per_item):
    n, correct = len(per_item), sum(per_item)
    return EvalResult(name="b", split="val", n=n, correct=correct, pass_at_1=correct / n, ci_low=0.0, ci_high=1.0,
                      per_item=list(per_item))


def test_summary_lists_gained_lost_and_the_exact_p_value(tmp_path):
    before = {"heldout": _result([0] * 10 + [1] * 2), "retention": _result([1] * 12), "plain": 0.5}
    after = {"heldout": _result([1] * 9 + [0] + [1, 0]), "retention": _result([1] * 11 + [0]), "plain": 0.6}
    text = write_summary(tmp_path / "s.md", title="t", config={}, scores_before=before, scores_after=after,
                         notes=[]).read_text()
    assert "## Paired change on the same items" in text
    assert "| heldout | 9 | 1 | 0.0215 |" in text        # 2 * (1 + 10) / 2**10
    assert "| retention | 0 | 1 | 1 |" in text
    assert "| plain |" not in text.split("## Paired change")[1]   # no per-item outcomes: no row
    only_numbers = write_summary(tmp_path / "n.md", title="t", config={}, scores_before={"x": 0.1},
                                 scores_after={"x": 0.2}, notes=[]).read_text()
    assert "Paired change" not in only_numbers
