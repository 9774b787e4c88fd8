"""`medpruner bench` end to end on CPU with the tiny model: every field present, supplied masks really used."""
from __future__ import annotations

import json
import math

import pytest

from medpruner import bench
from medpruner.bench import BenchSettings, markdown_table, noisy_measurements, parse_slice_counts, run_bench, write_outputs
from medpruner.errors import InputError

SETTINGS = BenchSettings(slices=(4, 6), repeats=1, max_new_tokens=3)


@pytest.fixture(scope="module")
def record(engine):
    return run_bench(engine, SETTINGS)


def test_record_has_every_field(record):
    assert record["schema"] == "medpruner.bench/1"
    assert [e["slices"] for e in record["results"]] == [4, 6]
    modes = {"full", "followup:natural"} | {
        f"{m}:{op}" for m in ("pruned", "reference", "ideal") for op in ("natural", "s50-t10", "s50-t5")
    }
    for entry in record["results"]:
        assert set(entry["modes"]) == modes
        for mode, summary in entry["modes"].items():
            for key in ("tta_s", "ttft_s", "vision_s", "pruning_s", "prefill_s", "decode_s", "decode_tokens_per_s"):
                assert summary[key]["median"] is not None and summary[key]["min"] <= summary[key]["max"]
            assert summary["peak_memory_bytes"]["median"] is None   # CPU
            assert summary["generated_tokens"] == SETTINGS.max_new_tokens
            # The engine decodes on a static cache on CPU; the stock mode with the stock generate.
            assert summary["decode_path"] == ("stock generate (dynamic-cache, eager)" if mode == "full" else "static-cache")
        for mode, runs in entry["raw"].items():
            for run in runs:    # time to answer = time to first token + decoding the whole answer
                assert run["tta_s"] == pytest.approx(run["ttft_s"] + run["decode_s"], abs=1e-9)
                assert run["decode_s"] > 0 and run["tta_s"] > run["ttft_s"]
                assert run["decode_tokens_per_s"] == pytest.approx((SETTINGS.max_new_tokens - 1) / run["decode_s"])
        for ratios in entry["ratios"].values():
            for key in ("full_over_pruned", "pruned_over_ideal", "reference_over_pruned",
                        "overhead_share_of_pruned_ttft", "vision_pruned_over_full", "visual_token_share",
                        "full_over_pruned_tta", "pruned_over_ideal_tta", "reference_over_pruned_tta",
                        "decode_speed_pruned_over_full"):
                assert ratios[key] is not None
        assert all(len(runs) == SETTINGS.repeats for runs in entry["raw"].values())
        assert entry["followup"]["fresh_pruned_over_followup"] is not None
        assert entry["followup"]["full_over_followup"] is not None
        assert entry["followup"]["fresh_pruned_over_followup_tta"] is not None
        # A follow-up runs no vision and no selection, and prefills only the question.
        followup = entry["modes"]["followup:natural"]
        assert followup["vision_s"]["max"] == 0 and followup["pruning_s"]["max"] == 0
    assert record["decode_path"] == "static-cache"
    json.dumps(record, allow_nan=False)


def test_stock_run_is_not_synchronised_per_token(engine, monkeypatch):
    """The stock mode's instrumentation waits for the device a fixed number of times, not once per token."""
    images = bench._bench_images(engine, 3)
    pixels = engine.adapter.preprocess(list(images))
    h, w = pixels.token_grid
    input_ids = engine.adapter.prompt_ids(3, h * w, SETTINGS.question)
    waits = []
    original = bench._Timer.now
    monkeypatch.setattr(bench._Timer, "now", lambda self: waits.append(1) or original(self))
    counts = {}
    for tokens in (2, 9):
        waits.clear()
        run = bench._run_full(engine, pixels, input_ids, BenchSettings(max_new_tokens=tokens), bench._Timer(engine.device))
        counts[tokens] = len(waits)
        assert run["generated_tokens"] == tokens and 0 < run["ttft_s"] < run["tta_s"]
    assert counts[2] == counts[9] <= 2


def test_supplied_masks_are_the_ones_the_engine_used(record):
    for entry in record["results"]:
        n = entry["tokens_per_slice"]
        for op, share in (("s50-t10", 0.10), ("s50-t5", 0.05)):
            masks = entry["masks"][op]
            assert masks["engine_slice_kept"] == masks["supplied_slice_mask"]
            assert sum(masks["supplied_slice_mask"]) == round(0.5 * entry["slices"])
            nucleus = math.ceil(share * n)
            expected = nucleus + min(max(int(0.05 * n), 1), n - nucleus)
            for kept, tokens in zip(masks["engine_slice_kept"], masks["engine_tokens_kept_per_slice"]):
                assert tokens == (expected if kept else 0)
            assert entry["modes"][f"pruned:{op}"]["visual_tokens_kept"] == expected * sum(masks["engine_slice_kept"])
        for op in ("natural", "s50-t10", "s50-t5"):
            assert entry["masks"][op]["reference_decisions_equal"]
            pruned, ideal = entry["modes"][f"pruned:{op}"], entry["modes"][f"ideal:{op}"]
            assert pruned["visual_tokens_kept"] == ideal["visual_tokens_kept"]
            assert pruned["prompt_tokens"] == ideal["prompt_tokens"] < entry["modes"]["full"]["prompt_tokens"] or op == "natural"


def test_outputs_written(record, tmp_path):
    paths = write_outputs(record, tmp_path)
    assert sorted(p.name for p in paths) == ["bench.json", "bench.md", "bench_split.png", "bench_tta.png",
                                             "bench_ttft.png"]
    table = (tmp_path / "bench.md").read_text()
    # 3 operating points for TTA, 3 for TTFT, one follow-up row
    assert table.count("\n| 4 |") == 7 and table.count("\n| 6 |") == 7
    assert table.index("| TTA full |") < table.index("| TTFT full |")      # time to answer is the headline
    assert "Follow-up question" in table
    assert json.loads((tmp_path / "bench.json").read_text())["results"][0]["slices"] == 4


def test_repeats_that_disagree_are_flagged(record):
    import copy

    steady = copy.deepcopy(record)
    for entry in steady["results"]:
        for summary in entry["modes"].values():
            for key in ("tta_s", "ttft_s"):
                median = summary[key]["median"]
                summary[key].update(q1=median * 0.95, q3=median * 1.05)      # 10 % of the median
    assert noisy_measurements(steady) == [] and "Warning" not in markdown_table(steady)
    noisy = copy.deepcopy(steady)
    ttft = noisy["results"][1]["modes"]["pruned:natural"]["ttft_s"]
    ttft.update(q1=ttft["median"] * 0.7, q3=ttft["median"] * 1.3)          # 60 %
    assert noisy_measurements(noisy) == ["6 slices, pruned:natural (+-30 %)"]
    assert "Warning: the repeats disagree" in markdown_table(noisy) and "6 slices, pruned:natural" in markdown_table(noisy)


@pytest.mark.parametrize("text", ["", "a,b", "0,4", "16,5000"])
def test_bad_slice_lists(text):
    with pytest.raises(InputError):
        parse_slice_counts(text)
