"""Text normalisation shared by the rules, the guard and the triage model."""
import re
import unicodedata

# Spellings without apostrophes and texting shorthands, restored so one rule covers "whats", "what's" and "wat's".
CONTRACTIONS = {
    "cant": "can't", "cnt": "can't", "wont": "won't", "isnt": "isn't", "doesnt": "doesn't", "dont": "don't",
    "didnt": "didn't", "im": "i'm", "ive": "i've", "hes": "he's", "shes": "she's", "theyre": "they're",
    "whats": "what's", "wats": "what's", "wat": "what", "thats": "that's", "theres": "there's", "wasnt": "wasn't",
    "arent": "aren't", "havent": "haven't", "hasnt": "hasn't", "couldnt": "couldn't", "wouldnt": "wouldn't",
    "shouldnt": "shouldn't", "youre": "you're", "u": "you", "ur": "your", "r": "are", "pls": "please",
    "plz": "please", "rn": "right now", "abt": "about", "bc": "because", "cuz": "because", "coz": "because",
    "n": "and", "idk": "i don't know", "brething": "breathing",
    "breating": "breathing", "chst": "chest", "stomache": "stomach", "hart": "heart",
}
# Straight apostrophes and quotes for the typographic ones people's phones insert.
_QUOTES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'", "\u201c": '"', "\u201d": '"'})


def normalise(text: str) -> str:
    """Lowercase, NFKC, straight apostrophes, single spaces, contractions and shorthands restored."""
    text = unicodedata.normalize("NFKC", text).translate(_QUOTES).lower()
    text = re.sub(r"\s+", " ", text).strip()
    return re.sub(r"\b\w+\b", lambda m: CONTRACTIONS.get(m.group(), m.group()), text)
