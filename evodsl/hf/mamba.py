"""Mamba from HF configs (MambaForCausalLM): pre-norm residual blocks of RMSNorm and the selective SSM, a final
RMSNorm and the LM head (tied by default), as a spec writer and a weight map. HF's MambaMixer is ssm(mamba) with
E = intermediate_size (expand d), N = state_size, k = conv_kernel, R = time_step_rank; its weights load as they
are (the same names inside the mixer). residual_in_fp32 changes nothing in a float32 model and is not written."""
from __future__ import annotations

import math

from ._config import Config
from ._spec import Spec, fmt
from .decoders import Take


def mamba_spec(c: Config) -> Spec:
    c.require("vocab_size", "hidden_size", "num_hidden_layers")
    d = c.get("hidden_size")
    expand = c.get("expand", 2)
    if c.get("intermediate_size", expand * d) != expand * d:
        c.refuse("intermediate_size", f"intermediate_size {c.get('intermediate_size')} is not expand x hidden_size "
                 f"({expand * d})", "ssm(mamba) is expand d wide: set intermediate_size = expand * hidden_size")
    if c.get("hidden_act", "silu") != "silu":
        c.refuse("hidden_act", f"activation {c.get('hidden_act')!r}: ssm(mamba) gates with silu", "hidden_act=silu")
    rank = c.get("time_step_rank", "auto")
    rank = math.ceil(d / 16) if rank == "auto" else rank
    s = Spec("mamba", "MambaForCausalLM", c)
    s.bind(vocab=c.get("vocab_size"), d_model=d, layers=c.get("num_hidden_layers"), d_state=c.get("state_size", 16),
           expand=expand, d_conv=c.get("conv_kernel", 4), dt_rank=rank, eps=c.get("layer_norm_epsilon", 1e-5))
    bias, conv_bias = fmt(bool(c.get("use_bias", False))), fmt(bool(c.get("use_conv_bias", True)))
    s.line("block = norm(rmsnorm, eps=eps)\n"
           f"     -> ssm(mamba, N=d_state, expand=expand, conv=d_conv, dt_rank=dt_rank, bias={bias}, conv_bias={conv_bias})")
    tied = c.get("tie_word_embeddings", True)
    s.model("causal=true", "input(tokens) -> embed(token)", f"norm(rmsnorm, eps=eps) -> head(lm, tied={fmt(tied)})")
    return s


def mamba_weights(c: Config) -> dict:
    tied = c.get("tie_word_embeddings", True)
    out = {"embed.weight": Take("backbone.embeddings.weight"), "norm.weight": Take("backbone.norm_f.weight"),
           "head.weight": Take("backbone.embeddings.weight" if tied else "lm_head.weight")}
    names = ["A_log", "D", "in_proj.weight", "conv1d.weight", "x_proj.weight", "dt_proj.weight", "dt_proj.bias",
             "out_proj.weight"]
    names += ["conv1d.bias"] if c.get("use_conv_bias", True) else []
    names += ["in_proj.bias", "out_proj.bias"] if c.get("use_bias", False) else []
    for i in range(c.get("num_hidden_layers")):
        h, e = f"backbone.layers.{i}.", f"blocks.{i}."
        out[e + "norm.weight"] = Take(h + "norm.weight")
        for name in names:
            out[e + "ssm." + name] = Take(h + "mixer." + name)
    return out
