"""The local trainer's options (issue #19): gradient accumulation, warm-up and cosine decay over
the run, gradient checkpointing, autocast settings; carried by the instruction and refused by a
site when out of range."""

from __future__ import annotations

import math

import pytest
import torch

from aggregators import Instruction, make_algorithm, takes_trainer_options
from aggregators.local_training import TrainerOptions, instructed_training, train_steps
from fedclient.tasks.data import TokenizedDataset
from fedserver.run_config import RunConfigError, check_run_config


class BagOfTokens(torch.nn.Module):
    """A deterministic classifier (no dropout): mean token embedding → linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(50, 8)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).float()
        return self.head((self.embed(input_ids) * mask).sum(1) / mask.sum(1))


def _data(n: int = 32) -> TokenizedDataset:
    generator = torch.Generator().manual_seed(1)
    return TokenizedDataset(torch.randint(0, 50, (n, 6), generator=generator), torch.ones(n, 6, dtype=torch.long),
                            torch.randint(0, 3, (n,), generator=generator))


def _trained(options: TrainerOptions, batch_size: int, steps: int = 1, optimizer: str = "sgd") -> dict:
    model = BagOfTokens()
    train_steps(model, _data(), trainable=[n for n, _ in model.named_parameters()], steps=steps,
                batch_size=batch_size, lr=0.5, seed=3, optimizer=optimizer, options=options)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_accumulating_two_batches_is_one_step_on_their_union() -> None:
    accumulated = _trained(TrainerOptions(grad_accumulation=2), batch_size=4)
    one_big_batch = _trained(TrainerOptions(), batch_size=8)
    one_small_batch = _trained(TrainerOptions(), batch_size=4)
    assert all(torch.allclose(accumulated[k], one_big_batch[k], atol=1e-6) for k in accumulated)
    assert not all(torch.allclose(accumulated[k], one_small_batch[k], atol=1e-6) for k in accumulated)


def test_warmup_then_cosine_over_the_whole_run() -> None:
    options = TrainerOptions(warmup_steps=4, lr_schedule="cosine")
    factors = [options.lr_factor(step, 20) for step in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0 and all(a > b for a, b in zip(factors[4:], factors[5:], strict=False))
    assert factors[12] == pytest.approx(0.5 * (1 + math.cos(math.pi * 8 / 16)))
    assert factors[-1] > 0  # no step is wasted at lr 0
    assert [TrainerOptions().lr_factor(s, 20) for s in (0, 19)] == [1.0, 1.0]
    # a round's instruction says where its steps sit: round 3 of 5 with 4 local steps starts at step 8 of 20
    fedavg = make_algorithm("fedavg", {"local-steps": 4, "num-server-rounds": 5, "warmup-steps": 4,
                                       "lr-schedule": "cosine"})
    (instruction,) = fedavg.plan(3, [0], fedavg.init_state({"w": torch.zeros(2)})).values()
    training = instructed_training(Instruction.from_record(instruction.to_record()).config)
    assert (training["schedule_step"], training["schedule_steps"]) == (8, 20)
    assert training["options"] == options


def test_the_schedule_sets_each_steps_learning_rate() -> None:
    """SGD on a constant gradient moves a weight by lr x factor per step: the sum shows the schedule."""
    class Line(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, input_ids, attention_mask):
            return torch.stack([self.w * 0, self.w, self.w * 0], dim=-1).expand(len(input_ids), 3)

    options = TrainerOptions(warmup_steps=2, lr_schedule="cosine")
    model = Line()
    data = TokenizedDataset(torch.zeros(4, 1, dtype=torch.long), torch.ones(4, 1, dtype=torch.long),
                            torch.zeros(4, dtype=torch.long))
    # d loss / d w for this logit layout is the constant softmax(w)_1 only at w=0; use a tiny lr
    train_steps(model, data, trainable=["w"], steps=3, batch_size=4, lr=1e-6, seed=0, optimizer="sgd",
                options=options, schedule_step=2, schedule_steps=6)
    gradient = 1 / 3  # d CE / d logit_1 at equal logits, label 0
    expected = sum(options.lr_factor(s, 6) for s in (2, 3, 4)) * 1e-6 * gradient
    assert float(-model.w.detach()) == pytest.approx(expected, rel=1e-3)


def test_gradient_checkpointing_gives_the_same_step_on_a_real_language_model() -> None:
    from fedclient.tasks import get_task

    task = get_task("tiny-lm")
    data = task.load_data().train.subset(range(8))
    results, block_calls = [], []
    for checkpointing in (False, True):
        model = task.build_model()
        keys = task.trainable_keys(model)[:6]
        mlp = next(m for name, m in model.named_modules() if name.endswith("layers.1.mlp"))
        calls = []
        mlp.forward = lambda *args, _forward=mlp.forward, **kwargs: calls.append(1) or _forward(*args, **kwargs)
        train_steps(model, data, trainable=keys, steps=1, batch_size=4, lr=1e-1, seed=0, optimizer="sgd",
                    options=TrainerOptions(gradient_checkpointing=checkpointing))
        block_calls.append(len(calls))
        assert not any(getattr(m, "_require_grads_hooks", None) for m in model.modules())  # no hook left behind
        assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())  # switched off after
        results.append({k: v.detach().clone() for k, v in model.named_parameters() if k in keys})
    assert block_calls == [1, 2]  # checkpointing ran the block's MLP again in the backward pass
    assert all(torch.allclose(results[0][k], results[1][k], atol=1e-6) for k in keys)  # SGD: the same gradients
    with pytest.raises(ValueError, match="gradient-checkpointing: BagOfTokens"):
        _trained(TrainerOptions(gradient_checkpointing=True), batch_size=4)


def test_precision_is_fp32_on_a_cpu_and_autocasts_on_cuda() -> None:
    assert TrainerOptions(precision="bf16").autocast_dtype(torch.device("cpu")) is None
    assert TrainerOptions(precision="bf16").autocast_dtype(torch.device("cuda")) == torch.bfloat16
    assert TrainerOptions(precision="fp16").autocast_dtype(torch.device("cuda")) == torch.float16
    assert TrainerOptions().autocast_dtype(torch.device("cuda")) is None
    # bf16 asked for on a CPU trains exactly as fp32 does
    assert all(torch.equal(a, b) for a, b in zip(_trained(TrainerOptions(precision="bf16"), 4).values(),
                                                 _trained(TrainerOptions(), 4).values(), strict=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_on_cuda_trains_close_to_fp32(precision: str) -> None:
    from fedclient.tasks import get_task

    task = get_task("tiny-lm")
    data = task.load_data().train.subset(range(8))
    results = []
    for options in (TrainerOptions(), TrainerOptions(precision=precision, gradient_checkpointing=True)):
        model = task.build_model().cuda()
        keys = task.trainable_keys(model)[:6]
        stats = train_steps(model, data, trainable=keys, steps=2, batch_size=4, lr=1e-4, seed=0, options=options)
        results.append(stats.mean_loss)
        assert all(p.dtype == torch.float32 for p in model.parameters())
    assert results[1] == pytest.approx(results[0], rel=0.05)


def test_a_site_refuses_an_instruction_that_asks_for_endless_accumulation() -> None:
    fedavg = make_algorithm("fedavg", {"local-steps": 1, "batch-size": 4})
    model = BagOfTokens()
    state = fedavg.init_state({k: v.detach().clone() for k, v in model.state_dict().items()})
    (instruction,) = fedavg.plan(1, [0], state).values()
    for key, value in (("grad-accumulation", 10**6), ("grad-accumulation", 0), ("warmup-steps", -1),
                       ("lr-schedule", "exponential"), ("precision", "fp8")):
        hostile = Instruction(instruction.arrays, {**instruction.config, key: value})
        with pytest.raises(ValueError, match=key):
            fedavg.local(model, _data(), hostile, {})


def test_the_run_config_check_names_bad_options_and_strategies_that_ignore_them() -> None:
    with pytest.raises(RunConfigError) as err:
        check_run_config({"grad-accumulation": 100, "lr-schedule": "linear"})
    text = str(err.value)
    assert "grad-accumulation must be between 1 and 64" in text
    with pytest.raises(RunConfigError, match="lr-schedule must be one of constant, cosine"):
        check_run_config({"lr-schedule": "linear"})
    with pytest.raises(RunConfigError, match="strategy fedkseed does not train with gradient steps"):
        check_run_config({"strategy": "fedkseed", "warmup-steps": 5})
    assert takes_trainer_options("ferret") and not takes_trainer_options("scallion")
    check_run_config({"strategy": "ferret", "grad-accumulation": 2, "lr-schedule": "cosine", "precision": "bf16",
                      "gradient-checkpointing": True})


def test_a_runs_max_length_re_encodes_the_task_and_is_bounded() -> None:
    from fedclient.tasks import get_task, run_task

    task = get_task("tiny-lm")
    short = run_task({"task": "tiny-lm", "max-length": 48})
    assert short.max_length == 48 and run_task({"task": "tiny-lm", "max-length": 0}) is task
    data = short.load_data()
    assert data.train.input_ids.shape[1] == 48 and task.load_data().train.input_ids.shape[1] == task.max_length
    assert len(data.train) == len(task.load_data().train)
    for hostile in (10**6, 4):  # a site refuses to encode without bound, or to lose every answer
        with pytest.raises(ValueError, match="max-length must be between 16 and 2048 for task 'tiny-lm'"):
            run_task({"task": "tiny-lm", "max-length": hostile})
    with pytest.raises(RunConfigError, match="max-length must be between 16 and 512 for task 'minilm-bbc'"):
        check_run_config({"max-length": 1024})


def test_fp16_with_a_loss_scaler_and_accumulation_trains_close_to_fp32(monkeypatch) -> None:
    """The fp16 path (autocast, GradScaler, unscaling before SCAFFOLD's correction is added),
    exercised on the CPU by letting autocast run there."""
    fp32 = _trained(TrainerOptions(grad_accumulation=2), batch_size=4, steps=3)
    monkeypatch.setattr(TrainerOptions, "autocast_dtype", lambda self, device: torch.float16
                        if self.precision == "fp16" else None)
    fp16 = _trained(TrainerOptions(grad_accumulation=2, precision="fp16"), batch_size=4, steps=3)
    assert all(torch.allclose(fp16[k], fp32[k], atol=5e-3) for k in fp32)
    assert not all(torch.equal(fp16[k], fp32[k]) for k in fp32)  # it did run in half precision
    model = BagOfTokens()
    correction = {n: torch.full_like(p, 0.01) for n, p in model.named_parameters()}
    stats = train_steps(model, _data(), trainable=list(correction), steps=2, batch_size=4, lr=0.5, seed=3,
                        optimizer="sgd", gradient_correction=correction, options=TrainerOptions(precision="fp16"))
    assert stats.steps == 2 and math.isfinite(stats.mean_loss)


def test_a_schedule_position_outside_the_run_is_refused() -> None:
    model = BagOfTokens()
    for step, total in ((-5, 0), (0, 1), (10, 12)):
        with pytest.raises(ValueError, match="do not hold this round's 3 steps"):
            train_steps(model, _data(), trainable=["head.bias"], steps=3, batch_size=4, lr=0.1, seed=0,
                        options=TrainerOptions(warmup_steps=1), schedule_step=step, schedule_steps=total)
    assert 0 < TrainerOptions(warmup_steps=2, lr_schedule="cosine").lr_factor(-10**6, 10) <= 1
