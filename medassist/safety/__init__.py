"""The safety layer: screening (rules + the learned triage model), the output guard, vetted emergency guidance and
the composition of the final answer with its fixed disclaimer. Plain text in, text out; no Lightning, and the
triage model loads only when the first question is screened, so importing this package stays cheap.

    screen_question(text) -> Screening(.flags, .preface, .guidance, .probabilities)
    screen_conversation(messages) -> Screening      (the latest user turns together)
    guard_answer(text) -> (text, flags)             StreamGuard for token streams
    compose(screening, generated) -> record         render(record) -> the text a person reads
    with_sources(record, sources)                   the "Source:" lines after a grounded answer
    unrender(text) -> an earlier answer as the model said it (the lines the code added taken off)
"""
from medassist.safety.compose import (closing_lines, compose, fixed_lines, render, sources_text, stream_guard, unrender,
                                      with_sources)
from medassist.safety.guard import StreamGuard, guard_answer
from medassist.safety.lines import (CRISIS_LINE, DECIDE_LINE, DIAGNOSIS_LINE, DISCLAIMER, EMERGENCY_LINE, GUARD_FLAGS,
                                    NO_SOURCE_LINE, SCREEN_FLAGS, SOURCE_LINE, URGENT_FLAGS)
from medassist.safety.screen import (Screening, rule_flags, screen_conversation, screen_conversations, screen_question,
                                     screen_texts, validate_question)

__all__ = ["CRISIS_LINE", "DECIDE_LINE", "DIAGNOSIS_LINE", "DISCLAIMER", "EMERGENCY_LINE", "GUARD_FLAGS",
           "NO_SOURCE_LINE", "SOURCE_LINE", "SCREEN_FLAGS", "sources_text", "with_sources", "URGENT_FLAGS", "Screening", "StreamGuard", "closing_lines", "compose", "fixed_lines",
           "guard_answer", "render", "rule_flags", "screen_conversation", "screen_conversations", "screen_question",
           "screen_texts", "stream_guard", "unrender", "validate_question"]
