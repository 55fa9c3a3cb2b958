"""Zero-shot multiple-choice accuracy, scored by log-likelihood with lm-evaluation-harness (`lm-eval`) as a library.

A task is a list of items (a context, its choices, the index of the right one): an uploaded task file (.jsonl, one
{"context", "choices", "answer"} per line) or the built-in `builtin:wiki-next-sentence`, built here from the
packaged wiki text. lm-eval turns each item into one (context, " " + choice) request per choice and scores it the
way it scores every multiple-choice task (`output_type: multiple_choice`):

- `acc`: the choice with the highest sum of log-probabilities of its tokens given the context is the right one;
- `acc_norm`: the same with each sum divided by the choice's length in characters (lm-eval's `acc_norm`; its
  byte-length variant, `acc_bytes`, differs only for non-ASCII choices).

The model side is ours (`_HarnessLM`): lm-eval's own `TemplateLM` splits each request into context and
continuation tokens exactly as its Hugging Face model (`HFLM`) does, and we run the forward passes, batched under a
memory budget and cancellable, on the model object the job already holds (a LLaVA or BLIP-2 language model
included). The data goes to lm-eval in memory (`custom_dataset`): nothing is downloaded and no dataset cache is
written.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from torch import nn

from prunekit.vocabulary import BUILTIN_TASKS, TASK_LIMITS, WIKI_NEXT_SENTENCE, task_record_problem
from workers.pruning.data import wiki_en_articles
from workers.pruning.spec import JobCancelled, JobError

# --- the items -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskItem:
    context: str
    choices: tuple[str, ...]
    answer: int  # index into choices


@dataclass(frozen=True)
class Task:
    name: str  # as the job names it: builtin:wiki-next-sentence or the uploaded file's id (ds_...)
    items: tuple[TaskItem, ...]
    source: dict[str, Any]  # for the report: where the items come from


def load_task(name: str, num_samples: int, path: str | None = None) -> Task:
    """The task `name`: a built-in one, or the task file at `path` (an uploaded file the worker fetched; a local
    path where `name` is one itself), its first `num_samples` items."""
    if num_samples < 1:
        raise JobError("invalid_spec", f"evaluation.task_num_samples must be at least 1; got {num_samples}.")
    if name == WIKI_NEXT_SENTENCE:
        return wiki_next_sentence(num_samples)
    if name.startswith("builtin:"):
        raise JobError("invalid_spec", f"Unknown built-in task {name!r}; available: {', '.join(BUILTIN_TASKS)}.")
    file = Path(path or name)
    items = read_task_file(file, num_samples)
    return Task(name, items, {"file": name})


def read_task_file(path: Path, limit: int | None = None) -> tuple[TaskItem, ...]:
    """Items of a .jsonl task file (the first `limit`), each checked by the vocabulary's rule, as the API checks
    an upload; a bad line is a dataset_error naming the line and the field."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise JobError("dataset_error", f"Task file {path.name!r} does not exist.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise JobError("dataset_error", f"Could not read task file {path.name} as UTF-8 text ({exc}).") from exc
    items: list[TaskItem] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise JobError("dataset_error", f"{path.name} line {number} is not valid JSON ({exc.msg}).") from None
        problem = task_record_problem(record, TASK_LIMITS)
        if problem is not None:
            raise JobError("dataset_error", f"{path.name} line {number}: {problem}.")
        items.append(TaskItem(record["context"], tuple(record["choices"]), record["answer"]))
        if limit is not None and len(items) == limit:
            break
    if not items:
        raise JobError("dataset_error", f"Task file {path.name} holds no items.")
    return tuple(items)


# --- builtin:wiki-next-sentence ----------------------------------------------------------------------------------

# Held-out articles: those lying wholly within this share of builtin:wiki-en's text (articles sorted by key, as the
# stream is). Evaluation reads the stream from its start (64 windows of 512 tokens, the default, are ~3% of it) and
# calibration (restoration too) from its second half, so neither touches these articles unless a job evaluates
# more than a quarter of the stream.
HELD_OUT = (0.25, 0.45)
WIKI_TASK_SEED = 0  # the task is the same for every job: dense and pruned, and jobs among themselves, compare
CONTEXT_SENTENCES = (2, 4)  # a context is this many of an article's first sentences (drawn)
NUM_CHOICES = 4
_SENTENCE_CHARS = (25, 300)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")
# A period after these ends no sentence ("Dr. Smith", "St. Louis", "U.S. Army", "J. R. R. Tolkien").
_ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "st", "jr", "sr", "prof", "gen", "col", "lt", "sgt", "capt",
                            "gov", "sen", "rep", "rev", "mt", "ft", "no", "inc", "ltd", "co", "corp", "vs", "etc",
                            "ca", "c", "b", "d", "fl", "approx", "jan", "feb", "mar", "apr", "aug", "sept", "sep",
                            "oct", "nov", "dec", "vol", "op", "pp", "est"})


def split_sentences(text: str) -> list[str]:
    """Sentences of a wiki summary: split after . ! ? before a capital or a digit, not after an abbreviation or
    an initial; whitespace runs become one space."""
    pieces = _SENTENCE_END.split(" ".join(text.split()))
    sentences: list[str] = []
    for piece in pieces:
        if sentences and _ends_in_abbreviation(sentences[-1]):
            sentences[-1] = f"{sentences[-1]} {piece}"
        else:
            sentences.append(piece)
    return sentences


def _ends_in_abbreviation(sentence: str) -> bool:
    if not sentence.endswith("."):
        return False
    word = sentence[:-1].rsplit(" ", 1)[-1].lstrip("(\"'")
    return len(word) == 1 or "." in word or word.lower() in _ABBREVIATIONS


def held_out_articles() -> list[str]:
    """The articles of builtin:wiki-en lying wholly within HELD_OUT of its joined text, in key order."""
    articles = wiki_en_articles()
    total = sum(len(a) for a in articles) + 2 * (len(articles) - 1)  # joined with "\n\n"
    low, high = HELD_OUT[0] * total, HELD_OUT[1] * total
    held, start = [], 0
    for article in articles:
        if start >= low and start + len(article) <= high:
            held.append(article)
        start += len(article) + 2
    return held


def wiki_next_sentence(num_samples: int, seed: int = WIKI_TASK_SEED) -> Task:
    """num_samples items, each from its own held-out article: the context is its first 2 to 4 sentences, the choices
    its true next sentence and one later sentence (never the first) of each of three other held-out articles, the
    true one at a seeded-random place. Deterministic: the same items on every worker and every run."""
    usable = [s for s in (split_sentences(a) for a in held_out_articles()) if len(s) > CONTEXT_SENTENCES[0]
              and all(_SENTENCE_CHARS[0] <= len(x) <= _SENTENCE_CHARS[1] for x in s[:CONTEXT_SENTENCES[1] + 1])]
    if num_samples > len(usable):
        raise JobError("invalid_spec", f"{WIKI_NEXT_SENTENCE} has {len(usable)} items; asked for {num_samples} "
                                       "(evaluation.task_num_samples).")
    rng = random.Random(seed)
    order = rng.sample(range(len(usable)), len(usable))
    items = []
    for index in order[:num_samples]:
        sentences = usable[index]
        cut = rng.randint(CONTEXT_SENTENCES[0], min(CONTEXT_SENTENCES[1], len(sentences) - 1))
        true = sentences[cut]
        distractors: list[str] = []
        while len(distractors) < NUM_CHOICES - 1:
            other_index = rng.randrange(len(usable))
            if other_index == index:
                continue
            other = usable[other_index]
            candidate = other[rng.randint(1, min(len(other), CONTEXT_SENTENCES[1] + 1) - 1)]
            if candidate != true and candidate not in distractors:
                distractors.append(candidate)
        answer = rng.randrange(NUM_CHOICES)
        choices = [*distractors[:answer], true, *distractors[answer:]]
        items.append(TaskItem(" ".join(sentences[:cut]), tuple(choices), answer))
    return Task(WIKI_NEXT_SENTENCE, tuple(items), {
        "builtin": WIKI_NEXT_SENTENCE, "seed": seed, "held_out_share_of_wiki_en": list(HELD_OUT),
        "held_out_articles": len(usable), "choices": NUM_CHOICES,
        "description": "the true next sentence of a held-out builtin:wiki-en article after its first 2-4 "
                       "sentences, among three sentences of other held-out articles"})


# --- scoring -----------------------------------------------------------------------------------------------------

# Logits of one batch are [batch, tokens, vocab] in fp32: the batch is capped so they stay near 128 MB, as in
# evaluate.perplexity.
_LOGITS_BUDGET = 32 * 2**20
_MAX_LENGTH = 2048  # lm-eval's HFLM default when the config names no context length
_METRICS = ("acc", "acc_norm")


def _never() -> bool:
    return False


def score_tasks(model: nn.Module, tokenizer: Any, tasks: Sequence[Task],
                should_cancel: Callable[[], bool] = _never) -> dict[str, dict[str, float]]:
    """{task name: {"acc", "acc_norm", "acc_stderr", "acc_norm_stderr", "n"}} of `model` (a causal LM) on each
    task, by lm-eval's multiple-choice scoring."""
    evaluator, task_class = _lm_eval()
    lm = _HarnessLM(model, tokenizer, should_cancel)
    task_dict = {task.name: task_class(config=_task_config(task)) for task in tasks}
    # bootstrap_iters only decides the standard errors; a mean's is a closed form, no bootstrap runs.
    results = evaluator.evaluate(lm, task_dict, bootstrap_iters=1000, log_samples=False, verbosity="ERROR")
    assert results is not None  # None only on ranks other than 0 of a distributed run
    scores = {}
    for task in tasks:
        row = results["results"][task.name]
        scores[task.name] = {
            **{metric: round(float(row[f"{metric},none"]), 6) for metric in _METRICS},
            **{f"{metric}_stderr": _stderr(row.get(f"{metric}_stderr,none")) for metric in _METRICS},
            "n": len(task.items)}
    return scores


def _stderr(value: Any) -> float | None:
    return round(float(value), 6) if isinstance(value, int | float) else None  # "N/A" for a single item


def _task_config(task: Task) -> dict[str, Any]:
    """An lm-eval multiple-choice task over the items, handed over in memory."""
    import datasets

    docs = [{"context": item.context, "choices": list(item.choices), "answer": item.answer} for item in task.items]
    return {
        "task": task.name,
        "custom_dataset": lambda **_: {"test": datasets.Dataset.from_list(docs)},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "context",
        "doc_to_choice": "choices",
        "doc_to_target": "answer",
        "target_delimiter": " ",  # lm-eval's default: each choice is scored as " " + choice after the context
        "num_fewshot": 0,
        "metric_list": [{"metric": metric, "aggregation": "mean", "higher_is_better": True} for metric in _METRICS],
    }


def _lm_eval() -> tuple[Any, Any]:
    """lm-eval's evaluator and task class, imported on first use (a few seconds; only jobs with tasks pay)."""
    # The data is handed over in memory; should anything in lm-eval still ask the `datasets` library for a hub
    # dataset, it fails at once instead of reaching the network (set before `datasets` is first imported).
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval import evaluator
    from lm_eval.api.task import ConfigurableTask

    # lm-eval warns about every custom dataset and logs each run at INFO: a worker's log needs neither.
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    return evaluator, ConfigurableTask


class _HarnessLM(TemplateLM):
    """lm-eval's model interface over a model in memory: its TemplateLM encodes each (context, continuation) pair
    (trailing spaces of the context move to the continuation; the whole and the context are tokenized and the
    continuation is the rest), and `loglikelihoods` scores the tokens as its HFLM does."""

    def __init__(self, model: nn.Module, tokenizer: Any, should_cancel: Callable[[], bool]) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.should_cancel = should_cancel
        self.model_device = next(model.parameters()).device
        self.vocab = int(model.get_output_embeddings().weight.shape[0])
        self.max_length = _context_length(model)

    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def prefix_token_id(self) -> int:
        # HFLM's: what an empty context is conditioned on.
        bos = self.tokenizer.bos_token_id
        return int(bos if bos is not None else self.tokenizer.eos_token_id)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **_: Any) -> list[int]:
        # HFLM's: the tokenizer's own special tokens unless told, none when the text already starts with BOS.
        kwargs: dict[str, bool] = {}
        if add_special_tokens is not None:
            kwargs["add_special_tokens"] = add_special_tokens
        elif self.tokenizer.bos_token and string.startswith(self.tokenizer.bos_token):
            kwargs["add_special_tokens"] = False
        return list(self.tokenizer.encode(string, **kwargs))

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = True) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=True)  # no progress bars in a worker's log

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              **_: Any) -> list[tuple[float, bool]]:
        return loglikelihoods(self.model, [(ctx, cont) for _, ctx, cont in requests], self.max_length, self.vocab,
                              self.model_device, self.should_cancel)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError("task accuracy scores multiple-choice tasks only")

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        raise NotImplementedError("task accuracy scores multiple-choice tasks only")


def _context_length(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for part in (config, getattr(config, "text_config", None)):
        for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(part, name, None)
            if isinstance(value, int) and value > 0:
                return value
    return _MAX_LENGTH


def loglikelihoods(model: nn.Module, pairs: Sequence[tuple[list[int], list[int]]], max_length: int, vocab: int,
                   device: torch.device, should_cancel: Callable[[], bool] = _never) -> list[tuple[float, bool]]:
    """For each (context tokens, continuation tokens): the sum of log p(continuation token | everything before it)
    and whether each continuation token is the argmax there. As HFLM: the model reads (context + continuation)
    without its last token, cut from the left to max_length; batches are right-padded (causal attention: padding
    after a row's tokens changes none of its logits), longest first, under the logits budget.

    (Reading an item's context once and its choices on copies of its key-value cache halves the arithmetic, but in
    batches of one context it showed no clear gain on a busy 2-core CPU and would lose on a GPU: not worth its code.)
    """
    results: list[tuple[float, bool] | None] = [None] * len(pairs)
    inputs = [(ctx + cont)[-(max_length + 1):][:-1] for ctx, cont in pairs]
    order = sorted(range(len(pairs)), key=lambda i: -len(inputs[i]))
    start = 0
    with torch.inference_mode():
        while start < len(order):
            longest = len(inputs[order[start]])
            batch = order[start:start + max(1, _LOGITS_BUDGET // (longest * vocab))]
            start += len(batch)
            if should_cancel():
                raise JobCancelled("cancelled during task evaluation")
            ids = torch.zeros(len(batch), longest, dtype=torch.long)
            for row, index in enumerate(batch):
                ids[row, :len(inputs[index])] = torch.tensor(inputs[index])
            logits = model(ids.to(device), use_cache=False).logits
            for row, index in enumerate(batch):
                cont, end = pairs[index][1], len(inputs[index])
                # The logits at positions end-len(cont) .. end-1 predict the continuation's tokens.
                results[index] = _score(logits[row, end - len(cont):end], cont)
            del logits
    return [result for result in results if result is not None]


def _score(logits: torch.Tensor, cont: list[int]) -> tuple[float, bool]:
    """Sum of the continuation's log-probabilities under these logits (one row per token), and whether each token
    is the argmax of its row."""
    logprobs = F.log_softmax(logits.float(), dim=-1)
    target = torch.tensor(cont, device=logprobs.device)
    return float(logprobs.gather(1, target[:, None]).sum()), bool((logprobs.argmax(dim=-1) == target).all())


def task_info(task: Task) -> dict[str, Any]:
    """What the report says of a task: its source and how it is scored."""
    return {**task.source, "items": len(task.items),
            "scoring": "lm-eval multiple_choice, zero-shot: acc = argmax of the summed log-likelihood of ' ' + "
                       "choice after the context; acc_norm = the same divided by the choice's length in characters",
            "lm_eval": _lm_eval_version()}


def _lm_eval_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm-eval")
    except PackageNotFoundError:
        return "not installed"
