"""The Answer section's text, from real reports: answer first, plain words, demo flag, research notice."""
from __future__ import annotations

import html

import pytest
from MedPrunerSlicerLib.answer_view import (
    DEMO_MODEL_TEXT,
    RESEARCH_NOTICE,
    answer_html,
    compare_rows,
    details_html,
    is_demo_answer,
)


@pytest.fixture(scope="module")
def report(engine, tmp_path_factory):
    """A real report of the tiny demo model on the phantom, with the unpruned comparison."""
    from medpruner.phantom import make_phantom_ct
    from medpruner.pipeline import AskRequest, run_ask

    out = tmp_path_factory.mktemp("answer-view")
    return run_ask(engine, make_phantom_ct(), AskRequest(question="Is the liver <normal> & round?", max_new_tokens=4,
                                                         compare=True), out)


def test_the_demo_models_answers_are_flagged_and_a_real_models_are_not(report):
    assert is_demo_answer(report)
    shown = answer_html(report)
    assert DEMO_MODEL_TEXT in shown
    # the flag comes before the answer, so it is read first
    assert shown.index(DEMO_MODEL_TEXT) < shown.index(html.escape(report["answer"].strip()) or "(the model")
    real = {**report, "demo_model": False}
    assert not is_demo_answer(real) and DEMO_MODEL_TEXT not in answer_html(real)
    assert not is_demo_answer({k: v for k, v in report.items() if k != "demo_model"})   # an older server


def test_every_answer_carries_the_research_notice_and_escapes_the_text(report):
    for r in (report, {**report, "demo_model": False}):
        shown = answer_html(r)
        assert RESEARCH_NOTICE in shown
        assert "Is the liver &lt;normal&gt; &amp; round?" in shown and "<normal>" not in shown
    # the question is shown small above the answer, the answer large
    shown = answer_html({**report, "answer": "A lesion in segment VII."})
    assert shown.index("Is the liver") < shown.index("A lesion in segment VII.")
    assert 'font-size:14pt;"><b>A lesion in segment VII.' in shown


def test_details_say_what_the_model_looked_at_in_plain_words(report):
    text = details_html(report)
    slices, tokens = report["slices"], report["tokens"]
    assert f"Looked at {slices['kept']} of {slices['sent']} slices" in text
    assert f"{tokens['kept_visual']:,} of {tokens['total_visual']:,} image regions" in text
    assert f"({100 * tokens['retention']:.1f} %)" in text
    assert f"{report['timings_s']['total']:.1f} s" in text
    # a local checkpoint folder is named by its folder, not its full path; a hub id stays whole
    assert report["model_id"] not in text and report["model_id"].rstrip("/").rsplit("/", 1)[-1] in text
    assert "Qwen/Qwen3-VL-8B-Instruct" in details_html({**report, "model_id": "Qwen/Qwen3-VL-8B-Instruct"})
    noted = {**report, "input": {**report["input"], "notes": ["GEOMETRY ASSUMED: no positions"]}}
    assert "WARNING:</b> GEOMETRY ASSUMED" in details_html(noted)


def test_the_comparison_rows_come_from_both_answers(report):
    rows = {label: (pruned, unpruned) for label, pruned, unpruned in compare_rows(report)}
    assert rows["Answer"] == (report["answer"], report["unpruned"]["answer"])
    counts = report["unpruned"]["counts"]
    assert rows["Image regions"][1] == f"{counts['visual_tokens_kept']} / {counts['visual_tokens_total']}"
    assert rows["Image regions"][0] == f"{report['tokens']['kept_visual']} / {report['tokens']['total_visual']}"
    assert compare_rows({k: v for k, v in report.items() if k != "unpruned"}) == []


def test_a_partial_answer_is_never_taken_for_a_finished_one():
    from MedPrunerSlicerLib.answer_view import partial_answer_html

    writing = partial_answer_html("Is it <big>?", "A lesion in")
    assert "Is it &lt;big&gt;?" in writing and "A lesion in &hellip;" in writing and RESEARCH_NOTICE in writing
    for state, words in (("cancelled", "cancelled: the answer is incomplete"),
                         ("failed", "failed: the answer is incomplete")):
        shown = partial_answer_html("Q?", "A lesion in", state)
        assert "A lesion in" in shown and words in shown and "&hellip;" not in shown
    with pytest.raises(KeyError):
        partial_answer_html("Q?", "x", "done")
