"""Randomly initialised versions of models people actually train, each wrapped so that
``model(*inputs)`` returns a plain Tensor and paired with a per-example loss: how to hand
Hugging Face models (GPT-2, BERT, Llama, Falcon, OPT, Mixtral, Qwen2-MoE, Mamba, ViT, Swin),
nanoGPT and a ResNet to ``pergrad``.

Every builder takes the batch size ``B``, ``dtype`` (float64 unless told) and ``size``
(:data:`SIZES`: ``"test"``, tiny, for the tests; ``"bench"``, small but not tiny, for the
benchmark) and returns ``(model, inputs, target, loss_fn)``: the model in ``.train()`` mode
with every dropout probability 0, and ``loss_fn(output, target)`` of shape ``(B,)``. Nothing
is downloaded: the Hugging Face models are built from configs.

    model, inputs, target, loss_fn = REAL_MODELS["gpt2"](32, dtype=torch.float32)
    pergrad.PerExample(model, loss_fn).backward(inputs, target)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SIZES = {
    "test": {"width": 16, "heads": 2, "vocab": 50, "length": 6, "image": 8},
    "bench": {"width": 128, "heads": 4, "vocab": 1000, "length": 64, "image": 32},
}
"""Width, attention heads, vocabulary, sequence length and image side of each size; every
transformer has 2 layers."""

LossFn = Callable[[Tensor, Tensor], Tensor]
Built = tuple[nn.Module, tuple[Tensor, ...] | Tensor, Tensor, LossFn]


def next_token_loss(logits: Tensor, tokens: Tensor) -> Tensor:
    """Per-example mean cross-entropy of predicting token ``t + 1`` from the logits at ``t``."""
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none").mean(1)


cross_entropy = nn.CrossEntropyLoss(reduction="none")


class Logits(nn.Module):
    """A Hugging Face model called with keyword inputs, returning only ``.logits``."""

    def __init__(self, model: nn.Module, *keywords: str, **options):
        super().__init__()
        self.model = model
        self.keywords = keywords
        self.options = options

    def forward(self, *inputs: Tensor) -> Tensor:
        return self.model(**dict(zip(self.keywords, inputs)), **self.options).logits


def _tokens(b: int, size: dict) -> Tensor:
    return torch.randint(0, size["vocab"], (b, size["length"]))


def _finish(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    return model.to(dtype).train()


def gpt2(b: int, *, dtype: torch.dtype = torch.float64, size: str = "test") -> Built:
    """GPT-2 language model; ``lm_head`` is tied to ``transformer.wte``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    s = SIZES[size]
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_head=s["heads"], n_embd=s["width"], n_positions=s["length"],
        vocab_size=s["vocab"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        summary_first_dropout=0.0, bos_token_id=s["vocab"] - 1, eos_token_id=s["vocab"] - 1,
    )  # fmt: skip
    model = _finish(Logits(GPT2LMHeadModel(config), "input_ids", use_cache=False), dtype)
    tokens = _tokens(b, s)
    return model, tokens, tokens, next_token_loss


def bert(b: int, *, dtype: torch.dtype = torch.float64, size: str = "test") -> Built:
    """BERT sequence classifier on ``(input_ids, attention_mask)``, examples padded unevenly."""
    from transformers import BertConfig, BertForSequenceClassification

    s = SIZES[size]
    torch.manual_seed(0)
    config = BertConfig(
        num_hidden_layers=2, hidden_size=s["width"], num_attention_heads=s["heads"],
        intermediate_size=2 * s["width"], vocab_size=s["vocab"],
        max_position_embeddings=s["length"], num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0,
    )  # fmt: skip
    model = BertForSequenceClassification(config)
    model = _finish(Logits(model, "input_ids", "attention_mask", use_cache=False), dtype)
    length = s["length"]
    mask = (torch.arange(length) < length - torch.arange(b)[:, None] % 3).long()  # 0-2 pads
    tokens = _tokens(b, s) * mask  # pad_token_id = 0
    return model, (tokens, mask), torch.randint(0, 3, (b,)), cross_entropy


def llama(b: int, *, dtype: torch.dtype = torch.float64, size: str = "test") -> Built:
    """Llama language model with grouped-query attention (4 heads, 2 key-value heads), SDPA."""
    from transformers import LlamaConfig, LlamaForCausalLM

    s = SIZES[size]
    torch.manual_seed(0)
    config = LlamaConfig(
        num_hidden_layers=2, hidden_size=s["width"], num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=2 * s["width"], vocab_size=s["vocab"],
        max_position_embeddings=s["length"], attention_dropout=0.0, attn_implementation="sdpa",
    )  # fmt: skip
    model = _finish(Logits(LlamaForCausalLM(config), "input_ids", use_cache=False), dtype)
    tokens = _tokens(b, s)
    return model, tokens, tokens, next_token_loss


def falcon(b: int, *, dtype: torch.dtype = torch.float64, size: str = "test") -> Built:
    """Falcon language model: its MLP output is changed in place (``+= attention_output``)."""
    from transformers import FalconConfig, FalconForCausalLM

    s = SIZES[size]
    torch.manual_seed(0)
    config = FalconConfig(
        num_hidden_layers=2, hidden_size=s["width"], num_attention_heads=s["heads"],
        vocab_size=s["vocab"], hidden_dropout=0.0, attention_dropout=0.0,
        bos_token_id=s["vocab"] - 1, eos_token_id=s["vocab"] - 1,
    )  # fmt: skip
    model = _finish(Logits(FalconForCausalLM(config), "input_ids", use_cache=False), dtype)
    tokens = _tokens(b, s)
    return model, tokens, tokens, next_token_loss


def opt(b: int, *, dtype: torch.dtype = torch.float64, size: str = "test") -> Built:
    """OPT language model: its feed-forward layers run on the batch's tokens flattened,
    ``(B·T, width)``."""
    from transformers import OPTConfig, OPTForCausalLM

    s = SIZES[size]
    torch.manual_seed(0)
    config = OPTConfig(
        num_hidden_layers=2, hidden_size=s["width"], num_attention_heads=s["heads"],
        ffn_dim=2 * s["width"], word_embed_proj_dim=s["width"], vocab_size=s["vocab"],
        max_position_embeddings=s["length"], dropout=0.0, attention_dropout=0.0,
        bos_token_id=s["vocab"] - 1, eos_token_id=s["vocab"] - 1, pad_token_id=0,
    )  # fmt: skip
    model = _finish(Logits(OPTForCausalLM(config), "input_ids", use_cache=False), dtype)
    tokens = _tokens(b, s)
    return model, tokens, tokens, next_token_loss


def _mixture(family: str):
    def build(b: int, *, dtype: torch.dtype = torch.float64, size: str = "test") -> Built:
        """A mixture-of-experts language model (4 experts, 2 per token) whose experts run on
        the tokens routed to them, one expert at a time (``experts_implementation="eager"``)."""
        import transformers

        s = SIZES[size]
        torch.manual_seed(0)
        common = dict(
            num_hidden_layers=2, hidden_size=s["width"], num_attention_heads=4,
            num_key_value_heads=2, vocab_size=s["vocab"], max_position_embeddings=s["length"],
            num_experts_per_tok=2, bos_token_id=s["vocab"] - 1, eos_token_id=s["vocab"] - 1,
        )  # fmt: skip
        if family == "mixtral":
            config = transformers.MixtralConfig(
                **common, intermediate_size=s["width"], num_local_experts=4
            )
        else:
            config = transformers.Qwen2MoeConfig(
                **common, intermediate_size=s["width"], moe_intermediate_size=s["width"] // 2,
                shared_expert_intermediate_size=s["width"] // 2, num_experts=4,
            )  # fmt: skip
        config._experts_implementation = "eager"
        model = transformers.AutoModelForCausalLM.from_config(config)
        model = _finish(Logits(model, "input_ids", use_cache=False), dtype)
        tokens = _tokens(b, s)
        return model, tokens, tokens, next_token_loss

    return build


mixtral = _mixture("mixtral")
qwen2_moe = _mixture("qwen2_moe")


def mamba(b: int, *, dtype: torch.dtype = torch.float64, size: str = "test") -> Built:
    """Mamba language model on its PyTorch path (no CUDA kernels): the mixer uses its
    convolution's and ``dt_proj``'s weights directly, and owns ``A_log`` and ``D``."""
    from transformers import MambaConfig, MambaForCausalLM

    s = SIZES[size]
    torch.manual_seed(0)
    config = MambaConfig(
        num_hidden_layers=2, hidden_size=s["width"], state_size=8, expand=2, conv_kernel=4,
        vocab_size=s["vocab"], use_mambapy=False,
        bos_token_id=s["vocab"] - 1, eos_token_id=s["vocab"] - 1, pad_token_id=0,
    )  # fmt: skip
    model = _finish(Logits(MambaForCausalLM(config), "input_ids", use_cache=False), dtype)
    tokens = _tokens(b, s)
    return model, tokens, tokens, next_token_loss


def swin(b: int, *, dtype: torch.dtype = torch.float64, size: str = "test") -> Built:
    """Swin Transformer classifier: attention within windows of the image cut from the
    batch, ``(B·windows, tokens, width)``, with a relative-position table its attention
    takes as a mask."""
    from transformers import SwinConfig, SwinForImageClassification

    s = SIZES[size]
    torch.manual_seed(0)
    config = SwinConfig(
        image_size=s["image"], patch_size=2, num_channels=3, embed_dim=s["width"] // 2,
        depths=[1, 1], num_heads=[1, 2], window_size=2, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0,
    )  # fmt: skip
    model = _finish(Logits(SwinForImageClassification(config), "pixel_values"), dtype)
    pixels = torch.randn(b, 3, s["image"], s["image"], dtype=dtype)
    return model, pixels, torch.randint(0, 3, (b,)), cross_entropy


def vit(b: int, *, dtype: torch.dtype = torch.float64, size: str = "test") -> Built:
    """Vision Transformer classifier on RGB images in 4×4 patches."""
    from transformers import ViTConfig, ViTForImageClassification

    s = SIZES[size]
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=s["image"], patch_size=4, num_channels=3, hidden_size=s["width"],
        num_hidden_layers=2, num_attention_heads=s["heads"], intermediate_size=2 * s["width"],
        num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    model = _finish(Logits(ViTForImageClassification(config), "pixel_values"), dtype)
    pixels = torch.randn(b, 3, s["image"], s["image"], dtype=dtype)
    return model, pixels, torch.randint(0, 3, (b,)), cross_entropy


# nanoGPT (github.com/karpathy/nanoGPT, model.py), abridged: no generation, no optimizer setup.


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (nanoGPT's own; ``nn.LayerNorm`` had no ``bias=False``)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with one ``c_attn`` projection to q, k and v."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)
        self.n_head, self.n_embd, self.dropout = n_head, n_embd, dropout

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Two linear layers around a GELU."""

    def __init__(self, n_embd: int, dropout: float, bias: bool):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool):
        super().__init__()
        self.ln_1 = LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias)
        self.ln_2 = LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, dropout, bias)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """nanoGPT's GPT; ``forward`` returns the logits at every position (its training path)."""

    def __init__(
        self,
        vocab_size: int = 50,
        block_size: int = 16,
        n_layer: int = 2,
        n_head: int = 2,
        n_embd: int = 16,
        dropout: float = 0.0,
        bias: bool = True,
    ):
        super().__init__()
        self.block_size = block_size
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(vocab_size, n_embd),
                wpe=nn.Embedding(block_size, n_embd),
                drop=nn.Dropout(dropout),
                h=nn.ModuleList([Block(n_embd, n_head, dropout, bias) for _ in range(n_layer)]),
                ln_f=LayerNorm(n_embd, bias=bias),
            )
        )
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: Tensor) -> Tensor:
        b, t = idx.size()
        assert t <= self.block_size, f"sequence of length {t}, block size {self.block_size}"
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)  # (t,)
        tok_emb = self.transformer.wte(idx)
        pos_emb = self.transformer.wpe(pos)
        x = self.transformer.drop(tok_emb + pos_emb)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


def nanogpt(b: int, *, dtype: torch.dtype = torch.float64, size: str = "test") -> Built:
    """nanoGPT language model; ``lm_head`` is tied to ``transformer.wte``."""
    s = SIZES[size]
    torch.manual_seed(0)
    gpt = GPT(s["vocab"], s["length"], n_head=s["heads"], n_embd=s["width"])
    model = _finish(gpt, dtype)
    tokens = _tokens(b, s)
    return model, tokens, tokens, next_token_loss


# ResNet-18 (torchvision's resnet18, abridged) with GroupNorm in place of BatchNorm, whose
# training mode mixes the examples of a batch: torchvision itself does not install beside a
# CPU build of torch from the registry, so the architecture is written out here.


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels), channels)


class BasicBlock(nn.Module):
    """Two 3×3 convolutions and a shortcut, as torchvision's ``BasicBlock``."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = _norm(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = _norm(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False), _norm(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet18(nn.Module):
    """torchvision's ``resnet18(norm_layer=GroupNorm)``: on 32×32 images its last stage
    runs 3×3 convolutions on 1×1 maps."""

    def __init__(self, classes: int = 10, width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = _norm(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, inplanes = [], width
        for planes, stride in ((width, 1), (2 * width, 2), (4 * width, 2), (8 * width, 2)):
            stages.append(
                nn.Sequential(BasicBlock(inplanes, planes, stride), BasicBlock(planes, planes))
            )
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18_gn(b: int, *, dtype: torch.dtype = torch.float64, size: str = "test") -> Built:
    """ResNet-18 with GroupNorm on 32×32 RGB images (width 8 for the tests, 64 as published)."""
    torch.manual_seed(0)
    model = _finish(ResNet18(width=8 if size == "test" else 64), dtype)
    images = torch.randn(b, 3, 32, 32, dtype=dtype)
    return model, images, torch.randint(0, 10, (b,)), cross_entropy


REAL_MODELS: dict[str, Callable[..., Built]] = {
    "gpt2": gpt2,
    "bert": bert,
    "llama": llama,
    "falcon": falcon,
    "opt": opt,
    "mixtral": mixtral,
    "qwen2_moe": qwen2_moe,
    "mamba": mamba,
    "swin": swin,
    "vit": vit,
    "nanogpt": nanogpt,
    "resnet18_gn": resnet18_gn,
}
