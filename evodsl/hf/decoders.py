"""Causal LMs from HF configs: GPT-2 (GPT2LMHeadModel) and the LLaMA family (LlamaForCausalLM: LLaMA 1-3,
Mistral, Gemma, Phi-3), each as a spec writer and a weight map.

A weight map lists, for each evodsl tensor, the HF tensors it is made of and how (`Take`: as it is, transposed,
or a row slice of a fused matrix), so that `load_hf` can name every missing, unexpected or mis-shaped tensor.
The LLaMA family rotates q and k in halves (HF's rotate_half), so its imports say `pos(rope, pairs=halves)` and
the q/k weights load unpermuted.
"""
from __future__ import annotations

from dataclasses import dataclass

from ._config import Config
from ._spec import Spec, fmt


@dataclass(frozen=True)
class Take:
    """evodsl tensor <- HF tensor `hf`, transposed if `t`, rows [start, stop) if `rows` (a fused matrix)."""

    hf: str
    t: bool = False
    rows: tuple[int, int] | None = None
    part: tuple[int, int, int] | None = None  # (heads, parts, i): slice i of each head's `parts` equal slices of
    #                                          rows, a matrix fused per head (BLOOM's query_key_value, DeBERTa's in_proj)


# ----------------------------------------------------------------------------------------------- GPT-2

MLP_ACT = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu",
           "silu": "silu", "swish": "silu"}  # HF's activation names -> ffn(mlp, act=...)


def mlp_act(c: Config, key: str, default: str) -> str:
    """ffn(mlp)'s act= for the HF activation at `key`; an activation it does not have is refused."""
    act = c.get(key, default)
    if act not in MLP_ACT:
        c.refuse(key, f"activation {act!r} has no ffn(mlp, act=...)",
                 "ffn(mlp) has act=" + ", ".join(sorted(set(MLP_ACT.values()))))
    return MLP_ACT.get(act, MLP_ACT[default])


def gpt2_spec(c: Config) -> Spec:
    c.require("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
    act = mlp_act(c, "activation_function", "gelu_new")
    for key, why in (("scale_attn_by_inverse_layer_idx", "scores scaled by 1 / (layer + 1)"),
                     ("add_cross_attention", "cross-attention in a decoder-only model")):
        if c.get(key, False):
            c.refuse(key, f"{key}=true ({why}) has no evodsl form", "remove it, or write the spec by hand")
    if not c.get("scale_attn_weights", True):
        c.refuse("scale_attn_weights", "unscaled attention scores (scale_attn_weights=false)",
                 "mha(softmax, scale=1.0) is that model: write the spec by hand")
    d = c.get("n_embd")
    s = Spec("gpt2", "GPT2LMHeadModel", c)
    s.bind(vocab=c.get("vocab_size"), n_ctx=c.get("n_positions"), d_model=d, heads=c.get("n_head"),
           d_ff=c.get("n_inner", None) or 4 * d, layers=c.get("n_layer"), eps=c.get("layer_norm_epsilon", 1e-5),
           p_attn=c.get("attn_pdrop", 0.1), p_resid=c.get("resid_pdrop", 0.1), p_embd=c.get("embd_pdrop", 0.1))
    s.line(f"block = residual(norm -> mha(softmax, dropout=p_attn) -> dropout(p=p_resid))\n"
           f"     -> residual(norm -> ffn(mlp, act={act}) -> dropout(p=p_resid))")
    tied = c.get("tie_word_embeddings", True)
    s.model("causal=true", "input(tokens) -> embed(token) -> pos(learned, max_len=n_ctx) -> dropout(p=p_embd)",
            f"norm -> head(lm, tied={fmt(tied)})")
    return s


def gpt2_weights(c: Config) -> dict:
    d, tied = c.get("n_embd"), c.get("tie_word_embeddings", True)
    prefix = "transformer."
    out = {"embed.weight": Take(prefix + "wte.weight"), "pos.weight": Take(prefix + "wpe.weight"),
           "norm.weight": Take(prefix + "ln_f.weight"), "norm.bias": Take(prefix + "ln_f.bias"),
           "head.weight": Take(prefix + "wte.weight" if tied else "lm_head.weight")}
    for i in range(c.get("n_layer")):
        h, e = f"{prefix}h.{i}.", f"blocks.{i}."
        for j, name in enumerate("qkv"):  # c_attn: a Conv1D [d, 3d] holding q, k, v side by side
            out[e + f"attn.{name}_proj.weight"] = Take(h + "attn.c_attn.weight", t=True, rows=(j * d, (j + 1) * d))
            out[e + f"attn.{name}_proj.bias"] = Take(h + "attn.c_attn.bias", rows=(j * d, (j + 1) * d))
        for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
            out[e + ours + ".weight"], out[e + ours + ".bias"] = Take(h + theirs + ".weight"), Take(h + theirs + ".bias")
        for ours, theirs in (("attn.o_proj", "attn.c_proj"), ("ffn.up_proj", "mlp.c_fc"), ("ffn.down_proj", "mlp.c_proj")):
            out[e + ours + ".weight"] = Take(h + theirs + ".weight", t=True)  # Conv1D stores W as [in, out]
            out[e + ours + ".bias"] = Take(h + theirs + ".bias")
    return out


# ----------------------------------------------------------------------------------------------- LLaMA family

HF_CLASS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "gemma": "GemmaForCausalLM",
            "phi3": "Phi3ForCausalLM"}
GLU_OF_ACT = {"silu": "swiglu", "swish": "swiglu", "gelu_pytorch_tanh": "geglu_tanh", "gelu_tanh": "geglu_tanh",
              "gelu_new": "geglu_tanh", "gelu": "geglu", "relu": "reglu", "sigmoid": "glu"}


def _rope(c: Config) -> str:
    r = c.rope()
    args = [f"base={fmt(r['theta'])}", "pairs=halves"]
    if r["fraction"] != 1.0:
        args.append(f"fraction={fmt(r['fraction'])}")
    if r["type"] == "linear":
        args += ["scaling=linear", f"factor={fmt(float(r['factor']))}"]
    elif r["type"] == "llama3":
        args += ["scaling=llama3", f"factor={fmt(float(r['factor']))}",
                 f"low_freq_factor={fmt(float(r['low_freq_factor']))}",
                 f"high_freq_factor={fmt(float(r['high_freq_factor']))}",
                 f"original_max_len={int(r['original_max_position_embeddings'])}"]
    elif r["type"] == "dynamic":  # HF's dynamic NTK grows the base past max_position_embeddings
        args += ["scaling=dynamic_ntk", f"factor={fmt(float(r['factor']))}",
                 f"original_max_len={int(c.get('max_position_embeddings'))}"]
    elif r["type"] == "yarn":
        args += _yarn(c, r)
    elif r["type"] != "default":
        c.refuse(f"{r['key']}.{'rope_type' if 'rope_type' in r else 'type'}",
                 f"rope scaling {r['type']!r} has no pos(rope) form",
                 "pos(rope) has scaling=linear, llama3, dynamic_ntk (HF's dynamic) and yarn; LongRoPE is not built")
    return "pos(rope, " + ", ".join(args) + ")"


def _yarn(c: Config, r: dict) -> list[str]:
    """HF's yarn keys as pos(rope, scaling=yarn) arguments; DeepSeek's mscale pair has no form here."""
    for key in ("mscale", "mscale_all_dim"):
        if r.get(key):
            c.refuse(f"{r['key']}.{key}", f"yarn's {key} has no pos(rope) form",
                     "pos(rope, scaling=yarn) takes attention_factor= (the factor on cos and sin)")
    original = int(r.get("original_max_position_embeddings") or c.get("max_position_embeddings"))
    factor = r.get("factor") or c.get("max_position_embeddings") / original
    args = ["scaling=yarn", f"factor={fmt(float(factor))}", f"original_max_len={original}"]
    for key in ("beta_fast", "beta_slow", "attention_factor"):
        if r.get(key) is not None:
            args.append(f"{key}={fmt(float(r[key]))}")
    if r.get("truncate") is False:
        args.append("truncate=false")
    return args


def llama_spec(c: Config) -> Spec:
    c.require("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    kind = c.model_type
    d, heads = c.get("hidden_size"), c.get("num_attention_heads")
    act = c.first(("hidden_activation", "hidden_act"), "silu")
    if act not in GLU_OF_ACT:
        c.refuse("hidden_act", f"activation {act!r} has no gated FFN here",
                 "ffn has swiglu (silu), geglu (gelu), geglu_tanh (gelu_pytorch_tanh), reglu (relu), glu (sigmoid)")
    s = Spec(kind, HF_CLASS.get(kind, "LlamaForCausalLM"), c)
    s.bind(vocab=c.get("vocab_size"), d_model=d, heads=heads, kv_heads=c.get("num_key_value_heads", heads))
    head_dim = c.get("head_dim", d // heads) or d // heads
    if head_dim * heads != d:
        s.bind(head_dim=head_dim)
    s.bind(d_ff=c.get("intermediate_size"), layers=c.get("num_hidden_layers"), eps=c.get("rms_norm_eps", 1e-6))
    window = c.get("sliding_window", None) if kind in ("mistral", "phi3") else None
    p_attn = c.get("attention_dropout", 0.0)
    mha = f"mha(local, window={window}" if window else "mha(softmax"
    mha += f", bias={fmt(bool(c.get('attention_bias', False)))}" + (f", dropout={fmt(p_attn)}" if p_attn else "") + ")"
    ffn = f"ffn({GLU_OF_ACT.get(act, 'swiglu')}, bias={fmt(bool(c.get('mlp_bias', False)))})"
    norm = "norm(rmsnorm, offset=1)" if kind == "gemma" else "norm(rmsnorm)"
    p_resid, p_embd = c.get("resid_pdrop", 0.0), c.get("embd_pdrop", 0.0)
    if p_resid:
        s.bind(p_resid=p_resid)
        s.line(f"block = residual({norm} -> {mha} -> dropout(p=p_resid))\n"
               f"     -> residual({norm} -> {ffn} -> dropout(p=p_resid))")
    else:
        s.line(f"block = {norm} -> {mha} -> {norm} -> {ffn}")
    embed = "embed(token, scale=true)" if kind == "gemma" else "embed(token)"  # Gemma: x sqrt(d_model)
    embed += f" -> dropout(p={fmt(p_embd)})" if p_embd else ""
    tied = c.get("tie_word_embeddings", kind == "gemma")
    s.model("causal=true", f"input(tokens) -> {embed} -> {_rope(c)}", f"{norm} -> head(lm, tied={fmt(tied)})")
    return s


def llama_weights(c: Config) -> dict:
    d, heads = c.get("hidden_size"), c.get("num_attention_heads")
    kv, hd = c.get("num_key_value_heads", heads), c.get("head_dim", d // heads) or d // heads
    ff, fused = c.get("intermediate_size"), c.model_type == "phi3"
    tied = c.get("tie_word_embeddings", c.model_type == "gemma")
    out = {"embed.weight": Take("model.embed_tokens.weight"), "norm.weight": Take("model.norm.weight"),
           "head.weight": Take("model.embed_tokens.weight" if tied else "lm_head.weight")}
    biased = [".weight", ".bias"] if c.get("attention_bias", False) else [".weight"]
    for i in range(c.get("num_hidden_layers")):
        h, e = f"model.layers.{i}.", f"blocks.{i}."
        out[e + "norm1.weight"] = Take(h + "input_layernorm.weight")
        out[e + "norm2.weight"] = Take(h + "post_attention_layernorm.weight")
        bounds = {"q": (0, heads * hd), "k": (heads * hd, (heads + kv) * hd), "v": ((heads + kv) * hd, (heads + 2 * kv) * hd)}
        for x in "qkvo":
            for part in biased:
                if fused and x != "o":  # Phi-3: one qkv_proj [(h + 2 kv) dh, d]
                    out[e + f"attn.{x}_proj{part}"] = Take(h + f"self_attn.qkv_proj{part}", rows=bounds[x])
                else:
                    out[e + f"attn.{x}_proj{part}"] = Take(h + f"self_attn.{x}_proj{part}")
        mlp = [".weight", ".bias"] if c.get("mlp_bias", False) else [".weight"]
        for part in mlp:
            if fused:  # Phi-3: gate_up_proj [2 ff, d], the gate first
                out[e + f"ffn.gate_proj{part}"] = Take(h + f"mlp.gate_up_proj{part}", rows=(0, ff))
                out[e + f"ffn.up_proj{part}"] = Take(h + f"mlp.gate_up_proj{part}", rows=(ff, 2 * ff))
            else:
                out[e + f"ffn.gate_proj{part}"] = Take(h + f"mlp.gate_proj{part}")
                out[e + f"ffn.up_proj{part}"] = Take(h + f"mlp.up_proj{part}")
            out[e + f"ffn.down_proj{part}"] = Take(h + f"mlp.down_proj{part}")
    return out
