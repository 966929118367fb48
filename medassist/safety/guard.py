"""The output guard: generated text is shown sentence by sentence, and a sentence that gives the reader a dose,
diagnoses the reader, claims to be a clinician, or carries an invented phone number or e-mail address is removed.
A sentence that repeats a line the code adds itself (the escalation, the closing lines, the disclaimer) is dropped
too, so the reader sees it once, and so is a paragraph that opens with a claim the code knows to be untrue in this
answer (`false_claims`: a source found, when none was given)."""
import re
from functools import lru_cache

from medassist.safety.lines import DISCLAIMER, GUARD_FLAGS
from medassist.safety.rules import CONDITIONAL, DOSE_OBJECT, GUARD_RULES, PHONE_REGIONS, REAL_SERVICES
from medassist.safety.text import normalise

# A model sentence that shares this share of its words with a fixed line says the same thing again.
_REPEAT_OVERLAP = 0.7


def _all(patterns: tuple, text: str) -> bool:
    return all(re.search(p, text) for p in patterns)


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?;])\s+", text) if s.strip()]


def _words(text: str) -> frozenset[str]:
    return frozenset(re.findall(r"[a-z0-9']+", normalise(text)))


def _repeats(sentence: str, fixed: list[frozenset[str]]) -> bool:
    words = _words(sentence)
    return bool(words) and any(len(words & f) >= _REPEAT_OVERLAP * max(len(words), 4) for f in fixed)


@lru_cache(maxsize=4096)
def invented_phone(sentence: str) -> bool:
    """A phone number (libphonenumber's own validity rules, in the regions our readers call from) that is not one of
    the real services a reader may need (REAL_SERVICES: 911, 112, 999, 988, Poison Control, Samaritans, ...)."""
    import phonenumbers

    spans: dict[tuple[int, int], bool] = {}  # (start, end) -> one of the real services, in some region's reading
    for region in PHONE_REGIONS:
        for match in phonenumbers.PhoneNumberMatcher(sentence, region, leniency=phonenumbers.Leniency.VALID):
            national = str(match.number.national_number)
            real = national in REAL_SERVICES or re.sub(r"\D", "", match.raw_string).lstrip("0") in REAL_SERVICES
            key = (match.start, match.end)
            spans[key] = spans.get(key, False) or real or len(national) < 7
    return not all(spans.values())


# Generated text is written with contractions; the guard's rules read them spelled out.
_EXPAND = {"you've": "you have", "you're": "you are", "it's": "it is", "that's": "that is", "i'm": "i am",
           "i've": "i have", "i'd": "i would", "i'll": "i will", "he's": "he is", "she's": "she is",
           "what's": "what is"}


def rule_sentence_flags(sentence: str) -> list[str]:
    """The guard flags the rules (and libphonenumber) raise for one generated sentence."""
    s = re.sub(r"\b\w+'\w+\b", lambda m: _EXPAND.get(m.group(), m.group()), normalise(sentence))
    unconditional = re.sub(CONDITIONAL, " ", s)
    fired = {flag for flag, rules in GUARD_RULES.items()
             if any(_all(p, unconditional if flag == "diagnosis_removed" else s) for p in rules.values())}
    if "contact_removed" not in fired and sum(c.isdigit() for c in s) >= 7 and invented_phone(sentence):
        fired.add("contact_removed")
    return [f for f in GUARD_FLAGS if f in fired]


@lru_cache(maxsize=4096)
def sentence_flags(sentence: str) -> tuple[str, ...]:
    """The guard flags one generated sentence raises, from the rules or the guard model (empty: it may be shown)."""
    from medassist.safety import triage

    model = triage.guard_model()
    by_model = model.flags(model.probabilities([sentence])[0])
    if "dose_removed" in by_model and not re.search(DOSE_OBJECT, normalise(sentence)):
        by_model.discard("dose_removed")
    fired = set(rule_sentence_flags(sentence)) | by_model
    return tuple(f for f in GUARD_FLAGS if f in fired)


class StreamGuard:
    """guard_answer for token streams.

    feed(chunk) returns the text that is safe to show now (whole sentences that passed the
    guard; an unfinished sentence is held back); close() returns the rest. Everything returned,
    joined, equals guard_answer(full_text)[0]. ``flags``: guard flags fired so far."""

    # A sentence ends at whitespace that follows . ! ? (plus closing quotes/brackets) or
    # contains a line break; that whitespace is complete once a non-space character follows.
    _SPACE = re.compile(r"\s+")
    _END = re.compile(r"[.!?][\"')\]]*\Z")
    # A title's full stop before a name ends no sentence: "Dr. Patel" stays one sentence, so a signature is read
    # whole. Case-sensitive: "in MS. It ..." and "120 ms. Then ..." do end one.
    _TITLE = re.compile(r"\b(Dr|Mr|Mrs|Ms|Prof|St)\.\Z")

    def __init__(self, shown: tuple[str, ...] = (), false_claims: tuple[str, ...] = ()) -> None:
        """shown: lines the code adds to this answer (escalation, closing lines): a model sentence that repeats one
        is dropped, so the reader sees it once. The disclaimer is always one of them. false_claims: openings of
        sentences the code knows to be untrue in this answer (a source found, when none was given): dropped."""
        self._buf, self._scan, self._sep, self._started, self._fired = "", 0, "", False, set()
        self._false, self._dropping = tuple(normalise(c) for c in false_claims), False
        self._fixed = [_words(s) for line in (DISCLAIMER, *shown) for s in _sentences(line)]

    @property
    def flags(self) -> tuple[str, ...]:
        """Guard flags fired so far, in GUARD_FLAGS order."""
        return tuple(f for f in GUARD_FLAGS if f in self._fired)

    def _emit(self, sentence: str, sep: str) -> str:
        sentence = sentence.strip()
        flags = sentence_flags(sentence) if sentence else ()
        # after a false claim, the rest of its paragraph goes too ("It says: <what no passage said>. <more>.")
        false = self._dropping or bool(self._false and sentence and normalise(sentence).startswith(self._false))
        self._dropping = false and "\n" not in sep
        if flags or not sentence or _repeats(sentence, self._fixed) or false:
            self._fired.update(flags)
            # A dropped sentence's two separators merge; keep the stronger break.
            self._sep = max(self._sep, sep, key=lambda s: s.count("\n"))
            return ""
        out = (re.sub(r"\n{3,}", "\n\n", self._sep) if self._started else "") + sentence
        self._started, self._sep = True, sep
        return out

    def feed(self, chunk: str) -> str:
        """Add generated text; return the part that is complete and safe to show now."""
        if not isinstance(chunk, str):
            raise ValueError(f"chunk must be a str, got {type(chunk).__name__}")
        self._buf += chunk.replace("\r", "")  # CRLF -> LF even when "\r" and "\n" arrive in different chunks
        out, start = [], 0
        # Resume where the last call stopped, so streaming stays linear in the text length.
        for m in self._SPACE.finditer(self._buf, self._scan):
            if m.end() == len(self._buf):  # trailing whitespace may continue in the next chunk
                break
            space = m.group()
            window = (max(start, m.start() - 12), m.start())
            named = self._TITLE.search(self._buf, *window) and self._buf[m.end()].isupper()
            if "\n" in space or (self._END.search(self._buf, *window) and not named):
                out.append(self._emit(self._buf[start:m.start()], space[space.find("\n"):] if "\n" in space else space))
                start = m.end()
        self._buf = self._buf[start:]
        trailing = len(self._buf) - len(self._buf.rstrip())
        self._scan = len(self._buf) - trailing
        return "".join(out)

    def close(self) -> str:
        """Flush the held-back text through the guard and return it."""
        rest, self._buf, self._scan = self._buf, "", 0
        return self._emit(rest, "") if rest.strip() else ""


def guard_answer(text: str, shown: tuple[str, ...] = (),
                 false_claims: tuple[str, ...] = ()) -> tuple[str, tuple[str, ...]]:
    """Remove sentences with dose instructions, diagnoses of the reader, doctor/prescriber claims or
    (invented) phone numbers and e-mail addresses from generated text, repeats of the `shown` fixed lines and
    sentences opening with one of `false_claims`. Returns (cleaned_text, flags in GUARD_FLAGS order)."""
    if not isinstance(text, str):
        raise ValueError(f"generated text must be a str, got {type(text).__name__}")
    guard = StreamGuard(shown, false_claims)
    cleaned = guard.feed(text) + guard.close()
    return cleaned, guard.flags
