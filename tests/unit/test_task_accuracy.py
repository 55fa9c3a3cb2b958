"""Task accuracy: lm-eval's multiple-choice scoring of our model in memory, checked against a direct,
hand-written computation of its definition; builtin:wiki-next-sentence's items; task files and their errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from prunekit.core.uploads import InvalidUpload, check_upload
from prunekit.vocabulary import ARCHIVE_LIMITS, EVALUATION, TASK, WIKI_NEXT_SENTENCE
from workers.pruning.data import wiki_en_articles
from workers.pruning.models import load_model
from workers.pruning.pipeline import run
from workers.pruning.spec import CalibrationSpec, EvaluationSpec, JobError, PruneSpec
from workers.pruning.task_accuracy import (
    HELD_OUT,
    NUM_CHOICES,
    Task,
    TaskItem,
    held_out_articles,
    load_task,
    read_task_file,
    score_tasks,
    split_sentences,
    wiki_next_sentence,
)

ITEMS = (
    TaskItem("The capital of France is", ("Paris.", "a large banana on the moon.", "blue"), 0),
    TaskItem("Water freezes at zero degrees", ("Celsius.", "Fahrenheit, they say."), 1),
    TaskItem("She opened the door and", ("walked in.", "the the the", "sat.", "smiled at everyone there."), 3),
    TaskItem("Numbers: one, two,", ("three", "four"), 0),
)


def _direct_loglikelihood(model: torch.nn.Module, tokenizer: object, context: str, choice: str) -> float:
    """The definition, written out: log p(" " + choice | context) = the sum over the continuation's tokens of
    log softmax(logits)[token], the continuation being the tokens of context + " " + choice after those of context
    (lm-eval's split), all in one forward pass of the whole sequence."""
    whole = tokenizer.encode(context + " " + choice)  # type: ignore[attr-defined]
    prefix = tokenizer.encode(context)  # type: ignore[attr-defined]
    assert whole[:len(prefix)] == prefix
    with torch.no_grad():
        logits = model(torch.tensor([whole])).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    return sum(float(logprobs[position - 1, whole[position]]) for position in range(len(prefix), len(whole)))


def test_lm_eval_scores_equal_the_hand_computed_definition(tiny_llama_dir: Path) -> None:
    loaded = load_model(tiny_llama_dir, torch.device("cpu"))
    model, tokenizer = loaded.model, loaded.tokenizer
    expected_acc, expected_norm = [], []
    for item in ITEMS:
        lls = [_direct_loglikelihood(model, tokenizer, item.context, choice) for choice in item.choices]
        # acc: argmax of the log-likelihoods; acc_norm: argmax of log-likelihood / len(choice in characters).
        expected_acc.append(max(range(len(lls)), key=lambda i: lls[i]) == item.answer)
        expected_norm.append(max(range(len(lls)), key=lambda i: lls[i] / len(item.choices[i])) == item.answer)
    scores = score_tasks(model, tokenizer, [Task("hand", ITEMS, {})])["hand"]
    assert scores["n"] == len(ITEMS)
    assert scores["acc"] == pytest.approx(sum(expected_acc) / len(ITEMS))
    assert scores["acc_norm"] == pytest.approx(sum(expected_norm) / len(ITEMS))
    # lm-eval's standard error of a mean of 0/1 values: sqrt(p (1 - p) / (n - 1)).
    p = scores["acc"]
    assert scores["acc_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (len(ITEMS) - 1)), abs=1e-6)


def test_the_loglikelihoods_equal_lm_evals_own_hf_model(tiny_llama_dir: Path) -> None:
    """lm-eval's reference model class (HFLM) on the same model object gives the same log-likelihoods as ours,
    batched and padded, to float precision."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from workers.pruning.task_accuracy import _HarnessLM

    loaded = load_model(tiny_llama_dir, torch.device("cpu"))
    requests = [Instance("loglikelihood", {}, (item.context, " " + choice), index)
                for item in ITEMS for index, choice in enumerate(item.choices)]
    reference = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=1)
    ours = _HarnessLM(loaded.model, loaded.tokenizer, lambda: False)
    for (want, want_greedy), (got, got_greedy) in zip(reference.loglikelihood(requests), ours.loglikelihood(requests),
                                                      strict=True):
        assert got == pytest.approx(want, abs=1e-4) and got_greedy == want_greedy


def test_wiki_next_sentence_is_deterministic_and_well_formed() -> None:
    task = wiki_next_sentence(60)
    assert task == wiki_next_sentence(60) and task.name == WIKI_NEXT_SENTENCE and len(task.items) == 60
    held = [" ".join(article.split()) for article in held_out_articles()]
    answers = set()
    for item in task.items:
        assert len(item.choices) == NUM_CHOICES == len(set(item.choices))
        assert 0 <= item.answer < NUM_CHOICES
        answers.add(item.answer)
        true = item.choices[item.answer]
        # The true choice continues the context in one held-out article; no distractor continues it anywhere.
        assert sum(f"{item.context} {true}" in text for text in held) == 1
        assert all(f"{item.context} {choice}" not in text for choice in item.choices if choice != true
                   for text in held)
    assert answers == set(range(NUM_CHOICES))  # the true sentence is not always in one place
    assert len({item.context for item in task.items}) == 60  # one item per article
    assert load_task(WIKI_NEXT_SENTENCE, 5).items == wiki_next_sentence(5).items


def test_held_out_articles_are_read_by_neither_calibration_nor_default_evaluation(tiny_llama_dir: Path) -> None:
    """In tokens of a real tokenizer: the held-out text starts after the default evaluation windows and ends
    before the second half of the stream, where calibration windows start."""
    articles = wiki_en_articles()
    text = "\n\n".join(articles)
    held = held_out_articles()
    first, last = text.index(held[0]), text.index(held[-1]) + len(held[-1])
    assert HELD_OUT[0] * len(text) <= first < last <= HELD_OUT[1] * len(text)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    # Tokenized once, as token_stream does (the whole text, no special tokens), with each token's characters.
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    first_token = next(i for i, (_, end) in enumerate(offsets) if end > first)
    last_token = next(i for i, (_, end) in enumerate(offsets) if end >= last)
    assert first_token >= EVALUATION.num_samples * EVALUATION.seq_len
    assert last_token < len(offsets) // 2


def test_sentences_are_not_split_after_abbreviations_or_initials() -> None:
    assert split_sentences("Dr. Smith lived in St. Louis, U.S. He was born in 1900. J. R. R. Tolkien wrote it.") == [
        "Dr. Smith lived in St. Louis, U.S. He was born in 1900.", "J. R. R. Tolkien wrote it."]
    assert split_sentences("One.  Two!\nThree? 4 is a number.") == ["One.", "Two!", "Three?", "4 is a number."]


def _write(path: Path, *lines: object) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines),
                    encoding="utf-8")
    return path


GOOD = {"context": "Two plus two is", "choices": ["four", "five"], "answer": 0}


@pytest.mark.parametrize(("record", "message"), [
    ({"context": 3, "choices": ["a", "b"], "answer": 0}, "field 'context' must be a string"),
    ({"context": "c", "choices": ["a"], "answer": 0}, "field 'choices' must be a list of 2 to 26 strings"),
    ({"context": "c", "choices": "ab", "answer": 0}, "field 'choices' must be a list"),
    ({"context": "c", "choices": ["a", ""], "answer": 0}, "field 'choices' item 1 must be a non-empty string"),
    ({"context": "c", "choices": ["a", "a"], "answer": 0}, "field 'choices' holds the same choice twice"),
    ({"context": "c", "choices": ["a", "b"], "answer": 2}, "field 'answer' must be the index of the right choice, "
                                                           "an integer from 0 to 1"),
    ({"context": "c", "choices": ["a", "b"], "answer": "0"}, "field 'answer' must be the index"),
    ({"context": "c", "choices": ["a", "b"], "answer": True}, "field 'answer' must be the index"),
    ({"context": "c", "choices": ["a", "b"]}, "field 'answer' must be the index"),
    (["not", "an", "object"], "is not a JSON object"),
])
def test_bad_task_files_are_refused_naming_the_line_and_field(tmp_path: Path, record: object, message: str) -> None:
    path = _write(tmp_path / "task.jsonl", GOOD, "", record)
    with pytest.raises(JobError, match=f"task.jsonl line 3: {message}") as caught:
        read_task_file(path)
    assert caught.value.code == "dataset_error"
    if isinstance(record, dict) and "context" in record:  # an upload with it is refused by the API the same way
        with pytest.raises(InvalidUpload, match=f"line 3: {message}"):
            check_upload(path, "task.jsonl", ARCHIVE_LIMITS)


def test_task_files_read_and_upload_as_tasks(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.jsonl", GOOD, {"context": "", "choices": ["x", "y", "z"], "answer": 2}, "")
    assert read_task_file(path) == (TaskItem("Two plus two is", ("four", "five"), 0), TaskItem("", ("x", "y", "z"), 2))
    assert read_task_file(path, limit=1) == read_task_file(path)[:1]
    checked = check_upload(path, "t.jsonl", ARCHIVE_LIMITS)
    assert (checked.kind, checked.num_records, checked.stored_name) == (TASK, 2, "data.jsonl")
    text = _write(tmp_path / "text.jsonl", {"text": "hello"}, {"text": "world"})
    assert check_upload(text, "text.jsonl", ARCHIVE_LIMITS).kind == "text"  # a text .jsonl is still text
    with pytest.raises(JobError, match="line 1 is not valid JSON"):
        read_task_file(_write(tmp_path / "bad.jsonl", "{nope"))
    with pytest.raises(JobError, match="holds no items"):
        read_task_file(_write(tmp_path / "empty.jsonl", "", "  "))
    with pytest.raises(JobError, match="Unknown built-in task"):
        load_task("builtin:nope", 10)


def test_a_clip_model_is_refused_before_any_data_is_made(tiny_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spec = PruneSpec(model_dir=tiny_model("clip"), method="magnitude", sparsity=0.5,
                     evaluation=EvaluationSpec(tasks=(WIKI_NEXT_SENTENCE,)))
    with pytest.raises(JobError, match="evaluation.tasks: the model is not a language model") as caught:
        run(spec, tmp_path / "out")
    assert caught.value.code == "invalid_spec"


def test_a_job_reports_each_task_dense_and_pruned(tiny_llama_dir: Path, tmp_path: Path) -> None:
    path = _write(tmp_path / "mine.jsonl", *[{"context": i.context, "choices": list(i.choices), "answer": i.answer}
                                            for i in ITEMS])
    spec = PruneSpec(model_dir=tiny_llama_dir, method="wanda", sparsity=0.5,
                     calibration=CalibrationSpec(num_samples=2, seq_len=32),
                     evaluation=EvaluationSpec(perplexity=False, tasks=(WIKI_NEXT_SENTENCE, "ds_mine"),
                                               task_num_samples=8, task_files={"ds_mine": str(path)}))
    result = run(spec, tmp_path / "out")
    tasks = result.metrics["tasks"]
    assert set(tasks) == {WIKI_NEXT_SENTENCE, "ds_mine"}
    assert tasks[WIKI_NEXT_SENTENCE]["n"] == 8 and tasks["ds_mine"]["n"] == len(ITEMS)
    for entry in tasks.values():
        for which in ("dense", "pruned"):
            assert set(entry[which]) == {"acc", "acc_norm", "acc_stderr", "acc_norm_stderr"}
            assert 0 <= entry[which]["acc"] <= 1
    assert "perplexity" not in result.metrics  # not asked for: tasks alone are measured
    assert result.report["data"]["tasks"]["ds_mine"]["file"] == "ds_mine"
    assert result.report["data"]["tasks"][WIKI_NEXT_SENTENCE]["items"] == 8
    assert tuple(result.report["spec"]["evaluation"]["tasks"]) == (WIKI_NEXT_SENTENCE, "ds_mine")
    assert "task_files" not in result.report["spec"]["evaluation"]  # the attempt's scratch paths stay out
    assert {"evaluation_dense", "evaluation_pruned"} <= set(result.metrics["timings_s"])

