"""Gemma 2 (Gemma2ForCausalLM; Gemma Team 2024, arXiv:2408.00118) from an HF config: a spec writer and a weight map.

Beside Gemma's RMSNorm (x (1 + w): norm(rmsnorm, offset=1)), its sqrt(d_model) embedding scale and GeGLU (tanh
gelu), Gemma 2 has
  - layers alternating sliding-window and global attention (HF's layer_types, by default "sliding_attention" for
    even layer indices): a repeat of a two-layer body, local then global (and one more local layer for an odd
    count). HF's sliding mask keeps keys kv > q - sliding_window, i.e. t-w+1 .. t: mha(local, window=w) exactly;
  - attention logit soft-capping c tanh(s / c) (softcap=) and final-logit soft-capping (head(lm, softcap=));
  - the score scale query_pre_attn_scalar^-1/2 instead of head_dim^-1/2 (scale=, written only where they differ);
  - sandwich norms: input_layernorm -> attention -> post_attention_layernorm inside the residual, and
    pre_feedforward_layernorm -> mlp -> post_feedforward_layernorm inside the next.
Another layer pattern, bidirectional attention, a config without a sliding window, and attention dropout with the
cap (the capped kernel has none) are refused (E415) at their keys.
"""
from __future__ import annotations

from ._config import Config
from ._spec import Spec, fmt
from .decoders import GLU_OF_ACT, Take, _rope

SANDWICH = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")


def default_layer_types(layers: int) -> list[str]:
    return ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]


def gemma2_spec(c: Config) -> Spec:
    c.require("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "sliding_window")
    d, heads, layers = c.get("hidden_size"), c.get("num_attention_heads"), c.get("num_hidden_layers")
    types = c.get("layer_types", None)
    if types is not None and list(types) != default_layer_types(layers):
        c.refuse("layer_types", "a layer pattern other than Gemma 2's (sliding, full, sliding, ...)",
                 "the importer writes the alternating pattern; write another one by hand")
    if c.get("use_bidirectional_attention", False):
        c.refuse("use_bidirectional_attention", "bidirectional attention in a causal LM", "set it false")
    act = c.first(("hidden_activation", "hidden_act"), "gelu_pytorch_tanh")
    if act not in GLU_OF_ACT:
        c.refuse("hidden_activation", f"activation {act!r} has no gated FFN here",
                 "ffn has geglu_tanh (gelu_pytorch_tanh), geglu (gelu), swiglu (silu), reglu (relu)")
    cap, final_cap = c.get("attn_logit_softcapping", None), c.get("final_logit_softcapping", None)
    p_attn = c.get("attention_dropout", 0.0)
    if p_attn and cap is not None:
        c.refuse("attention_dropout", "capped attention (attn_logit_softcapping) has no dropout on its weights",
                 "attention_dropout=0")
    head_dim = c.get("head_dim", d // heads) or d // heads
    s = Spec("gemma2", "Gemma2ForCausalLM", c)
    s.bind(vocab=c.get("vocab_size"), d_model=d, heads=heads, kv_heads=c.get("num_key_value_heads", heads))
    if head_dim * heads != d:
        s.bind(head_dim=head_dim)
    s.bind(d_ff=c.get("intermediate_size"), pairs=layers // 2, eps=c.get("rms_norm_eps", 1e-6),
           window=c.get("sliding_window"))
    mods = f", bias={fmt(bool(c.get('attention_bias', False)))}"
    scalar = c.get("query_pre_attn_scalar", head_dim)
    if scalar != head_dim:
        s.bind(q_scale=float(scalar) ** -0.5)
        mods += ", scale=q_scale"
    if cap is not None:
        s.bind(softcap=cap)
        mods += ", softcap=softcap"
    if p_attn:
        mods += f", dropout={fmt(p_attn)}"
    norm = "norm(rmsnorm, offset=1)"
    ffn = f"residual({norm} -> ffn({GLU_OF_ACT.get(act, 'geglu_tanh')}, bias=false) -> {norm})"
    s.line(f"local_layer = residual({norm} -> mha(local, window=window{mods}) -> {norm})\n    -> {ffn}")
    s.line(f"global_layer = residual({norm} -> mha(softmax{mods}) -> {norm})\n    -> {ffn}")
    tied = c.get("tie_word_embeddings", True)
    head = f"head(lm, tied={fmt(tied)}" + (f", softcap={fmt(final_cap)})" if final_cap is not None else ")")
    repeat = "repeat(local_layer -> global_layer, pairs)" + ("\n    -> local_layer" if layers % 2 else "")
    s.model("causal=true", f"input(tokens) -> embed(token, scale=true) -> {_rope(c)}", f"{norm} -> {head}", repeat)
    return s


def gemma2_weights(c: Config) -> dict:
    layers = c.get("num_hidden_layers")
    tied = c.get("tie_word_embeddings", True)
    final = "norm5.weight" if layers % 2 else "norm.weight"  # after a trailing local layer, the fifth norm at top
    out = {"embed.weight": Take("model.embed_tokens.weight"), final: Take("model.norm.weight"),
           "head.weight": Take("model.embed_tokens.weight" if tied else "lm_head.weight")}
    biased = [".weight", ".bias"] if c.get("attention_bias", False) else [".weight"]
    for i in range(layers):
        h = f"model.layers.{i}."
        if i // 2 < layers // 2:  # a pair: blocks.p holds norm1..8, attn1, ffn1 (local) and attn2, ffn2 (global)
            e, second = f"blocks.{i // 2}.", i % 2
            attn, ffn = f"attn{second + 1}", f"ffn{second + 1}"
        else:  # the trailing local layer of an odd count, at top level
            e, second, attn, ffn = "", 0, "attn", "ffn"
        for j, theirs in enumerate(SANDWICH):
            out[e + f"norm{4 * second + j + 1}.weight"] = Take(h + theirs + ".weight")
        for x in "qkvo":
            for part in biased:
                out[e + f"{attn}.{x}_proj{part}"] = Take(h + f"self_attn.{x}_proj{part}")
        for name in ("gate_proj", "up_proj", "down_proj"):
            out[e + f"{ffn}.{name}.weight"] = Take(h + f"mlp.{name}.weight")
    return out
