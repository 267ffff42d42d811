"""DeepSeek-V2 (DeepseekV2ForCausalLM) from an HF config: multi-head latent attention, mha(mla), in every layer, as a
spec writer and a weight map.

Every layer must be dense (first_k_dense_replace >= num_hidden_layers): evodsl has no MoE ffn yet, so a config
with MoE layers is refused (E415) at that key, as are YaRN rope scaling and attention dropout. HF rotates (2i, 2i+1)
pairs (a complex product), so imports say pos(rope, pairs=interleaved), and the weights load as they are: MLA's
modules are laid out as HF's (kv_a_proj_with_mqa is kv_down: the latent's rows, then the rotary key's; kv_b_proj is
kv_up: per head, nope_dim key rows then v_dim value rows).
"""
from __future__ import annotations

from ._config import Config
from ._spec import Spec, fmt
from .decoders import GLU_OF_ACT, Take


def deepseek_v2_spec(c: Config) -> Spec:
    c.require("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")
    layers, heads = c.get("num_hidden_layers"), c.get("num_attention_heads")
    dense = c.get("first_k_dense_replace", 0)
    if dense < layers:
        c.refuse("first_k_dense_replace", f"layers {dense}..{layers - 1} are mixture-of-experts (DeepseekV2Moe), "
                                          f"and evodsl has no MoE ffn yet",
                 f"first_k_dense_replace = {layers} imports the model with every layer dense")
    if c.get("num_key_value_heads", heads) != heads:
        c.refuse("num_key_value_heads", "MLA's keys and values come from one latent for every head: "
                                        "num_key_value_heads must equal num_attention_heads")
    act = c.get("hidden_act", "silu")
    if act not in GLU_OF_ACT:
        c.refuse("hidden_act", f"activation {act!r} has no gated FFN here", "ffn has swiglu (silu), geglu (gelu)")
    q_rank = c.get("q_lora_rank", 0) or 0
    bias = bool(c.get("attention_bias", False))
    if bias and not q_rank:
        c.refuse("attention_bias", "HF's uncompressed q_proj has no bias where mha(mla, bias=true) gives it one",
                 "attention_bias=false, or a q_lora_rank")
    if c.get("attention_dropout", 0.0):
        c.refuse("attention_dropout", "mha(mla) has no dropout on its attention weights", "attention_dropout=0")
    r = c.rope()
    if r["type"] != "default":
        c.refuse(f"{r['key']}.{'rope_type' if 'rope_type' in r else 'type'}",
                 f"rope scaling {r['type']!r} (and its softmax scale) has no pos(rope) form here",
                 "remove the rope scaling to import the model at its original context")
    s = Spec("deepseek_v2", "DeepseekV2ForCausalLM", c)
    s.bind(vocab=c.get("vocab_size"), d_model=c.get("hidden_size"), heads=heads, d_ff=c.get("intermediate_size"),
           layers=layers, eps=c.get("rms_norm_eps", 1e-6), kv_rank=c.get("kv_lora_rank"), q_rank=q_rank,
           rope_dim=c.get("qk_rope_head_dim"), nope_dim=c.get("qk_nope_head_dim"), v_dim=c.get("v_head_dim"))
    ffn = f"ffn({GLU_OF_ACT.get(act, 'swiglu')}, bias={fmt(bool(c.get('mlp_bias', False)))})"
    s.line(f"block = norm(rmsnorm) -> mha(mla, bias={fmt(bias)}) -> norm(rmsnorm) -> {ffn}")
    tied = c.get("tie_word_embeddings", False)
    s.model("causal=true", f"input(tokens) -> embed(token) -> pos(rope, base={fmt(r['theta'])}, pairs=interleaved)",
            f"norm(rmsnorm) -> head(lm, tied={fmt(tied)})")
    return s


def deepseek_v2_weights(c: Config) -> dict:
    tied = c.get("tie_word_embeddings", False)
    out = {"embed.weight": Take("model.embed_tokens.weight"), "norm.weight": Take("model.norm.weight"),
           "head.weight": Take("model.embed_tokens.weight" if tied else "lm_head.weight")}
    biased = [".weight", ".bias"] if c.get("attention_bias", False) else [".weight"]
    mlp = [".weight", ".bias"] if c.get("mlp_bias", False) else [".weight"]
    q = ({"q_down": ("q_a_proj", biased), "q_norm": ("q_a_layernorm", [".weight"]), "q_up": ("q_b_proj", [".weight"])}
         if c.get("q_lora_rank", 0) else {"q_proj": ("q_proj", [".weight"])})
    attn = {**q, "kv_down": ("kv_a_proj_with_mqa", biased), "kv_norm": ("kv_a_layernorm", [".weight"]),
            "kv_up": ("kv_b_proj", [".weight"]), "o_proj": ("o_proj", biased)}
    for i in range(c.get("num_hidden_layers")):
        h, e = f"model.layers.{i}.", f"blocks.{i}."
        out[e + "norm1.weight"] = Take(h + "input_layernorm.weight")
        out[e + "norm2.weight"] = Take(h + "post_attention_layernorm.weight")
        for ours, (theirs, parts) in attn.items():
            for part in parts:
                out[e + f"attn.{ours}{part}"] = Take(h + f"self_attn.{theirs}{part}")
        for name in ("gate_proj", "up_proj", "down_proj"):
            for part in mlp:
                out[e + f"ffn.{name}{part}"] = Take(h + f"mlp.{name}{part}")
    return out
