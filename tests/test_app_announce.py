"""The Importance page announces what scoring and Compare metrics will cost before they run (AppTest)."""
import test_app
from test_app import open_app

#: test_app's autouse fixture: each test's importance scores in a cache of its own.
private_cache = test_app.private_cache


def test_importance_page_announces_one_pass_metrics_and_compare_metrics_before_they_run():
    at = open_app("importance")
    at.selectbox(key="imp_metric").set_value("activation").run()
    assert any(c.value.startswith("Scoring: one forward pass") for c in at.caption)
    assert not any("at most" in c.value and c.value.startswith("Scoring") for c in at.caption)
    # Compare metrics (all four on the 8 blocks, then each on both halves): the CLI's cost line
    line = next(c.value for c in at.caption if c.value.startswith("Comparison:"))
    assert "at most 36 forward passes and 3 backward passes" in line  # 3 × (8 + 1 ppl, 1, 1, 1); taylor 3 ×
    at.multiselect(key="agree_metrics").set_value(["activation"]).run()
    assert any(c.value.startswith("Comparison: at most 3 forward passes") for c in at.caption)
