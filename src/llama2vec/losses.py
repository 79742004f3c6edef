"""Losses: the bag-of-words pretext loss (EBAE / EBAR) and the module that runs the model for it.

The maths are pure functions on tensors; `PretextModel` runs the stock Hugging Face decoder with
the collator's mask and positions and takes LM-head logits only at the 2K placeholder positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def bow_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Bag-of-words loss per example.

    logits (B, K, V) at the K placeholder positions; targets (B, T) unique target ids;
    mask (B, T) marks real targets. z = max over the K positions (identity for K = 1);
    loss = - mean over targets u of log_softmax(z)[u]. Returns (B,).
    """
    z = logits.float().max(dim=1).values  # (B, V)
    logp = z.log_softmax(dim=-1)  # (B, V)
    picked = logp.gather(1, targets)  # (B, T)
    m = mask.to(picked.dtype)  # (B, T)
    return -(picked * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)  # (B,)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L, L) bool -> (B, 1, L, L) additive float mask: 0 where allowed, dtype min elsewhere.
    (A boolean 4-D mask is misread by some attention kernels; the float form is exact.)"""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    low = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, low)[:, None]  # (B, 1, L, L)


def unwrap_lm(model: nn.Module) -> nn.Module:
    """The Hugging Face causal LM inside a PEFT wrapper (LoRA layers stay injected)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_states(lm: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor,
                   attention_mask: torch.Tensor) -> torch.Tensor:
    """Last-layer hidden states after the final norm, (B, L, H), without computing any logits."""
    out = lm.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=False)
    return out.last_hidden_state


def last_states(lm: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: torch.Tensor, k: int) -> torch.Tensor:
    """`decoder_states(...)[:, -k:]`, (B, k, H), for left-padded batches (every row ends at the
    last column), doing less work: the last decoder layer runs its queries, attention output and MLP
    only at the k positions read (its keys and values still cover every position). That skips
    nearly one layer in num_hidden_layers. Llama-architecture decoders only; any other decoder, or a
    4-D mask, takes the full forward."""
    base = lm.base_model
    if attention_mask.dim() != 2 or type(base).__name__ != "LlamaModel":
        return decoder_states(lm, input_ids, position_ids, attention_mask)[:, -k:]
    from transformers.masking_utils import create_causal_mask

    h = base.embed_tokens(input_ids)  # (B, L, H)
    mask = create_causal_mask(config=base.config, inputs_embeds=h, attention_mask=attention_mask, cache=None,
                              position_ids=position_ids)
    rope = base.rotary_emb(h, position_ids=position_ids)  # cos, sin: (B, L, head_dim) each
    *body, last = base.layers[: base.config.num_hidden_layers]
    for layer in body:
        h = layer(h, attention_mask=mask, position_embeddings=rope, position_ids=position_ids)
    return base.norm(_last_layer_at_tail(last, h, attention_mask, rope, k))


def _last_layer_at_tail(layer: nn.Module, h: torch.Tensor, attention_mask: torch.Tensor,
                        rope: tuple[torch.Tensor, torch.Tensor], k: int) -> torch.Tensor:
    """A Llama decoder layer's output at the last k positions only: (B, L, H) -> (B, k, H)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn, (cos, sin) = layer.self_attn, rope
    b, n, _ = h.shape
    x = layer.input_layernorm(h)
    heads, groups = attn.config.num_attention_heads, attn.num_key_value_groups  # fixed: static shapes in export
    q = attn.q_proj(x[:, -k:]).view(b, -1, heads, attn.head_dim).transpose(1, 2)  # (B, heads, k, d)
    kv_shape = (b, n, heads // groups, attn.head_dim)
    key = attn.k_proj(x).view(kv_shape).transpose(1, 2)  # (B, kv heads, L, d)
    value = attn.v_proj(x).view(kv_shape).transpose(1, 2)
    q, _ = apply_rotary_pos_emb(q, q, cos[:, -k:], sin[:, -k:])
    key, _ = apply_rotary_pos_emb(key, key, cos, sin)
    columns = torch.arange(n, device=h.device)
    causal = columns[None, :] <= columns[-k:, None]  # (k, L): query i sits at column L - k + i
    allowed = causal[None] & attention_mask[:, None, :].bool()  # (B, k, L)
    out = F.scaled_dot_product_attention(
        q, key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1), attn_mask=allowed[:, None],
        dropout_p=attn.attention_dropout if attn.training else 0.0, scale=attn.scaling)  # (B, heads, k, d)
    h = h[:, -k:] + attn.o_proj(out.transpose(1, 2).reshape(b, -1, heads * attn.head_dim))
    return h + layer.mlp(layer.post_attention_layernorm(h))


@dataclass
class PretextWeights:
    ebae: float = 1.0
    ebar: float = 1.0
    lm: float = 0.0


class PretextModel(nn.Module):
    """Wraps a causal LM (or its PEFT wrapper); forward(batch) -> dict of losses.

    Returns loss (the weighted total), ebae, ebar and, when its weight is on, lm; each a scalar.
    Logits are computed only at the 2K placeholder positions (and at the text when the LM loss is
    on). `all_logits=True` is the plain path instead: the stock forward computes logits at every
    position and the placeholders' rows are picked from them. Same losses, far more memory; it is
    kept for the memory benchmark and the equivalence test.
    """

    def __init__(self, model: nn.Module, weights: PretextWeights, all_logits: bool = False):
        super().__init__()
        self.model = model
        self.weights = weights
        self.all_logits = all_logits

    def forward(self, **batch: torch.Tensor) -> dict[str, torch.Tensor]:
        lm = unwrap_lm(self.model)
        if self.all_logits:
            return self._plain(lm, batch)
        head = lm.get_output_embeddings()
        dtype = head.weight.dtype
        if "allowed" in batch:  # joint pass
            states = decoder_states(lm, batch["input_ids"], batch["position_ids"],
                                    additive_mask(batch["allowed"], dtype))  # (B, L, H)
            self_states = states[:, batch["self_positions"]]  # (B, K, H)
            next_states = states[:, batch["next_positions"]]  # (B, K, H)
            text_states = states[:, : int(batch["text_length"])]  # (B, Lt, H)
            text_ids = batch["input_ids"][:, : int(batch["text_length"])]
        else:  # two separate passes
            s = decoder_states(lm, batch["self_input_ids"], batch["self_position_ids"], batch["self_attention_mask"])
            n = decoder_states(lm, batch["next_input_ids"], batch["next_position_ids"], batch["next_attention_mask"])
            self_states, next_states = s[:, batch["self_positions"]], n[:, batch["next_positions"]]
            width = batch["lm_labels"].shape[1] if "lm_labels" in batch else 0
            text_states, text_ids = s[:, :width], batch["self_input_ids"][:, :width]
        logits = head(torch.cat([self_states, next_states], dim=1))  # (B, 2K, V): the only logits
        lm_logits = head(text_states[:, :-1]) if self.weights.lm > 0 else None
        return self._losses(batch, logits, lm_logits, text_ids)

    def _plain(self, lm: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if "allowed" not in batch:
            raise ValueError("all_logits is implemented for the joint layout only")
        logits = lm(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                    attention_mask=additive_mask(batch["allowed"], lm.get_output_embeddings().weight.dtype)).logits
        width = int(batch["text_length"])
        placeholders = torch.cat([batch["self_positions"], batch["next_positions"]])
        return self._losses(batch, logits[:, placeholders], logits[:, : width - 1], batch["input_ids"][:, :width])

    def _losses(self, batch, logits, lm_logits, text_ids) -> dict[str, torch.Tensor]:
        k = logits.shape[1] // 2
        ebae = bow_loss(logits[:, :k], batch["ebae_targets"], batch["ebae_mask"]).mean()
        ebar = bow_loss(logits[:, k:], batch["ebar_targets"], batch["ebar_mask"]).mean()
        out = {"ebae": ebae, "ebar": ebar}
        total = self.weights.ebae * ebae + self.weights.ebar * ebar
        if self.weights.lm > 0:
            labels = batch["lm_labels"]  # (B, Lt): T's ids, -100 elsewhere
            assert labels.shape[1] == text_ids.shape[1]
            lm_logits = lm_logits.float()  # (B, Lt-1, V)
            out["lm"] = F.cross_entropy(lm_logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
            total = total + self.weights.lm * out["lm"]
        out["loss"] = total
        return out
