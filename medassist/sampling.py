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


# what decode steps multiply by on CPU (generate.load_for_generation): int8 copies of the weights, or the dense ones
DECODE_WEIGHTS = ("int8", "dense")


def add_decode_weights_argument(parser) -> None:
    """--decode-weights, for every command that loads a model to answer (ask, serve, evaluate)."""
    parser.add_argument("--decode-weights", default="int8", choices=DECODE_WEIGHTS,
                        help="what decode steps multiply by on CPU: an int8 copy of the weights (default; faster, "
                             "BENCHMARKS.md) or the dense weights")
