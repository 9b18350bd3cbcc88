"""``PerExampleTrainer``: Hugging Face's ``Trainer`` with pergrad's statistics, against the
plain ``PerExample`` + ``optim.Adam`` loop over the same examples (GPT-2 from a config,
float64), with gradient accumulation, clipping and a resumed checkpoint."""

import pytest
import torch

import optim
import pergrad

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from pergrad.integrations.transformers import PerExampleTrainer  # noqa: E402

EXAMPLES, LENGTH, VOCAB = 24, 6, 30
MICRO, ACCUMULATE = 2, 3
"""Each optimizer step: ACCUMULATE micro-batches of MICRO examples."""
OPTIONS = {"lr": 1e-3, "grad_horizon": 20, "sq_horizon": 200}


def _model():
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=2, n_positions=LENGTH, vocab_size=VOCAB,
        bos_token_id=0, eos_token_id=0, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config).double()


def _dataset() -> list[dict]:
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (EXAMPLES, LENGTH), generator=gen)
    return [{"input_ids": row, "labels": row} for row in ids]


def _trainer(model, out, steps: int, **args) -> PerExampleTrainer:
    opt = optim.Adam(model.parameters(), **OPTIONS)
    decaying = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.8**step)
    arguments = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=ACCUMULATE, max_steps=steps, max_grad_norm=0.5,
        train_sampling_strategy="sequential", logging_steps=1, report_to=[], use_cpu=True,
        disable_tqdm=True, seed=0, **{"save_strategy": "no", **args},
    )  # fmt: skip
    return PerExampleTrainer(
        model=model, args=arguments, train_dataset=_dataset(),
        per_example_loss=pergrad.losses.causal_lm, optimizers=(opt, decaying),
    )  # fmt: skip


def _plain_loop(steps: int) -> tuple[torch.nn.Module, list[float]]:
    """The same examples in the same order, one backward of the whole step's batch."""
    model = _model()
    engine = pergrad.PerExample(model, pergrad.losses.causal_lm)
    opt = optim.Adam(model.parameters(), **OPTIONS)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.8**step)
    data, size, losses = _dataset(), MICRO * ACCUMULATE, []
    for step in range(steps):
        ids = torch.stack([row["input_ids"] for row in data[step * size : (step + 1) * size]])
        losses.append(float(engine.backward({"input_ids": ids}, ids)))
        pergrad.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        schedule.step()
        opt.zero_grad()
    return model, losses


def _assert_same_parameters(model, expected):
    for (name, p), q in zip(model.named_parameters(), expected.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-8, atol=1e-10, msg=name)


def test_the_trainer_with_accumulation_equals_the_plain_loop(tmp_path):
    trainer = _trainer(_model(), tmp_path, steps=4)
    trainer.train()
    expected, losses = _plain_loop(4)
    _assert_same_parameters(trainer.model, expected)
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged == pytest.approx(losses, rel=1e-6)  # the mean, not ACCUMULATE times it
    assert all(pergrad.grad_stats(p) is None or p.grad is None for p in trainer.model.parameters())


def test_a_run_resumed_from_a_checkpoint_ends_where_the_whole_run_does(tmp_path):
    first = _trainer(_model(), tmp_path, steps=4, save_strategy="steps", save_steps=2)
    first.train()
    resumed = _trainer(_model(), tmp_path / "again", steps=4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    _assert_same_parameters(resumed.model, first.model)


def test_the_trainer_refuses_what_it_cannot_do_saying_what_to_do(tmp_path):
    model = _model()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(pergrad.InputError, match="per_example_loss="):
        PerExampleTrainer(model=model, args=args, train_dataset=_dataset())
    smoothing = transformers.TrainingArguments(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, label_smoothing_factor=0.1
    )
    with pytest.raises(pergrad.InputError, match="label_smoothing_factor would be ignored"):
        opt = optim.Adam(model.parameters(), lr=1e-3)
        PerExampleTrainer(
            model=model, args=smoothing, train_dataset=_dataset(),
            per_example_loss=pergrad.losses.causal_lm, optimizers=(opt, None),
        )  # fmt: skip
    with pytest.raises(pergrad.InputError, match="optim.Adam"):
        PerExampleTrainer(
            model=model,
            args=args,
            train_dataset=_dataset(),
            per_example_loss=pergrad.losses.causal_lm,
        )
