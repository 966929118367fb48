"""The prompt template: the one place where a question becomes model input.

Training, validation, prediction, serving and evaluation all call `format_prompt`; the template's name is
saved beside every adapter (`TEMPLATE_NAME`) so generation can refuse an adapter trained on another template.
"""

TEMPLATE_NAME = "gemma-turn-v1"  # change the name whenever the strings below change

# Gemma's chat turn markers. They are single tokens in every Gemma tokenizer (gemma-2b, gemma-3-270m), so the
# pretrained base and the fine-tune agree on where a turn ends.
START_OF_TURN = "<start_of_turn>"
USER = START_OF_TURN + "user\n"
MODEL = START_OF_TURN + "model\n"
END_OF_TURN = "<end_of_turn>"


def format_prompt(instruction: str, input: str = "") -> str:
    """The text the model sees before its answer: one user turn, then the opening of the model's turn."""
    question = instruction.strip()
    if input and input.strip():
        question = f"{question}\n\n{input.strip()}"
    return f"{USER}{question}{END_OF_TURN}\n{MODEL}"
