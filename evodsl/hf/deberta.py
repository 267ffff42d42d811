"""DeBERTa (v1) from HF configs (DebertaModel: a post-norm encoder with disentangled attention), as a spec writer
and a weight map. in_proj is fused per head as (q, k, v) with no bias: q_bias and v_bias load q_proj's and v_proj's
(pos(deberta) drops k_proj's); the relative embeddings are pos(deberta)'s table."""
from __future__ import annotations

from ._config import Config
from ._spec import Spec
from .decoders import Take, mlp_act


def _pos_att_type(c: Config) -> list:
    kind = c.get("pos_att_type", None) or []
    return [t.strip() for t in kind.split("|")] if isinstance(kind, str) else list(kind)


def _terms(c: Config):
    """pos(deberta)'s terms= for the config's pos_att_type, or None where it has none."""
    return {("c2p", "p2c"): "both", ("c2p",): "c2p", ("p2c",): "p2c"}.get(tuple(sorted(set(_pos_att_type(c)))))


def deberta_spec(c: Config) -> Spec:
    c.require("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    act = mlp_act(c, "hidden_act", "gelu")
    relative = c.get("relative_attention", False)
    if not relative:
        c.refuse("relative_attention", "DeBERTa without relative attention still has no key bias, which only "
                 "pos(deberta) takes from mha(softmax)", "relative_attention=true (deberta-base's)")
    if relative and _terms(c) is None:
        c.refuse("pos_att_type", f"pos_att_type {_pos_att_type(c)} has no evodsl form: pos(deberta) adds c2p, p2c "
                 "or both", "pos_att_type=[\"c2p\", \"p2c\"] (deberta-base's)")
    for key in ("talking_head", "type_vocab_size"):
        if c.get(key, 0):
            c.refuse(key, f"DeBERTa's {key} is not imported", f"{key}=0 (deberta-base's)")
    if c.get("embedding_size", c.get("hidden_size")) != c.get("hidden_size"):
        c.refuse("embedding_size", "an embedding narrower than the model (embed_proj) is not imported",
                 "embedding_size = hidden_size")
    n_ctx = c.get("max_position_embeddings", 512)
    k = c.get("max_relative_positions", -1)
    s = Spec("deberta", "DebertaModel", c)
    s.bind(vocab=c.get("vocab_size"), n_ctx=n_ctx, d_model=c.get("hidden_size"), heads=c.get("num_attention_heads"),
           d_ff=c.get("intermediate_size"), layers=c.get("num_hidden_layers"), k=k if k >= 1 else n_ctx,
           eps=c.get("layer_norm_eps", 1e-7), p_drop=c.get("hidden_dropout_prob", 0.1),
           p_attn=c.get("attention_probs_dropout_prob", 0.1))
    s.line("block = residual(mha(softmax, dropout=p_attn) -> dropout(p=p_drop)) -> norm\n"
           f"     -> residual(ffn(mlp, act={act}) -> dropout(p=p_drop)) -> norm")
    absolute = " -> pos(learned, max_len=n_ctx)" if c.get("position_biased_input", True) else ""
    terms = "" if _terms(c) in (None, "both") else f", terms={_terms(c)}"
    relative_pos = f" -> pos(deberta, k=k{terms})" if relative else ""
    # no head: the last hidden state (DebertaModel)
    s.body = ("model deberta(causal=false) =\n"
              f"    input(tokens) -> embed(token){absolute} -> norm -> dropout(p=p_drop){relative_pos}\n"
              "    -> repeat(block, layers)\n")
    return s


def deberta_weights(c: Config) -> dict:
    heads = c.get("num_attention_heads")
    out = {"embed.weight": Take("embeddings.word_embeddings.weight"),
           "norm.weight": Take("embeddings.LayerNorm.weight"), "norm.bias": Take("embeddings.LayerNorm.bias")}
    absolute, relative = c.get("position_biased_input", True), c.get("relative_attention", False)
    both = absolute and relative  # two pos nodes: pos1 (learned), pos2 (deberta)
    if absolute:
        out["pos1.weight" if both else "pos.weight"] = Take("embeddings.position_embeddings.weight")
    if relative:
        out["pos2.weight" if both else "pos.weight"] = Take("encoder.rel_embeddings.weight")
    for i in range(c.get("num_hidden_layers")):
        h, e = f"encoder.layer.{i}.", f"blocks.{i}."
        for j, name in enumerate("qkv"):
            out[e + f"attn.{name}_proj.weight"] = Take(h + "attention.self.in_proj.weight", part=(heads, 3, j))
        out[e + "attn.q_proj.bias"] = Take(h + "attention.self.q_bias")
        out[e + "attn.v_proj.bias"] = Take(h + "attention.self.v_bias")
        layers = [("attn.o_proj", "attention.output.dense"), ("norm1", "attention.output.LayerNorm"),
                  ("ffn.up_proj", "intermediate.dense"), ("ffn.down_proj", "output.dense"), ("norm2", "output.LayerNorm")]
        if relative and _terms(c) in ("both", "p2c"):
            layers.append(("attn.pos.pos_q_proj", "attention.self.pos_q_proj"))
        if relative and _terms(c) in ("both", "c2p"):
            out[e + "attn.pos.pos_proj.weight"] = Take(h + "attention.self.pos_proj.weight")
        for ours, theirs in layers:
            for part in (".weight", ".bias"):
                out[e + ours + part] = Take(h + theirs + part)
    return out
