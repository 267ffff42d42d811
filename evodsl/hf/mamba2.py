"""Mamba-2 from HF configs (Mamba2ForCausalLM): pre-norm residual blocks of RMSNorm and the SSD layer, a final
RMSNorm and the LM head, as a spec writer and a weight map. HF's Mamba2Mixer is ssm(mamba2) with E = expand d,
H = num_heads of head_dim (H head_dim = E), G = n_groups, N = state_size, k = conv_kernel; its in_proj holds
[z, xBC, dt] in our order, and its weights load as they are (the gated norm's gain is our norm_weight)."""
from __future__ import annotations

import math

from ._config import Config
from ._spec import Spec, fmt
from .decoders import Take


def mamba2_spec(c: Config) -> Spec:
    c.require("vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "head_dim")
    d, H, P, expand = c.get("hidden_size"), c.get("num_heads"), c.get("head_dim"), c.get("expand", 2)
    if H * P != expand * d:
        c.refuse("num_heads", f"num_heads x head_dim = {H * P} is not expand x hidden_size ({expand * d})",
                 "ssm(mamba2)'s heads split E = expand d channels: set head_dim = expand * hidden_size / num_heads")
    if c.get("hidden_act", "silu") != "silu":
        c.refuse("hidden_act", f"activation {c.get('hidden_act')!r}: ssm(mamba2) gates with silu", "hidden_act=silu")
    limit = c.get("time_step_limit", [0.0, math.inf])
    if list(limit) != [0.0, math.inf]:
        c.refuse("time_step_limit", f"time_step_limit {list(limit)}: dt is not clamped here", "[0.0, inf]")
    s = Spec("mamba2", "Mamba2ForCausalLM", c)
    s.bind(vocab=c.get("vocab_size"), d_model=d, layers=c.get("num_hidden_layers"), d_state=c.get("state_size", 128),
           expand=expand, heads=H, groups=c.get("n_groups", 1), d_conv=c.get("conv_kernel", 4),
           chunk=c.get("chunk_size", 256), eps=c.get("layer_norm_epsilon", 1e-5))
    bias, conv_bias = fmt(bool(c.get("use_bias", False))), fmt(bool(c.get("use_conv_bias", True)))
    s.line("block = norm(rmsnorm, eps=eps)\n"
           "     -> ssm(mamba2, N=d_state, expand=expand, heads=heads, groups=groups, conv=d_conv, chunk=chunk, "
           f"eps=eps, bias={bias}, conv_bias={conv_bias})")
    tied = c.get("tie_word_embeddings", False)
    s.model("causal=true", "input(tokens) -> embed(token)", f"norm(rmsnorm, eps=eps) -> head(lm, tied={fmt(tied)})")
    return s


def mamba2_weights(c: Config) -> dict:
    tied = c.get("tie_word_embeddings", False)
    out = {"embed.weight": Take("backbone.embeddings.weight"), "norm.weight": Take("backbone.norm_f.weight"),
           "head.weight": Take("backbone.embeddings.weight" if tied else "lm_head.weight")}
    names = {"A_log": "A_log", "D": "D", "dt_bias": "dt_bias", "norm_weight": "norm.weight",
             "in_proj.weight": "in_proj.weight", "conv1d.weight": "conv1d.weight", "out_proj.weight": "out_proj.weight"}
    if c.get("use_conv_bias", True):
        names["conv1d.bias"] = "conv1d.bias"
    if c.get("use_bias", False):
        names.update({"in_proj.bias": "in_proj.bias", "out_proj.bias": "out_proj.bias"})
    for i in range(c.get("num_hidden_layers")):
        h, e = f"backbone.layers.{i}.", f"blocks.{i}."
        out[e + "norm.weight"] = Take(h + "norm.weight")
        for ours, theirs in names.items():
            out[e + "ssm." + ours] = Take(h + "mixer." + theirs)
    return out
