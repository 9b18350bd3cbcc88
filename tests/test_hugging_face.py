"""Hugging Face models handed over as they are: keyword inputs (``model(**inputs)``), a
``ModelOutput`` for ``loss_fn``, and :mod:`pergrad.losses` against Hugging Face's own losses.
Small random models from configs, float64, against one backward per example."""

import pytest
import torch
from zoo import statistics

import pergrad
from pergrad import losses

transformers = pytest.importorskip("transformers")

B, T, VOCAB = 4, 7, 40


def _padded() -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and an attention mask with 0-3 padding positions at the end of each row."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (B, T), generator=gen)
    mask = (torch.arange(T) < T - torch.arange(B)[:, None]).long()
    return ids * mask, mask


def _causal(family: str):
    small = {"vocab_size": VOCAB, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 1}
    configs = {
        "gpt2": lambda: transformers.GPT2Config(
            n_layer=2, n_embd=16, n_head=2, n_positions=T, attn_pdrop=0, resid_pdrop=0,
            embd_pdrop=0, **small,
        ),
        "llama": lambda: transformers.LlamaConfig(
            num_hidden_layers=2, hidden_size=16, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=32, max_position_embeddings=T, **small,
        ),
        "falcon": lambda: transformers.FalconConfig(
            num_hidden_layers=2, hidden_size=16, num_attention_heads=2, **small,
        ),
        "qwen2": lambda: transformers.Qwen2Config(
            num_hidden_layers=2, hidden_size=16, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=32, max_position_embeddings=T, **small,
        ),
    }  # fmt: skip
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(configs[family]()).double().train()


def _bert(head: str):
    torch.manual_seed(0)
    config = transformers.BertConfig(
        num_hidden_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=32,
        vocab_size=VOCAB, max_position_embeddings=T, num_labels=3, hidden_dropout_prob=0,
        attention_probs_dropout_prob=0,
    )  # fmt: skip
    kind = {
        "sequence": transformers.BertForSequenceClassification,
        "token": transformers.BertForTokenClassification,
    }[head]
    return kind(config).double().train()


def _classification(head: str, mask: torch.Tensor):
    """The loss of a sequence or token classifier and random labels for it (padding not
    counted)."""
    gen = torch.Generator().manual_seed(1)
    if head == "sequence":
        return losses.classification, torch.randint(0, 3, (B,), generator=gen)
    labels = torch.randint(0, 3, (B, T), generator=gen).masked_fill(mask == 0, -100)
    return losses.token_classification, labels


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "falcon"])
def test_a_causal_language_model_with_keyword_inputs(family):
    model = _causal(family)
    ids, mask = _padded()
    labels = ids.masked_fill(mask == 0, -100)
    sources = statistics(
        model, losses.causal_lm, {"input_ids": ids, "attention_mask": mask}, labels
    )
    assert not {n: s for n, s in sources.items() if s in {"func", "hooks", "loop"}}


@pytest.mark.parametrize("head", ["sequence", "token"])
def test_a_bert_classifier_with_keyword_inputs(head):
    model = _bert(head)
    ids, mask = _padded()
    loss_fn, labels = _classification(head, mask)
    statistics(model, loss_fn, {"input_ids": ids, "attention_mask": mask}, labels)


def test_causal_lm_is_hugging_faces_loss_for_each_example_alone():
    model = _causal("gpt2")
    ids, mask = _padded()
    labels = ids.masked_fill(mask == 0, -100)
    output = model(input_ids=ids, attention_mask=mask)
    ours = losses.causal_lm(output, labels)
    summed = losses.causal_lm(output, labels, reduction="sum")
    for b in range(B):
        alone = model(
            input_ids=ids[b : b + 1], attention_mask=mask[b : b + 1], labels=labels[b : b + 1]
        )
        torch.testing.assert_close(ours[b], alone.loss.double(), rtol=1e-6, atol=0)
        counted = int((labels[b, 1:] != -100).sum())
        torch.testing.assert_close(summed[b], ours[b] * counted)


@pytest.mark.parametrize("head", ["sequence", "token"])
def test_the_classification_losses_are_hugging_faces_for_each_example_alone(head):
    model = _bert(head)
    ids, mask = _padded()
    loss_fn, labels = _classification(head, mask)
    ours = loss_fn(model(input_ids=ids, attention_mask=mask), labels)
    assert ours.shape == (B,)
    for b in range(B):
        alone = model(
            input_ids=ids[b : b + 1], attention_mask=mask[b : b + 1], labels=labels[b : b + 1]
        )
        torch.testing.assert_close(ours[b], alone.loss.double(), rtol=1e-6, atol=0)


def test_the_losses_take_a_tuple_or_a_tensor_of_logits():
    logits = torch.randn(B, T, 5, dtype=torch.float64)
    labels = torch.randint(0, 5, (B, T))
    expected = losses.causal_lm(logits, labels)
    torch.testing.assert_close(losses.causal_lm((logits, None), labels), expected)
    half = losses.causal_lm(logits.bfloat16(), labels)  # upcast to float32, as HF does
    assert half.dtype == torch.float32


BAD_LOSSES = {
    "an example with no counted token": (
        lambda: losses.causal_lm(torch.randn(2, 3, 5), torch.tensor([[1, 2, 3], [4, -100, -100]])),
        r"example\(s\) \[1\] have no counted token",
    ),
    "labels of the wrong shape": (
        lambda: losses.causal_lm(torch.randn(2, 3, 5), torch.zeros(2, 4, dtype=torch.long)),
        r"labels has shape \(2, 4\), the logits need \(2, 3\)",
    ),
    "per-token labels for a sequence classifier": (
        lambda: losses.classification(torch.randn(2, 5), torch.zeros(2, 3, dtype=torch.long)),
        "one class per example",
    ),
    "an ignored label for a sequence classifier": (
        lambda: losses.classification(torch.randn(2, 5), torch.tensor([1, -100])),
        r"class outside 0..4",
    ),
    "an output without logits": (
        lambda: losses.classification({"hidden": torch.randn(2, 5)}, torch.zeros(2)),
        "without logits",
    ),
    "a bad reduction": (
        lambda: losses.causal_lm(
            torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), reduction="max"
        ),
        "Invalid reduction",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_LOSSES))
def test_bad_labels_are_refused_saying_what_to_do(case):
    call, message = BAD_LOSSES[case]
    with pytest.raises(pergrad.InputError, match=message):
        call()


def test_an_example_with_no_counted_token_is_refused_before_anything_changes():
    model = _causal("gpt2")
    ids, mask = _padded()
    labels = ids.clone()
    labels[2] = -100
    engine = pergrad.PerExample(model, losses.causal_lm)
    with pytest.raises(pergrad.InputError, match=r"example\(s\) \[2\]"):
        engine.backward({"input_ids": ids, "attention_mask": mask}, labels)
    assert all(p.grad is None for p in model.parameters())


BAD_DICTS = {
    "tensors that disagree on B": (
        lambda ids, mask: {"input_ids": ids, "attention_mask": mask[:2]},
        pergrad.InputError,
        r"inputs\['attention_mask'\]: 2",
    ),
    "a value that is not a tensor": (
        lambda ids, mask: {"input_ids": ids, "use_cache": False},
        TypeError,
        r"inputs\['use_cache'\] is a bool",
    ),
    "an empty dict": (lambda ids, mask: {}, pergrad.InputError, "empty dict"),
}


@pytest.mark.parametrize("case", sorted(BAD_DICTS))
def test_a_bad_dict_of_inputs_is_refused_naming_the_key(case):
    make, error, message = BAD_DICTS[case]
    model = _causal("gpt2")
    ids, mask = _padded()
    with pytest.raises(error, match=message):
        pergrad.PerExample(model, losses.causal_lm).backward(make(ids, mask), ids)
    assert all(p.grad is None for p in model.parameters())


def test_bf16_autocast_and_accumulation_with_keyword_inputs():
    """Two halves under bfloat16 autocast leave what one call on the whole batch leaves,
    each statistic in the parameter's own dtype."""
    model = _causal("llama").float()
    ids, mask = _padded()
    labels = ids.masked_fill(mask == 0, -100)
    engine = pergrad.PerExample(model, losses.causal_lm)
    found = []
    for halves in ([slice(0, B)], [slice(0, 2), slice(2, B)]):
        engine.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for rows in halves:
                engine.backward(
                    {"input_ids": ids[rows], "attention_mask": mask[rows]}, labels[rows]
                )
        found.append(
            {n: (p.grad.clone(), p.grad_stats.sq_mean.clone()) for n, p in model.named_parameters()}
        )
    whole, halves = found
    for name, p in model.named_parameters():
        assert whole[name][0].dtype == torch.float32 and pergrad.grad_stats(p).count == B
        for a, b in zip(whole[name], halves[name]):
            scale = max(float(a.abs().max()), 1e-6)
            torch.testing.assert_close(a, b, rtol=0.05, atol=0.05 * scale, msg=name)


class TinyLM(torch.nn.Module):
    """An embedding and a head: a language model ``vmap`` runs, for ``mode="func"``."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = torch.nn.Embedding(VOCAB, 8), torch.nn.Linear(8, VOCAB)

    def forward(self, input_ids):
        return self.head(self.embed(input_ids).tanh())


@pytest.mark.parametrize("loss_fn", [losses.causal_lm, losses.token_classification])
@pytest.mark.parametrize("mode", ["func", "loop"])
def test_the_token_losses_in_the_modes_that_take_one_example_at_a_time(mode, loss_fn):
    torch.manual_seed(0)
    model = TinyLM().double()
    ids, mask = _padded()
    labels = ids.masked_fill(mask == 0, -100) if loss_fn is losses.causal_lm else ids % 3
    statistics(model, loss_fn, {"input_ids": ids}, labels, mode=mode)
