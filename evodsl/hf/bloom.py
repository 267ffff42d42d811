"""BLOOM from HF configs (BloomForCausalLM: a pre-norm ALiBi decoder with an embedding LayerNorm), as a spec writer
and a weight map. query_key_value is fused per head as (q, k, v): each projection loads its slice of every head."""
from __future__ import annotations

from ._config import Config
from ._spec import Spec, fmt
from .decoders import Take


def bloom_spec(c: Config) -> Spec:
    c.require("vocab_size", "hidden_size", "n_layer", "n_head")
    if c.get("apply_residual_connection_post_layernorm", False):
        c.refuse("apply_residual_connection_post_layernorm", "the residual taken after the LayerNorm has no evodsl "
                 "form", "apply_residual_connection_post_layernorm=false (BLOOM's)")
    s = Spec("bloom", "BloomForCausalLM", c)
    s.bind(vocab=c.get("vocab_size"), d_model=c.get("hidden_size"), heads=c.get("n_head"), layers=c.get("n_layer"),
           eps=c.get("layer_norm_epsilon", 1e-5), p_attn=c.get("attention_dropout", 0.0),
           p_resid=c.get("hidden_dropout", 0.0))
    s.line("block = residual(norm -> mha(softmax, dropout=p_attn) -> dropout(p=p_resid))\n"
           "     -> residual(norm -> ffn(mlp, act=gelu_tanh) -> dropout(p=p_resid))")
    tied = c.get("tie_word_embeddings", True)
    s.model("causal=true", "input(tokens) -> embed(token) -> norm -> pos(alibi)", f"norm -> head(lm, tied={fmt(tied)})")
    return s


def bloom_weights(c: Config) -> dict:
    heads, tied = c.get("n_head"), c.get("tie_word_embeddings", True)
    p = "transformer."
    out = {"embed.weight": Take(p + "word_embeddings.weight"),
           "norm1.weight": Take(p + "word_embeddings_layernorm.weight"),
           "norm1.bias": Take(p + "word_embeddings_layernorm.bias"),
           "norm2.weight": Take(p + "ln_f.weight"), "norm2.bias": Take(p + "ln_f.bias"),
           "head.weight": Take(p + "word_embeddings.weight" if tied else "lm_head.weight")}
    for i in range(c.get("n_layer")):
        h, e = f"{p}h.{i}.", f"blocks.{i}."
        for j, name in enumerate("qkv"):
            for part in (".weight", ".bias"):
                out[e + f"attn.{name}_proj" + part] = Take(h + "self_attention.query_key_value" + part,
                                                           part=(heads, 3, j))
        for ours, theirs in (("norm1", "input_layernorm"), ("attn.o_proj", "self_attention.dense"),
                             ("norm2", "post_attention_layernorm"), ("ffn.up_proj", "mlp.dense_h_to_4h"),
                             ("ffn.down_proj", "mlp.dense_4h_to_h")):
            for part in (".weight", ".bias"):
                out[e + ours + part] = Take(h + theirs + part)
    return out
