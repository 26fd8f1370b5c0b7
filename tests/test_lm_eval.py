"""--lm_eval: lm-evaluation-harness on the compressed model, checked against the model's own log-likelihoods."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, OPTForCausalLM

import opt_enhanced as oe
from pipeline import lm_eval_tasks
from pipeline.lm_eval_tasks import available
from pipeline.run import run

pytestmark = pytest.mark.skipif(not available(), reason="lm-eval or accelerate is not installed")

WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "with", "it"]


def make_docs(n: int = 40) -> list[dict]:
    """Questions of 2-5 words with 2-4 choices of 1-2 words, from the tiny data's lexicon (seeded)."""
    g = torch.Generator().manual_seed(0)
    pick = lambda k: " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (k,), generator=g).tolist())
    docs = []
    for _ in range(n):
        k = int(torch.randint(2, 5, (1,), generator=g))
        choices = [pick(int(torch.randint(1, 3, (1,), generator=g))) for _ in range(k)]
        docs.append({"question": pick(int(torch.randint(2, 6, (1,), generator=g))), "choices": choices,
                     "answer": int(torch.randint(0, k, (1,), generator=g))})
    return docs


DOCS = make_docs()


def write_task(directory) -> None:
    """A local multiple-choice task over DOCS (offline: the data is a local JSON-lines file)."""
    data = directory / "tiny_choice.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (directory / "tiny_choice.yaml").write_text(
        "task: tiny_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")


def own_accuracy(model, tokenizer) -> float:
    """Share of DOCS whose answer has the highest summed log-probability of its tokens after the question
    (lm-eval's `acc`: no BOS, the choice after a space), from the model's logits directly."""
    right = 0
    for doc in DOCS:
        context = tokenizer(doc["question"], add_special_tokens=False)["input_ids"]
        scores = []
        for choice in doc["choices"]:
            whole = tokenizer(doc["question"] + " " + choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
            scores.append(sum(logp[i - 1, whole[i]].item() for i in range(len(context), len(whole))))
        right += int(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
    return right / len(DOCS)


def test_lm_eval_scores_the_compressed_model(tmp_path, tiny_dir):
    model_dir, data_dir = tiny_dir
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_task(tasks)
    results = run(oe.parse_args([
        str(model_dir), "c4", "--data_dir", str(data_dir), "--nsamples", "2", "--seqlen", "32", "--device", "cpu",
        "--eval", "ptb", "--quiet", "--sparsity", "0.5", "--wbits", "3", "--lm_eval", "tiny_choice",
        "--lm_eval_include", str(tasks), "--save", str(tmp_path / "saved"), "--results_json", str(tmp_path / "r.json")]))
    saved = OPTForCausalLM.from_pretrained(tmp_path / "saved").eval()
    expected = own_accuracy(saved, AutoTokenizer.from_pretrained(tmp_path / "saved"))
    assert results["lm_eval"]["tiny_choice"]["acc,none"] == pytest.approx(expected)
    assert json.loads((tmp_path / "r.json").read_text())["lm_eval"]["tiny_choice"]["acc,none"] == pytest.approx(expected)


def test_unknown_task_is_a_usage_error_before_any_work(tmp_path, tiny_dir, capsys):
    model_dir, data_dir = tiny_dir
    code = oe.main([str(model_dir), "c4", "--data_dir", str(data_dir), "--lm_eval", "no_such_task_here",
                    "--results_json", str(tmp_path / "r.json")])
    assert code == 2 and "no_such_task_here" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_the_quick_check_reads_every_file_of_lm_evals_tasks():
    """Some tags are defined only in files that YAML definitions include, not named *.yaml (acp_bench: in
    acpbench's _boolq_cot_2shot_yaml and others). Checked once against lm-eval 0.4.13's index: the scan
    finds all of its 14,683 names."""
    found = lm_eval_tasks.written_in_lm_eval(["acp_bench", "hellaswag", "arc_multilingual", "no_such_task_here"])
    assert found == {"acp_bench", "hellaswag", "arc_multilingual"}


def test_names_found_in_lm_evals_files_are_decided_by_the_index(tmp_path, monkeypatch):
    """"acc" is written in many of lm-eval's definitions and is no task: the index rejects it. An index of
    the local definitions stands in for lm-eval's whole one (seconds to build)."""
    write_task(tmp_path)
    from lm_eval.tasks import TaskManager

    small = TaskManager(include_path=str(tmp_path), include_defaults=False)
    monkeypatch.setattr(lm_eval_tasks, "_index", lambda include, defaults: small)
    assert lm_eval_tasks.unknown_tasks(["tiny_choice", "acc"], str(tmp_path)) == ["acc"]
    assert lm_eval_tasks.unknown_tasks(["tiny_choice", "acc", "no_such_task_here"], str(tmp_path)) == \
        ["no_such_task_here"]  # found in no file: reported without the index
    assert lm_eval_tasks.unknown_tasks(["tiny_choice"], str(tmp_path)) == []
