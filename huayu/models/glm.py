"""GLM: one Transformer that is BERT, GPT and T5 at once through its attention mask and 2D positions
(Du et al. 2022, "GLM: General Language Model Pretraining with Autoregressive Blank Infilling").

A sequence is Part A, the text with each blanked span replaced by a mask token ([MASK], [sMASK] or
[gMASK]), followed by Part B, each span written as `<sop> s1 … sn`. Part A attends bidirectionally
within Part A; a Part B token attends to all of Part A and causally to Part B up to itself. Position
ids are 2D: the first is the position in Part A (a Part B token takes its span's mask position), the
second is 0 in Part A and 1, 2, … inside a span. Labels are aligned with the inputs, as in GLM's code:
the label at `<sop>` is s1, …, at sn it is `<eop>`; Part A carries none.

Where Part B begins and which mask a span fills are read off the ids: Part B starts at the first
`<sop>`, and the k-th `<sop>` fills the k-th mask token of Part A. A prompt `text [gMASK] <sop>` thus
needs no other inputs and `generate()` works as for any decoder. Pre-training passes its own
position_ids (its spans are shuffled); scoring several candidates for one blank passes an explicit
(batch, query, key) mask from `span_attention_mask(..., isolate=True)`.

The blocks have the paper's changes to the Transformer: pre-layer-norm residuals, GeLU, and a
single linear layer for token prediction (tied to the input embeddings unless
`tie_word_embeddings=False`). Importing this module registers the model with transformers' Auto
classes (`import huayu` arranges that).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from huayu.data.batching import IGNORE

MODEL_TYPE = "huayu-glm"


class GLMConfig(PretrainedConfig):
    model_type = MODEL_TYPE

    def __init__(self, vocab_size: int = 7000, hidden_size: int = 256, num_hidden_layers: int = 4,
                 num_attention_heads: int = 4, intermediate_size: int | None = None,
                 max_position_embeddings: int = 512, hidden_dropout: float = 0.1, attention_dropout: float = 0.1,
                 layer_norm_eps: float = 1e-5, initializer_range: float = 0.02, mask_token_id: int | None = None,
                 smask_token_id: int | None = None, gmask_token_id: int | None = None,
                 sop_token_id: int | None = None, eop_token_id: int | None = None, tie_word_embeddings: bool = True,
                 **kwargs):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.intermediate_size = intermediate_size or 4 * hidden_size
        self.max_position_embeddings = max_position_embeddings
        self.hidden_dropout, self.attention_dropout = hidden_dropout, attention_dropout
        self.layer_norm_eps, self.initializer_range = layer_norm_eps, initializer_range
        self.mask_token_id, self.smask_token_id, self.gmask_token_id = mask_token_id, smask_token_id, gmask_token_id
        self.sop_token_id, self.eop_token_id = sop_token_id, eop_token_id
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def blank_token_ids(self) -> list[int]:
        """The mask tokens a span can fill: [MASK], [sMASK], [gMASK]."""
        return [i for i in (self.mask_token_id, self.smask_token_id, self.gmask_token_id) if i is not None]


def blank_layout(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 config: GLMConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(position_ids (batch, 2, length), part_a (batch, length)) read off the ids, padding aware.

    Part B starts at a row's first `<sop>`; the k-th span's position is that of the k-th mask token
    in Part A (or, past the last mask, the position right after Part A, so text followed by `<sop>`
    is a continuation). Padding gets position 0 and is outside both parts."""
    if config.sop_token_id is None:
        raise ValueError("the GLM config has no sop_token_id")
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    sop = (input_ids == config.sop_token_id) & valid
    spans = sop.long().cumsum(-1)                       # span number of a Part B token; 0 in Part A
    part_a = valid & (spans == 0)
    position = (part_a.long().cumsum(-1) - 1).clamp(min=0)
    blanks = torch.isin(input_ids, torch.tensor(config.blank_token_ids, device=input_ids.device)) & part_a
    rank = blanks.long().cumsum(-1)                     # k at the k-th mask token
    width = int(torch.maximum(rank, spans).max()) + 1
    table = part_a.sum(-1, keepdim=True).repeat(1, width)   # column k: the position the k-th span fills
    table.scatter_(1, torch.where(blanks, rank, 0), torch.where(blanks, position, table[:, :1]))
    first = torch.where(part_a, position, table.gather(1, spans))
    index = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    last_sop = torch.where(sop, index, -1).cummax(-1).values
    second = torch.where(spans > 0, index - last_sop + 1, 0)
    positions = torch.stack([first, second], dim=1) * valid[:, None]
    return positions, part_a


def span_attention_mask(spans: torch.Tensor, valid: torch.Tensor, isolate: bool = False) -> torch.Tensor:
    """The (batch, query, key) mask of spans numbered per token (0: Part A, k: Part B span k).
    GLM's own is `isolate=False`: a Part B token sees Part A and Part B up to itself. With `isolate`,
    it sees Part A and its own span only, so candidates for one blank are scored side by side, each
    as if it were alone."""
    n = spans.shape[-1]
    index = torch.arange(n, device=spans.device)
    earlier = index[None, :] <= index[:, None]          # [query, key]
    key_a = (spans == 0)[:, None, :]
    in_b = earlier[None] & ((spans[:, None, :] == spans[:, :, None]) if isolate else True)
    allowed = valid[:, None, :] & (key_a | in_b)
    return allowed | torch.eye(n, dtype=torch.bool, device=spans.device)   # padding attends to itself


def _prefix_mask(part_a: torch.Tensor, key_valid: torch.Tensor, past: int) -> torch.Tensor:
    """GLM's mask for new tokens after `past` cached ones: every valid key of Part A, and causally
    the rest. Cached keys (the text so far when decoding, a learned prefix in prefix tuning) are
    seen by every new token."""
    n_new, n_keys = part_a.shape[1], key_valid.shape[1]
    key_a = torch.cat([part_a.new_ones(part_a.shape[0], past), part_a], dim=1)
    query = torch.arange(past, past + n_new, device=part_a.device)
    key = torch.arange(n_keys, device=part_a.device)
    allowed = key_valid[:, None, :] & (key_a[:, None, :] | (key[None, :] <= query[:, None])[None])
    return allowed | (key[None, :] == query[:, None])[None]


class GLMAttention(nn.Module):
    def __init__(self, config: GLMConfig, layer_idx: int):
        super().__init__()
        self.heads, self.layer_idx = config.num_attention_heads, layer_idx
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(config.hidden_size, config.hidden_size)
                                                              for _ in range(4))
        self.dropout = config.attention_dropout

    def forward(self, hidden: torch.Tensor, allowed: torch.Tensor, cache=None) -> torch.Tensor:
        b, n, width = hidden.shape

        def heads(x):
            return x.view(b, n, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(hidden)), heads(self.k_proj(hidden)), heads(self.v_proj(hidden))
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None],
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, width))


class GLMMLP(nn.Module):
    def __init__(self, config: GLMConfig):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(hidden), approximate="tanh"))


class GLMBlock(nn.Module):
    """Pre-layer-norm: x + attention(LN(x)), then + MLP(LN(.))."""

    def __init__(self, config: GLMConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = GLMAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = GLMMLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, hidden: torch.Tensor, allowed: torch.Tensor, cache=None) -> torch.Tensor:
        hidden = hidden + self.dropout(self.attention(self.input_layernorm(hidden), allowed, cache))
        return hidden + self.dropout(self.mlp(self.post_attention_layernorm(hidden)))


class GLMPreTrainedModel(PreTrainedModel):
    config_class = GLMConfig
    config: GLMConfig
    base_model_prefix = "glm"
    _no_split_modules = ["GLMBlock"]
    supports_gradient_checkpointing = False


class GLMModel(GLMPreTrainedModel):
    """Embeddings (token + position + block position), pre-LN blocks, a final layer norm."""

    def __init__(self, config: GLMConfig):
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.block_position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList(GLMBlock(config, i) for i in range(config.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.word_embeddings

    def set_input_embeddings(self, value):
        self.word_embeddings = value

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache=None, use_cache: bool | None = None,
                **kwargs) -> BaseModelOutputWithPast:
        """`attention_mask`: (batch, keys) padding, or an explicit (batch, query, key) boolean mask;
        `position_ids`: (batch, 2, length), read off the ids when not given (without a cache)."""
        from transformers import DynamicCache

        b, n = input_ids.shape
        cache = cache if cache is not None else kwargs.get("past_key_values")  # peft's prefix tuning passes that
        if use_cache and cache is None:
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is not None and attention_mask.dim() == 3:
            allowed = attention_mask.bool()
            if position_ids is None:
                raise ValueError("an explicit (batch, query, key) attention mask needs explicit position_ids")
        else:
            key_valid = (torch.ones(b, past + n, dtype=torch.bool, device=input_ids.device)
                         if attention_mask is None else attention_mask.bool())
            if position_ids is None and past and not (input_ids == self.config.sop_token_id).any(-1).all():
                raise ValueError("decoding with a cache needs position_ids (GLM's 2D positions)")
            derived, part_a = blank_layout(input_ids, key_valid[:, -n:], self.config)
            position_ids = derived if position_ids is None else position_ids
            allowed = _prefix_mask(part_a, key_valid, past)
        if position_ids.dim() != 3 or position_ids.shape[1] != 2:
            raise ValueError(f"GLM position_ids are (batch, 2, length), got shape {tuple(position_ids.shape)}")
        hidden = (self.word_embeddings(input_ids) + self.position_embeddings(position_ids[:, 0])
                  + self.block_position_embeddings(position_ids[:, 1]))
        hidden = self.dropout(hidden)
        for layer in self.layers:
            hidden = layer(hidden, allowed, cache)
        return BaseModelOutputWithPast(last_hidden_state=self.final_layernorm(hidden), cache=cache)


class GLMForBlankInfilling(GLMPreTrainedModel, GenerationMixin):
    """GLM with its single linear output layer; `labels` are aligned with the inputs (no shift)."""
    _tied_weights_keys = {"lm_head.weight": "glm.word_embeddings.weight"}

    def __init__(self, config: GLMConfig):
        super().__init__(config)
        self.glm = GLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.glm.word_embeddings

    def set_input_embeddings(self, value):
        self.glm.word_embeddings = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache=None, labels: torch.Tensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int = 0, **kwargs) -> CausalLMOutputWithPast:
        out = self.glm(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                       use_cache=use_cache, **kwargs)
        hidden = out.last_hidden_state
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1), ignore_index=IGNORE)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache)

    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, cache=None, attention_mask=None,
                                      **kwargs):
        """2D positions of the whole sequence so far (generated tokens continue the last span);
        transformers slices them to the new tokens."""
        positions = kwargs.pop("position_ids", None)
        if positions is None or positions.dim() != 3:
            positions, _ = blank_layout(input_ids, attention_mask, self.config)
        return super().prepare_inputs_for_generation(input_ids, next_sequence_length, cache, attention_mask,
                                                     position_ids=positions, **kwargs)


AutoConfig.register(MODEL_TYPE, GLMConfig, exist_ok=True)
AutoModel.register(GLMConfig, GLMModel, exist_ok=True)
AutoModelForCausalLM.register(GLMConfig, GLMForBlankInfilling, exist_ok=True)
