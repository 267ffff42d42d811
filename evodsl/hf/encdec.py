"""Encoder-decoders from HF configs: T5 (T5ForConditionalGeneration: v1.0's ReLU FFN and tied, rescaled head;
v1.1's gated-GELU FFN and untied head) and BART (BartForConditionalGeneration), as spec writers and weight maps.
The encoder and the decoder share one token embedding (HF's `shared`)."""
from __future__ import annotations

from ._config import Config
from ._spec import Spec
from .decoders import Take, mlp_act


def _stack_sizes(s: Spec, enc: dict, dec: dict) -> dict:
    """Bind the encoder's sizes by their usual names; the decoder's under decoder_* where they differ. Returns
    the decoder's names."""
    s.bind(**enc)
    names = {}
    for key, value in dec.items():
        if value == enc[key]:
            names[key] = key
        else:
            s.bind(**{f"decoder_{key}": value})
            names[key] = f"decoder_{key}"
    return names


# ----------------------------------------------------------------------------------------------- T5

def t5_spec(c: Config) -> Spec:
    c.require("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")
    proj = c.get("feed_forward_proj", "relu")
    ffn = {"relu": "ffn(mlp, act=relu, bias=false)", "gated-gelu": "ffn(geglu_tanh, bias=false)",
           "gated-relu": "ffn(reglu, bias=false)", "gated-silu": "ffn(swiglu, bias=false)"}.get(proj)
    if ffn is None:
        c.refuse("feed_forward_proj", f"T5 FFN {proj!r} has no evodsl form",
                 "relu, gated-gelu, gated-relu and gated-silu are imported")
    d, heads = c.get("d_model"), c.get("num_heads")
    s = Spec("t5", "T5ForConditionalGeneration", c)
    s.bind(vocab=c.get("vocab_size"), d_model=d, heads=heads)
    if c.get("d_kv") * heads != d:
        s.bind(head_dim=c.get("d_kv"))
    layers = c.get("num_layers")
    s.bind(d_ff=c.get("d_ff"), layers=layers)
    dec_layers = c.get("num_decoder_layers", None) or layers
    if dec_layers != layers:
        s.bind(decoder_layers=dec_layers)
    s.bind(buckets=c.get("relative_attention_num_buckets", 32),
           max_distance=c.get("relative_attention_max_distance", 128), p_drop=c.get("dropout_rate", 0.1))
    eps = c.get("layer_norm_epsilon", 1e-6)
    s.line(f"ln   = norm(rmsnorm, eps={eps!r})\nattn = mha(softmax, bias=false, scale=1.0, dropout=p_drop)\n"
           f"ff   = {ffn}\n\n"
           "encoder_layer = residual(ln -> attn -> dropout(p=p_drop))\n"
           "             -> residual(ln -> ff -> dropout(p=p_drop))\n\n"
           "decoder_layer = residual(ln -> attn -> dropout(p=p_drop))\n"
           "             -> residual(ln -> xattn(softmax, kv=encoder, bias=false, scale=1.0, dropout=p_drop)"
           " -> dropout(p=p_drop))\n"
           "             -> residual(ln -> ff -> dropout(p=p_drop))")
    # T5 v1.0 ties the head and scales the decoder's output by d^-1/2 first; v1.1's config.json says
    # tie_word_embeddings=false for an untied head without the scaling (transformers 5 writes the scaling as
    # scale_decoder_outputs and always ties)
    tied = c.get("tie_word_embeddings", True)
    rescale = c.get("scale_decoder_outputs", tied)
    head = f"head(lm, tied={'true' if tied else 'false'}{', rescale=true' if rescale else ''})"
    pos = "pos(t5_bias, buckets=buckets, max_distance=max_distance)"
    s.body = ("model t5 {\n"
              f"    encoder = input(tokens) -> embed(token) -> {pos} -> dropout(p=p_drop)\n"
              "        -> repeat(encoder_layer, layers) -> ln -> dropout(p=p_drop)\n"
              f"    decoder(causal=true) = input(tokens) -> embed(token, tied=true) -> {pos}\n"
              "        -> dropout(p=p_drop)\n"
              f"        -> repeat(decoder_layer, {'decoder_layers' if dec_layers != layers else 'layers'})"
              " -> ln -> dropout(p=p_drop)\n"
              f"        -> {head}\n}}\n")
    return s


def t5_weights(c: Config) -> dict:
    gated = c.get("feed_forward_proj", "relu").startswith("gated")
    out = {"encoder_embed.weight": Take("shared.weight"), "decoder_embed.weight": Take("shared.weight"),
           "decoder_head.weight": Take("shared.weight" if c.get("tie_word_embeddings", True) else "lm_head.weight")}
    layers = c.get("num_layers")
    for stack, n in (("encoder", layers), ("decoder", c.get("num_decoder_layers", None) or layers)):
        out[f"{stack}_pos.weight"] = Take(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
        out[f"{stack}_norm.weight"] = Take(f"{stack}.final_layer_norm.weight")
        for i in range(n):
            hb, ob = f"{stack}.block.{i}.layer", f"{stack}_blocks.{i}"
            parts = [("attn", "SelfAttention")] + ([("xattn", "EncDecAttention")] if stack == "decoder" else [])
            for k, (ours, theirs) in enumerate(parts):
                for x in "qkvo":
                    out[f"{ob}.{ours}.{x}_proj.weight"] = Take(f"{hb}.{k}.{theirs}.{x}.weight")
                out[f"{ob}.norm{k + 1}.weight"] = Take(f"{hb}.{k}.layer_norm.weight")
            f = len(parts)
            ff = f"{hb}.{f}.DenseReluDense"
            if gated:
                out[f"{ob}.ffn.gate_proj.weight"] = Take(f"{ff}.wi_0.weight")
                out[f"{ob}.ffn.up_proj.weight"] = Take(f"{ff}.wi_1.weight")
            else:
                out[f"{ob}.ffn.up_proj.weight"] = Take(f"{ff}.wi.weight")
            out[f"{ob}.ffn.down_proj.weight"] = Take(f"{ff}.wo.weight")
            out[f"{ob}.norm{f + 1}.weight"] = Take(f"{hb}.{f}.layer_norm.weight")
    return out


# ----------------------------------------------------------------------------------------------- BART

def bart_spec(c: Config) -> Spec:
    c.require("vocab_size", "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
              "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim")
    act = mlp_act(c, "activation_function", "gelu")
    for key in ("normalize_before", "add_final_layer_norm"):  # mBART's pre-norm layout, not BART's
        if c.get(key, False):
            c.refuse(key, f"{key}=true (mBART's pre-norm layout) is not imported as BART", "use model_type mbart")
    s = Spec("bart", "BartForConditionalGeneration", c)
    s.bind(vocab=c.get("vocab_size"), n_ctx=c.get("max_position_embeddings", 1024), d_model=c.get("d_model"))
    dec = _stack_sizes(s, dict(heads=c.get("encoder_attention_heads"), d_ff=c.get("encoder_ffn_dim"),
                               layers=c.get("encoder_layers")),
                       dict(heads=c.get("decoder_attention_heads"), d_ff=c.get("decoder_ffn_dim"),
                            layers=c.get("decoder_layers")))
    s.bind(p_drop=c.get("dropout", 0.1), p_attn=c.get("attention_dropout", 0.0), p_act=c.get("activation_dropout", 0.0),
           eps=1e-5)
    ff = lambda d_ff: f"ffn(mlp, act={act}, d_ff={d_ff})"  # noqa: E731
    s.line(f"encoder_layer = residual(mha(softmax, dropout=p_attn) -> dropout(p=p_drop)) -> norm\n"
           f"             -> residual({ff('d_ff')} -> dropout(p=p_drop)) -> norm\n\n"
           f"decoder_layer = residual(mha(softmax, heads={dec['heads']}, dropout=p_attn) -> dropout(p=p_drop)) -> norm\n"
           f"             -> residual(xattn(softmax, kv=encoder, heads={dec['heads']}, dropout=p_attn) -> dropout(p=p_drop))"
           " -> norm\n"
           f"             -> residual({ff(dec['d_ff'])} -> dropout(p=p_drop)) -> norm")
    if c.get("activation_dropout", 0.0):
        c.refuse("activation_dropout", "dropout inside the FFN (activation_dropout) has no ffn(mlp) parameter",
                 "set activation_dropout=0 (it changes training only)")
    scale = ", scale=true" if c.get("scale_embedding", False) else ""  # x sqrt(d_model)
    pos = "pos(learned, max_len=n_ctx, offset=2)"  # BART's learned positions start at row 2
    s.body = ("model bart {\n"
              f"    encoder = input(tokens) -> embed(token{scale}) -> {pos} -> norm -> dropout(p=p_drop)\n"
              "        -> repeat(encoder_layer, layers)\n"
              f"    decoder(causal=true) = input(tokens) -> embed(token{scale}, tied=true) -> {pos}\n"
              "        -> norm -> dropout(p=p_drop)\n"
              f"        -> repeat(decoder_layer, {dec['layers']})\n"
              f"        -> head(lm, tied={'true' if c.get('tie_word_embeddings', True) else 'false'})\n}}\n")
    return s


def bart_weights(c: Config) -> dict:
    tied = c.get("tie_word_embeddings", True)
    out = {"decoder_head.weight": Take("model.shared.weight" if tied else "lm_head.weight")}
    for stack in ("encoder", "decoder"):
        hs = f"model.{stack}"
        out[f"{stack}_embed.weight"] = Take("model.shared.weight")
        out[f"{stack}_pos.weight"] = Take(f"{hs}.embed_positions.weight")
        for t in ("weight", "bias"):
            out[f"{stack}_norm.{t}"] = Take(f"{hs}.layernorm_embedding.{t}")
        for i in range(c.get(f"{stack}_layers")):
            hb, ob = f"{hs}.layers.{i}", f"{stack}_blocks.{i}"
            atts = [("attn", "self_attn")] + ([("xattn", "encoder_attn")] if stack == "decoder" else [])
            norms = ["self_attn_layer_norm"] + (["encoder_attn_layer_norm"] if stack == "decoder" else []) + [
                "final_layer_norm"]
            for t in ("weight", "bias"):
                for ours, theirs in atts:
                    for x in "qkv":
                        out[f"{ob}.{ours}.{x}_proj.{t}"] = Take(f"{hb}.{theirs}.{x}_proj.{t}")
                    out[f"{ob}.{ours}.o_proj.{t}"] = Take(f"{hb}.{theirs}.out_proj.{t}")
                for k, name in enumerate(norms):
                    out[f"{ob}.norm{k + 1}.{t}"] = Take(f"{hb}.{name}.{t}")
                out[f"{ob}.ffn.up_proj.{t}"] = Take(f"{hb}.fc1.{t}")
                out[f"{ob}.ffn.down_proj.{t}"] = Take(f"{hb}.fc2.{t}")
    return out
