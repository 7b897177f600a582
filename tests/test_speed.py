"""``bench`` under the speed protocol on the tiny model: behaviour, never wall time. A plan that
removes nothing must give an interval containing 1.0; the JSON carries every speedup with its
interval, rounds and verdicts, the expectation and the load it was measured under."""
import json

from shedder.cli import main
from shedder.core.plan import PruningPlan

FAST = ["--seq-len", "16", "--new-tokens", "2", "--budget-s", "1", "--no-memory", "--no-progress"]


def bench(capsys, tiny_model_dir, plan_path, *extra) -> dict:
    assert main(["bench", "--model", str(tiny_model_dir), "--plan", str(plan_path), *FAST, *extra, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_plan_that_removes_nothing_gives_an_interval_containing_one(capsys, tiny_model_dir, tmp_path):
    empty = tmp_path / "empty.json"
    PruningPlan().save(empty)
    # A correct 95 % interval misses the truth in about 1 run of 20; two independent runs both missing
    # (about 1 in 400) is a real bias, which is what this test is for.
    results = [bench(capsys, tiny_model_dir, empty) for _ in range(2)]
    for r in results:
        for phase in ("prefill", "decode"):
            m = r[f"measured_{phase}_speedup"]
            assert set(m) == {"median", "ci95", "rounds", "noisy", "resolved"}
            assert m["rounds"] >= 6 and m["ci95"][0] <= m["median"] <= m["ci95"][1]
            assert r[f"expected_{phase}_speedup"] == 1.0
        assert r["protocol"]["rounds"] >= 6 and r["protocol"]["stopped"]
        assert set(r["protocol"]["load_per_cpu"]) == {"start", "end"}
        assert r["original"]["iterations_per_sample"] == r["pruned"]["iterations_per_sample"]
    for phase in ("prefill", "decode"):
        assert any(lo <= 1.0 <= hi for lo, hi in (r[f"measured_{phase}_speedup"]["ci95"] for r in results))


def test_the_text_report_prints_one_speedup_with_its_interval(capsys, tiny_model_dir, tmp_path):
    PruningPlan.from_dict({"schema_version": 1, "components": ["block:1"]}).save(tmp_path / "p.json")
    assert main(["bench", "--model", str(tiny_model_dir), "--plan", str(tmp_path / "p.json"), *FAST,
                 "--min-rounds", "6"]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("prefill speedup: "))
    assert "× [" in line and " rounds" in line and "expected" in line and "from FLOPs" in line
    assert "decode speedup:" in out and "if memory-bound" in out and "protocol: paired interleaved rounds" in out
    assert "prefill tokens/s (per model)" in out and "(see speedup)" in out  # per-model medians: supporting only
