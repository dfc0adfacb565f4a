"""EleutherAI lm-evaluation-harness against the server, as a user runs it: local-completions (remote tokenizer
through /tokenizer_info and /tokenize, token-id prompts in batches) on a generation task and a
multiple-choice (loglikelihood) task, and local-chat-completions on the generation task (lm-eval's chat API
has no loglikelihood). Per-item outputs equal lm-eval's own `hf` model with `peft=`, for the base model and an
adapter. The tasks are local JSON files (no Hub)."""
from __future__ import annotations

import json
import os

import pytest

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.tasks import TaskManager  # noqa: E402

GEN = [{"question": q, "answer": a} for q, a in [
    ("Paris is the capital of", " France"), ("The quick brown fox", " jumps"), ("hello", " world"),
    ("Adapters are small;", " the"), ("0123456789", " hello")]]
MC = [{"question": q, "choices": c, "label": 0} for q, c in [
    ("Paris is the capital of", [" France", " Germany", " fox"]),
    ("The quick brown", [" fox", " dog", " capital"]),
    ("Berlin is the capital of", [" Germany", " France"]),
    ("LoRA, DoRA, IA3 and AdaLoRA are", [" adapter types", " emoji", " merges"]),
    ("hello", [" world", " wörld"])]]


def task_yaml(name: str, data: str, output_type: str) -> str:
    common = (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
              f"test_split: test\noutput_type: {output_type}\ndoc_to_text: \"{{{{question}}}}\"\n")
    if output_type == "generate_until":
        return common + ("doc_to_target: \"{{answer}}\"\ngeneration_kwargs:\n  until: [\"\\n\", \".\"]\n"
                         "  max_gen_toks: 6\n  do_sample: false\nmetric_list:\n  - metric: exact_match\n")
    return common + "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{label}}\"\nmetric_list:\n  - metric: acc\n"


@pytest.fixture(scope="module")
def task_manager(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm-eval-tasks")
    for name, rows, kind in (("tiny_gen", GEN, "generate_until"), ("tiny_mc", MC, "multiple_choice")):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (root / f"{name}.yaml").write_text(task_yaml(name, str(root / f"{name}.jsonl"), kind))
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    return TaskManager(include_path=str(root), include_defaults=False)


def evaluate(task_manager, tasks: list[str], model: str, model_args: dict, chat: bool = False) -> dict:
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, task_manager=task_manager,
                                  log_samples=True, apply_chat_template=chat, random_seed=0, numpy_random_seed=0,
                                  torch_random_seed=0, fewshot_random_seed=0, bootstrap_iters=0)
    return {task: [(s["doc_id"], s["filtered_resps"]) for s in sorted(samples, key=lambda s: s["doc_id"])]
            for task, samples in out["samples"].items()}


def per_item(results: dict) -> dict:
    """Generation: the text; multiple choice: the chosen index (argmax of the loglikelihoods) and each
    choice's loglikelihood (compared to 1e-3: PEFT in float32 vs the paged engine's batched forward)."""
    out = {}
    for task, rows in results.items():
        if task == "tiny_mc":
            out[task] = [(i, max(range(len(r)), key=lambda k: r[k][0]), [float(x[0]) for x in r])
                         for i, r in rows]
        else:
            out[task] = [(i, r[0] if isinstance(r, list) else r) for i, r in rows]
    return out


@pytest.mark.parametrize("adapter", [None, "alpha"])
def test_lm_eval_matches_its_hf_peft_model(server, task_manager, tiny_model_dir, adapter_root, adapter):
    hf_args = {"pretrained": str(tiny_model_dir), "dtype": "float32", "device": "cpu", "batch_size": 4}
    if adapter:
        hf_args["peft"] = str(adapter_root / adapter)
    want = per_item(evaluate(task_manager, ["tiny_gen", "tiny_mc"], "hf", hf_args))
    name = adapter or "tiny-llama"
    api_args = {"base_url": f"{server.url}/v1/completions", "model": name, "batch_size": 16,
                "num_concurrent": 1, "max_retries": 1, "tokenizer_backend": "remote"}
    got = per_item(evaluate(task_manager, ["tiny_gen", "tiny_mc"], "local-completions", api_args))
    assert got["tiny_gen"] == want["tiny_gen"]
    assert [(i, k) for i, k, _ in got["tiny_mc"]] == [(i, k) for i, k, _ in want["tiny_mc"]]
    for (_, _, lls), (_, _, want_lls) in zip(got["tiny_mc"], want["tiny_mc"]):
        assert lls == pytest.approx(want_lls, abs=1e-3)
    want_chat = per_item(evaluate(task_manager, ["tiny_gen"], "hf", hf_args, chat=True))
    chat_args = {"base_url": f"{server.url}/v1/chat/completions", "model": name, "max_retries": 1,
                 "tokenizer_backend": None}
    assert per_item(evaluate(task_manager, ["tiny_gen"], "local-chat-completions", chat_args, chat=True)) == want_chat
