"""``bench dtype``: float32 vs bfloat16, the speed by the paired protocol and the agreement."""
import json

from shedder.cli import main


def test_bench_dtype_reports_speed_with_its_interval_and_the_agreement(capsys):
    assert main(["bench", "dtype", "--samples", "4", "--seq-len", "32", "--steps", "1", "--top", "3",
                 "--budget-s", "0.1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    speed = r["eval_speedup"]
    assert speed["rounds"] >= 6 and speed["ci95"][0] <= speed["median"] <= speed["ci95"][1]
    assert r["ppl_rel_diff"] < 0.05  # bfloat16 rounds; a trained tiny model agrees to a few per cent at most
    assert 0 <= r["score"]["top_overlap"] <= 3 and -1 <= r["score"]["spearman"] <= 1
    assert r["search"]["identical_steps"] in (0, 1) and len(r["search"]["choices"]["bfloat16"]) == 1


def test_bench_dtype_text_report_says_which_timings_are_single_runs(capsys):
    assert main(["bench", "dtype", "--samples", "4", "--seq-len", "32", "--steps", "1", "--budget-s", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "rounds" in out and out.count("single run") == 2 and "choices identical" in out
