"""Instruction data: JSONL reading with file:line errors, answer-only tokenization, batching, the DataModule.

Reading and tokenizing are plain functions usable without Lightning; `InstructionDataModule` wires them to a
Trainer. `python -m medassist.data import|check ...` runs the importers and the checker (medassist/dataprep.py).
"""

import itertools
import json
import logging
import random
import re
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DistributedSampler

from medassist import UserError
from medassist.checks import cross_file_warnings
from medassist.records import MAX_ERRORS, check_messages, listed, messages_of, read_questions  # noqa: F401
from medassist.prompts import encode_turns, prompt_tail_length

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # labels with this value carry no loss (PyTorch's cross-entropy default)
FIELDS = {"instruction": True, "input": False, "output": True}  # field -> required
TRAIN_ON = ("all_assistant", "last_assistant")  # which assistant turns of a conversation carry the loss


def read_records(path: str | Path) -> list[dict]:
    """Read and validate a JSONL file of {"instruction", "input"?, "output"} pairs and {"messages": [...]}
    conversations (OpenAI's shape, ending with an assistant turn); other keys are kept.

    Raises UserError naming file:line for every bad line (up to MAX_ERRORS at once), before anything loads.
    """
    numbered, errors = collect_records(path)
    if errors:
        raise UserError(errors[0] if len(errors) == 1 else f"{len(errors)} bad line(s) in {path}:\n" + listed(errors))
    return [record for _, record in numbered]


def collect_records(path: str | Path) -> tuple[list[tuple[int, dict]], list[str]]:
    """([(line number, record)] of the good lines, ["file:line: problem"] of the rest), without raising.

    A missing, non-UTF-8 or empty file is one problem. `read_records` raises on any problem; the checker
    (`python -m medassist.data check`) lists them all.
    """
    path = Path(path)
    if not path.is_file():
        return [], [f"{path}: file not found; expected a JSONL file with one {{'instruction', 'output'}} per line"]
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        return [], [f"{path}:{line}: not valid UTF-8 (byte {raw[e.start]:#x}); save the file as UTF-8"]
    records, errors = [], []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        problem, record = _check_line(line)
        if problem:
            errors.append(f"{path}:{line_no}: {problem}")
        else:
            records.append((line_no, record))
    if not records and not errors:
        errors.append(f"{path}: no records; expected one JSON object per line with 'instruction' and 'output'")
    return records, errors


def _check_line(line: str) -> tuple[str | None, dict | None]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return f"not valid JSON ({e.msg} at column {e.colno}); each line must be one object like " \
               '{"instruction": "...", "input": "", "output": "..."}', None
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}", None
    if "messages" in record:
        return check_messages(record["messages"], last="assistant"), record
    if "conversations" in record:
        return ("a ShareGPT conversation ('conversations' with 'from'/'value'); convert the file first: "
                "python -m medassist import sharegpt FILE --out DIR"), None
    for field, required in FIELDS.items():
        value = record.get(field)
        if value is None and not required:
            continue
        if value is None:
            return f"missing '{field}'; every line needs a non-empty 'instruction' and 'output'", None
        if not isinstance(value, str):
            return f"'{field}' must be a string, got {type(value).__name__} ({json.dumps(value)[:40]})", None
        if required and not value.strip():
            return f"'{field}' is empty; every line needs a non-empty 'instruction' and 'output'", None
    return None, record


def tokenize_example(tokenizer, record: dict, max_seq_length: int, train_on: str = "all_assistant") -> dict:
    """A pair or a conversation as ids and labels (unshifted: the model shifts): IGNORE_INDEX on user and system
    turns, the ids of the supervised assistant turns (each with its <end_of_turn>) elsewhere. `train_on`:
    "all_assistant" supervises every assistant turn, "last_assistant" only the last. `followup` marks the labels of
    assistant turns after the first, so validation reports them apart.

    Too long: the oldest whole exchanges are dropped first (the system message and the last exchange kept); then, as
    for a single pair, the question is shortened (its turn markers kept), never below half the budget, and only
    then the answer's tail cut (and its end-of-turn dropped, so the model never learns to stop mid-sentence).
    """
    messages = messages_of(record)
    system = [m for m in messages if m["role"] == "system"]
    exchanges = [m for m in messages if m["role"] != "system"]
    turns, dropped = encode_turns(tokenizer, messages), 0
    while sum(len(ids) for _, ids in turns) > max_seq_length and len(exchanges) - 2 * dropped > 2:
        dropped += 1  # one more user + assistant pair off the front
        turns = encode_turns(tokenizer, system + exchanges[2 * dropped:])
    truncated = sum(len(ids) for _, ids in turns) > max_seq_length
    if truncated:
        (_, prompt), (_, answer) = turns
        keep_prompt = max(max_seq_length - len(answer), min(len(prompt), max_seq_length // 2))
        if keep_prompt < len(prompt):
            tail = prompt_tail_length(tokenizer)  # "<end_of_turn>\n<start_of_turn>model\n" stays intact
            prompt = prompt[: keep_prompt - tail] + prompt[-tail:]
        turns = [("user", prompt), ("assistant", answer[: max_seq_length - len(prompt)])]
    ids, labels, followup = [], [], []
    answers = [n for n, (role, _) in enumerate(turns) if role == "assistant"]
    for n, (role, part) in enumerate(turns):
        supervised = role == "assistant" and (train_on == "all_assistant" or n == answers[-1])
        ids += part
        labels += part if supervised else [IGNORE_INDEX] * len(part)
        followup += [int(supervised and (dropped > 0 or n != answers[0]))] * len(part)
    return {"input_ids": ids, "labels": labels, "followup": followup, "truncated": truncated, "dropped": dropped}


def check_train_on(train_on: str) -> None:
    if train_on not in TRAIN_ON:
        raise UserError(f"train_on must be one of {', '.join(TRAIN_ON)}, got {train_on!r}")


OPENING_SENTENCES = 2  # of the passage, restated after prompts.RELATED_ONLY's opening


def _flat(text: str) -> str:
    return " ".join(text.split())


def answers(record: dict, hit: dict) -> bool:
    """Whether passage `hit` answers the pair's question: its heading is the question, or its text is part of the
    pair's answer."""
    return (_flat(hit["title"]).lower() == _flat(record["instruction"]).lower()
            or _flat(hit["text"]) in _flat(record["output"]))


def grounded_output(record: dict, hit: dict) -> str:
    """The answer a pair teaches with passage `hit` in its prompt: the passage restated when it `answers` the
    question (the pair's own answer where the passage is all of it), else RELATED_ONLY. So the model learns to say
    what the passage says, never more."""
    text = hit["text"].strip()
    if _flat(record["output"]) == _flat(text):
        return record["output"]
    if answers(record, hit):
        return text
    from medassist.prompts import RELATED_ONLY
    from medassist.retrieval import SENTENCE_END

    sentences = SENTENCE_END.split(text)
    return RELATED_ONLY.format(title=hit["title"].strip(), opening=" ".join(sentences[:OPENING_SENTENCES]))


def respelled(question: str, rng: random.Random) -> str:
    """The question as a person might type it: MedQuAD's headings and questions are spelled alike ("What is (are)
    Gout ?"), so a model trained on them alone takes any other spelling for another question. Each change at random:
    no space before "?", lower case, no "(are)", no "?"; the words stay."""
    if rng.random() < 0.5:
        question = re.sub(r"\s+([?.!])", r"\1", question)
    if rng.random() < 0.3:
        question = question.lower()
    if rng.random() < 0.5:
        question = question.replace("(are) ", "")
    if rng.random() < 0.2:
        question = question.rstrip(" ?")
    return question


def with_context(records: list[dict], index, path: str, leave_out: float = 0.0, seed: int = 0,
                 respell: float = 0.0) -> list[dict]:
    """Pairs with the relevant passage of `index` as their input part (as answering puts it there) and
    `grounded_output` as their answer; for a `leave_out` share of them (seeded) the pair's own document is left out
    of the search, so the model also learns what to say when the passage is only related; for a `respell` share the
    question in the prompt is `respelled` (whether the passage answers it is decided on the question as written).
    Pairs without a passage and conversations are kept as they are. Counts are logged."""
    from medassist.prompts import INPUT_GAP, context_text
    from medassist.retrieval import doc_of

    rng, spelling = random.Random(seed), random.Random(seed + 1)  # leave-out draws stay as without respelling
    pairs = [r for r in records if "messages" not in r]
    excluded = [doc_of(r, path) if rng.random() < leave_out else None for r in pairs]
    found = iter(index.relevant([r["instruction"] for r in pairs], k=1, exclude_docs=excluded))
    out, given, related = [], 0, 0
    for r in records:
        hits = [] if "messages" in r else next(found)
        if not hits:
            out.append(r)
            continue
        given, related = given + 1, related + (not answers(r, hits[0]))
        # after the pair's own input part, as answering puts the passage after the question file's input
        context = INPUT_GAP.join(x for x in ((r.get("input") or "").strip(), context_text(hits)) if x)
        question = respelled(r["instruction"], spelling) if spelling.random() < respell else r["instruction"]
        out.append({**r, "instruction": question, "input": context, "output": grounded_output(r, hits[0])})
    log.info("%s: %d of %d pairs got a retrieved passage (%d searched without their own document); %d of those "
             "passages answer another question and teach saying so", path, given, len(pairs),
             sum(d is not None for d in excluded), related)
    return out


def tokenize_records(tokenizer, records: list[dict], max_seq_length: int, name: str = "data",
                     train_on: str = "all_assistant"):
    """A `datasets.Dataset` of tokenized examples; logs how many were shortened and how."""
    from datasets import Dataset

    check_train_on(train_on)
    rows = [tokenize_example(tokenizer, r, max_seq_length, train_on) for r in records]
    dropped = [r["dropped"] for r in rows if r["dropped"]]
    if dropped:
        log.warning("%s: %d of %d conversations longer than max_seq_length=%d lost their %d oldest exchange(s)",
                    name, len(dropped), len(rows), max_seq_length, sum(dropped))
    truncated = sum(r["truncated"] for r in rows)
    if truncated:
        log.warning("%s: %d of %d examples longer than max_seq_length=%d were truncated (prompt first)",
                    name, truncated, len(rows), max_seq_length)
    dataset = Dataset.from_list(rows)
    return dataset.map(lambda r: {"length": len(r["input_ids"]),
                                  "supervised": sum(t != IGNORE_INDEX for t in r["labels"])})


def collate(batch: list[dict], pad_id: int, pad_to_multiple_of: int = 8) -> dict:
    """Right-pad ids with pad_id, attention_mask with 0, labels with IGNORE_INDEX (padding masked by position), and
    the follow-up marks (where the rows have them) with 0."""
    longest = max(len(b["input_ids"]) for b in batch)
    width = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    follow = torch.zeros((len(batch), width), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[i, :n] = torch.tensor(b["input_ids"])
        labels[i, :n] = torch.tensor(b["labels"])
        mask[i, :n] = 1
        follow[i, :n] = torch.tensor(b.get("followup") or [0] * n)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "followup": follow}


class LengthGroupedSampler(DistributedSampler):
    """Shuffled order in which neighbours have similar lengths, so a batch pads little.

    Deterministic in (seed, epoch): a resumed run sees the same order and skips what it had already seen. batch_size
    is what one rank trains on in one optimizer step (micro-batch size x accumulation); the order is built for global
    steps of batch_size x num_replicas and each rank takes its slice of every one, so N ranks train on exactly the
    batches one process sees with N x batch_size. It is a DistributedSampler so that Lightning
    does not wrap it: its DistributedSamplerWrapper shuffles the positions again and the grouping is lost.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 0, group_batches: int = 32,
                 num_replicas: int = 1, rank: int = 0):
        super().__init__(lengths, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.lengths, self.batch_size, self.group = lengths, batch_size, group_batches

    def __iter__(self):
        rng = random.Random(self.seed + self.epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        size = self.batch_size * self.num_replicas  # one optimizer step, all ranks together
        span = size * self.group
        chunks = [sorted(order[i : i + span], key=self.lengths.__getitem__, reverse=True)
                  for i in range(0, len(order), span)]
        batches = [c[i : i + size] for c in chunks for i in range(0, len(c), size)]
        short = batches.pop() if len(batches[-1]) < size else []  # stays last, so batch boundaries stay aligned
        rng.shuffle(batches)
        order = [i for b in batches for i in b] + short
        order += itertools.islice(itertools.cycle(order), self.total_size - len(order))  # equal shares, as torch's
        steps = [order[i : i + size] for i in range(0, len(order), size)]
        return iter([i for b in steps for i in b[self.rank * len(b) // self.num_replicas :
                                                 (self.rank + 1) * len(b) // self.num_replicas]])


class InstructionDataModule(L.LightningDataModule):
    """JSONL instruction pairs -> right-padded, answer-only-labelled batches.

    Args:
        base_model: model source whose tokenizer is used (linked from the model's `base_model` by the CLI).
        train_file / val_file: JSONL files of {"instruction", "input"?, "output"} pairs and {"messages": [...]}
            conversations; validated when the module is built.
        test_file: the same, for `test` (perplexity of its answers); None: `test` asks for it.
        max_seq_length: tokens per example after truncation (oldest exchanges dropped first, then the prompt shortened).
        train_on: which assistant turns of a conversation carry the loss: "all_assistant" or "last_assistant"
            (validation perplexity is over the same turns).
        index: a retrieval index (`python -m medassist index build`): every pair gets its relevant passage in the
            prompt, as answers with `--index` do (grounded fine-tuning); None: no passages.
        leave_out: with an index, the share of training pairs searched without their own document.
        respell: with an index, the share of training pairs whose question is spelled another way in the prompt
            (case, "?", "(are)"), so a question typed differently from the passage's heading is still its question.
        batch_size: examples per micro-batch (per device).
        group_by_length: batch examples of similar length together (less padding); otherwise plain shuffling.
        num_workers: DataLoader worker processes.
        seed: data order seed.
        predict_file / predict_output: for `predict`, JSONL questions in and answer records out.
    """

    def __init__(
        self,
        base_model: str = "embedded",
        train_file: str = "data/train.jsonl",
        val_file: str = "data/validation.jsonl",
        test_file: str | None = None,
        max_seq_length: int = 512,
        train_on: str = "all_assistant",
        index: str | None = None,
        leave_out: float = 0.3,
        respell: float = 0.5,
        batch_size: int = 4,
        group_by_length: bool = True,
        num_workers: int = 0,
        seed: int = 42,
        predict_file: str | None = None,
        predict_output: str = "predictions.jsonl",
    ):
        super().__init__()
        if max_seq_length < 16:
            raise UserError(f"max_seq_length must be at least 16, got {max_seq_length}")
        if batch_size < 1:
            raise UserError(f"batch_size must be at least 1, got {batch_size}")
        check_train_on(train_on)  # now, before any model loads
        self.base_model, self.max_seq_length, self.batch_size = base_model, max_seq_length, batch_size
        self.train_on, self.leave_out = train_on, leave_out
        for name, share in (("leave_out", leave_out), ("respell", respell)):
            if not 0 <= share <= 1:
                raise UserError(f"{name} is a share of the training pairs, 0..1; got {share}")
        self.respell = respell
        self.group_by_length, self.num_workers, self.seed = group_by_length, num_workers, seed
        self.train_file, self.val_file, self.test_file = train_file, val_file, test_file
        self.predict_file, self.predict_output = predict_file, predict_output
        # Read now: a bad line fails here, before any model is loaded.
        self.train_records = read_records(train_file)
        self.val_records = read_records(val_file)
        self.test_records = read_records(test_file) if test_file else None
        for warning in cross_file_warnings({train_file: self.train_records, val_file: self.val_records}):
            log.warning(warning)
        from medassist import retrieval

        self.retriever = retrieval.load(index) if index else None  # a bad path fails here, before any model loads
        self.tokenizer = None

    def setup(self, stage: str) -> None:
        if self.tokenizer is not None:
            return
        from medassist.loading import load_tokenizer

        self.tokenizer = load_tokenizer(self.base_model)
        if (index := self.retriever) is not None:
            self.train_records = with_context(self.train_records, index, self.train_file, self.leave_out, self.seed,
                                              self.respell)
            self.val_records = with_context(self.val_records, index, self.val_file)
            if self.test_records is not None:
                self.test_records = with_context(self.test_records, index, self.test_file)
        for name in ("train", "val", "test"):
            records, file = getattr(self, f"{name}_records"), getattr(self, f"{name}_file")
            if records is not None:
                setattr(self, f"{name}_set", tokenize_records(self.tokenizer, records, self.max_seq_length, file,
                                                              self.train_on))
        # Supervised tokens of a mean micro-batch: the constant scale of the training loss (MedAssistLM._loss_scale).
        self.tokens_per_batch = self.batch_size * sum(self.train_set["supervised"]) / len(self.train_set)

    def _loader(self, dataset, train: bool):
        from torchdata.stateful_dataloader import StatefulDataLoader  # saves its position: mid-epoch resume

        columns = dataset.select_columns(["input_ids", "labels"] + ([] if train else ["followup"]))
        # Samplers seeded by (seed, epoch) that shard themselves: resume replays the same order in any epoch, and
        # Lightning leaves DistributedSamplers alone (it would wrap or replace anything else under DDP).
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        if train and self.group_by_length:
            # Grouped in whole optimizer steps (accumulate_grad_batches micro-batches on every rank), each rank taking
            # a contiguous slice: batch B x accumulation A on N ranks trains on the batches of batch B x A x N alone.
            steps = self.trainer.accumulate_grad_batches if self.trainer else 1
            sampler = LengthGroupedSampler(dataset["length"], self.batch_size * steps, self.seed, num_replicas=world,
                                           rank=rank)
        elif train:
            sampler = DistributedSampler(columns, num_replicas=world, rank=rank, seed=self.seed)
        else:
            sampler = None
        return StatefulDataLoader(
            columns,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=self._collate,
            num_workers=self.num_workers,
        )

    def _collate(self, batch):
        return collate(batch, self.tokenizer.pad_token_id)

    def train_dataloader(self):
        return self._loader(self.train_set, train=True)

    def val_dataloader(self):
        return self._loader(self.val_set, train=False)

    def test_dataloader(self):
        if self.test_records is None:
            raise UserError("test measures perplexity on held-out answers: give them with --data.test_file "
                            "test.jsonl (one {\"instruction\", \"output\"} per line, like the training data)")
        return self._loader(self.test_set, train=False)

    def predict_dataloader(self):
        if not self.predict_file:
            raise UserError("predict needs questions: --data.predict_file questions.jsonl (one {\"question\": ...} "
                            "per line); answers go to --data.predict_output")
        return torch.utils.data.DataLoader(read_questions(self.predict_file), batch_size=self.batch_size,
                                           collate_fn=list)


if __name__ == "__main__":  # `python -m medassist.data import|check`: the same as `python -m medassist import|check`
    import sys

    from medassist.commands import main

    sys.exit(main(sys.argv[1:]))
