"""Decoding settings, shared by the predictor, the server's wire format and the training module's sample answers.
No torch: `openai_api` imports it without pulling torch in."""
from dataclasses import dataclass


@dataclass
class Sampling:
    """Decoding settings. temperature 0 = greedy (reproducible); repetition_penalty > 1 stops small models looping."""

    max_new_tokens: int = 200
    temperature: float = 0.0
    top_p: float = 0.9
    repetition_penalty: float = 1.1
    seed: int = 0
