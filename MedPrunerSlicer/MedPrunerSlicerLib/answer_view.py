"""What the Answer section shows, as HTML built from a report (Qt-free, so it is tested headless).

The answer comes first and large; the question it answers sits above it in grey; the counts, times
and model follow in one short line in plain words ("looked at 22 of 32 slices"). An answer from the
random-weight demo model is flagged in the answer itself, and every answer carries the
research-use notice, so a screenshot of the panel never shows an answer without them.
"""
from __future__ import annotations

import html

__all__ = ["DEMO_MODEL_TEXT", "RESEARCH_NOTICE", "answer_html", "compare_rows", "details_html", "is_demo_answer",
           "partial_answer_html"]

RESEARCH_NOTICE = ("For research use only: not a medical device, not for diagnosis or treatment. "
                   "Check every answer against the images.")
DEMO_MODEL_TEXT = "Demo model: random weights, the answer is meaningless."


def is_demo_answer(report: dict) -> bool:
    """True when the answer came from the tiny random-weight demo model (the server says so)."""
    return bool(report.get("demo_model"))


def answer_html(report: dict) -> str:
    """The question (small, grey) and the answer (large); the demo flag above the answer when it applies."""
    question = html.escape(str(report.get("question", "")))
    answer = html.escape(str(report.get("answer", "")).strip()) or "<i>(the model gave an empty answer)</i>"
    parts = [f'<p style="color:#666666;">{question}</p>']
    if is_demo_answer(report):
        parts.append(f'<p style="color:#ffffff; background-color:#b3261e;"><b>&nbsp;{html.escape(DEMO_MODEL_TEXT)}'
                     "&nbsp;</b></p>")
    parts.append(f'<p style="font-size:14pt;"><b>{answer}</b></p>')
    parts.append(f'<p style="color:#666666; font-size:8pt;">{html.escape(RESEARCH_NOTICE)}</p>')
    return "".join(parts)


def partial_answer_html(question: str, text: str, state: str = "writing") -> str:
    """The answer while the model writes it (state "writing"), or what was written before the question was
    cancelled or failed ("cancelled"/"failed"): never mistaken for a finished answer."""
    ending = {"writing": " &hellip;", "cancelled": " <i>(cancelled: the answer is incomplete)</i>",
              "failed": " <i>(failed: the answer is incomplete)</i>"}[state]
    shown = html.escape(text.strip())
    return (f'<p style="color:#666666;">{html.escape(question)}</p>'
            f'<p style="font-size:14pt;">{shown}{ending}</p>'
            f'<p style="color:#666666; font-size:8pt;">{html.escape(RESEARCH_NOTICE)}</p>')


def _seconds(value) -> str:
    return f"{float(value):.1f} s"


def details_html(report: dict) -> str:
    """One line: how much of the volume the model looked at, how long it took, which model answered."""
    slices, tokens = report["slices"], report["tokens"]
    timings = report.get("timings_s", {})
    looked = (f"Looked at {int(slices['kept'])} of {int(slices['sent'])} slices and "
              f"{int(tokens['kept_visual']):,} of {int(tokens['total_visual']):,} image regions "
              f"({100.0 * float(tokens['retention']):.1f} %)")
    steps = [(name, timings[key]) for name, key in (("vision", "vision"), ("selection", "pruning"),
                                                    ("reading", "prefill"), ("writing", "decode"))
             if timings.get(key) is not None]
    took = ""
    if timings.get("total") is not None:
        took = _seconds(timings["total"])
        if steps:
            took += " (" + ", ".join(f"{name} {_seconds(value)}" for name, value in steps) + ")"
    model = str(report.get("model_id", ""))
    if model.startswith(("/", ".", "~", "\\")) or model[1:3] == ":\\":   # a local folder: its name is enough
        model = model.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
    items = [looked] + ([took] if took else []) + ([model] if model else [])
    text = " &middot; ".join(html.escape(item) for item in items)
    notes = report.get("input", {}).get("notes", [])
    for note in notes:
        strong = note.startswith("GEOMETRY ASSUMED")
        text += (f'<br><span style="color:#b3261e;"><b>{"WARNING" if strong else "Note"}:</b> '
                 f"{html.escape(note)}</span>")
    return text


def compare_rows(report: dict) -> list[tuple[str, str, str]]:
    """(label, pruned, unpruned) rows of the side-by-side table; empty when no comparison was asked."""
    unpruned = report.get("unpruned")
    if not unpruned:
        return []
    counts = unpruned.get("counts", {})
    pruned_t, unpruned_t = report.get("timings_s", {}), unpruned.get("timings_s", {})
    return [
        ("Answer", str(report.get("answer", "")), str(unpruned.get("answer", ""))),
        ("Image regions", f"{report['tokens']['kept_visual']} / {report['tokens']['total_visual']}",
         f"{counts.get('visual_tokens_kept', '?')} / {counts.get('visual_tokens_total', '?')}"),
        ("Total time", _seconds(pruned_t.get("total", 0.0)), _seconds(unpruned_t.get("total", 0.0))),
        ("Reading time", _seconds(pruned_t.get("prefill", 0.0)), _seconds(unpruned_t.get("prefill", 0.0))),
    ]
