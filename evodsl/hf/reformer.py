"""Reformer (ReformerModelWithLMHead, is_decoder=true; ReformerForMaskedLM, the same stack bidirectional; Kitaev et
al. 2020, arXiv:2001.04451) from an HF config: a spec writer and a weight map.

HF's model, as the spec writes it:
  - embeddings: the token table, dropout, then axial positions (pos(axial): axial_pos_shape, axial_pos_embds_dim,
    its dropout) or a learned table (axial_pos_embds=false);
  - a reversible stack (repeat(..., reversible=true)): HF concatenates [x, x] and each ReformerLayer computes
    Y1 = X1 + Attention(X2), Y2 = X2 + FeedForward(Y1); attention = LayerNorm -> self-attention -> dense (no bias)
    -> dropout, feed-forward = LayerNorm -> dense -> act -> dense -> dropout (HF drops after the first dense too;
    the same in eval); attn_layers picks each layer's attention: "local" is mha(chunk, before=, after=,
    wrap=true) (LocalSelfAttention), "lsh" mha(lsh, form=hf) (LSHSelfAttention); the body is the shortest
    period of attn_layers (local, lsh alternating: a body of two layers), repeated;
  - LayerNorm over 2d, dropout, and the LM head Linear(2d, vocab) with its bias (untied).
Buckets: num_buckets as given; null (HF picks them from each input's length) is written as HF's choice at
max_position_embeddings, and a factorised list of several is refused. hash_seed seeds the rotations as HF's
(null: HF draws new ones at every call, nothing to import; seed 0 is written). chunk_size_feed_forward and
chunk_size_lm_head chunk the same math (not imported: no memory option here). HF pads an input to a multiple of
its chunk lengths; each attention here pads its own (equal when both chunk lengths are the same, or the input a
multiple of them). tie_word_embeddings (a [V, d] table for a 2d-wide head) is refused. HF's lm_head.bias is a
parameter its forward never reads (transformers 5: the decoder Linear has its own bias): not imported, so the
spec counts HF's parameters less the vocabulary size.
"""
from __future__ import annotations

from ._config import Config
from ._spec import Spec, fmt
from .decoders import Take, mlp_act


def period(types: list) -> int:
    """The shortest p with types[i] = types[i % p] for all i, p dividing len(types)."""
    return next(p for p in range(1, len(types) + 1) if len(types) % p == 0 and types == types[:p] * (len(types) // p))


def hf_buckets(c: Config):
    """num_buckets, or HF's choice at max_position_embeddings when it is null (LSHSelfAttention._set_num_buckets)."""
    b = c.get("num_buckets", None)
    if isinstance(b, list):
        if len(b) != 1:
            c.refuse("num_buckets", "factorised buckets (a list of several) have no mha(lsh) form",
                     "one number of buckets, e.g. num_buckets=64")
            return 2
        return b[0]
    if b is not None:
        return b
    n, m = c.get("max_position_embeddings", 4096), c.get("lsh_attn_chunk_length", 64)
    pow2 = (2 * (n // m)).bit_length() - 1
    if 2 ** pow2 > 2 * max(int((n // m) ** 0.5), m):
        c.refuse("num_buckets", "num_buckets=null: HF would factorise them at this length", "set num_buckets")
    return 2 ** pow2


def reformer_spec(c: Config) -> Spec:
    c.require("vocab_size", "hidden_size", "num_attention_heads", "attention_head_size", "feed_forward_size",
              "attn_layers")
    d, heads, dh = c.get("hidden_size"), c.get("num_attention_heads"), c.get("attention_head_size")
    types = list(c.get("attn_layers"))
    if not types or set(types) - {"local", "lsh"}:
        c.refuse("attn_layers", f"attention layers {types}: Reformer's are 'local' and 'lsh'", "use local and lsh")
        c.raise_if_any()
    if c.get("tie_word_embeddings", False):
        c.refuse("tie_word_embeddings", "a tied head: the head reads the 2d-wide stack, the table is d wide",
                 "tie_word_embeddings=false (ReformerConfig's default)")
    act = mlp_act(c, "hidden_act", "relu")
    p = period(types)
    s = Spec("reformer", "ReformerModelWithLMHead" if c.get("is_decoder", False) else "ReformerForMaskedLM", c)
    s.bind(vocab=c.get("vocab_size"), d_model=d, heads=heads)
    if heads * dh != d:
        s.bind(head_dim=dh)
    s.bind(d_ff=c.get("feed_forward_size"), copies=len(types) // p, eps=c.get("layer_norm_eps", 1e-12),
           p_drop=c.get("hidden_dropout_prob", 0.05))
    hd = ", head_dim=head_dim" if heads * dh != d else ""
    if "local" in types:
        s.bind(local_chunk=c.get("local_attn_chunk_length", 64))
        p_local = c.get("local_attention_probs_dropout_prob", 0.05)
        local = (f"mha(chunk, c=local_chunk, before={c.get('local_num_chunks_before', 1)}, "
                 f"after={c.get('local_num_chunks_after', 0)}, wrap=true, bias=false{hd}"
                 + (f", dropout={fmt(p_local)})" if p_local else ")"))
    if "lsh" in types:
        s.bind(buckets=hf_buckets(c), lsh_chunk=c.get("lsh_attn_chunk_length", 64), hashes=c.get("num_hashes", 1),
               hash_seed=c.get("hash_seed", 0) or 0)
        p_lsh = c.get("lsh_attention_probs_dropout_prob", 0.0)
        lsh = (f"mha(lsh, form=hf, buckets=buckets, chunk=lsh_chunk, rounds=hashes, seed=hash_seed, "
               f"before={c.get('lsh_num_chunks_before', 1)}, after={c.get('lsh_num_chunks_after', 0)}, bias=false{hd}"
               + (f", dropout={fmt(p_lsh)})" if p_lsh else ")"))
    ffn = f"residual(norm(layernorm, eps=eps) -> ffn(mlp, act={act}, d_ff=d_ff) -> dropout(p=p_drop))"
    names = []
    for kind in dict.fromkeys(types[:p]):
        attn = local if kind == "local" else lsh
        s.line(f"{kind}_layer = residual(norm(layernorm, eps=eps) -> {attn} -> dropout(p=p_drop))\n    -> {ffn}")
    names = [f"{kind}_layer" for kind in types[:p]]
    if c.get("axial_pos_embds", True):
        (n1, n2), (d1, d2) = c.get("axial_pos_shape", [64, 64]), c.get("axial_pos_embds_dim", [64, 192])
        s.bind(axial_n1=n1, axial_n2=n2, axial_d1=d1, axial_d2=d2)
        pos = "pos(axial, n1=axial_n1, n2=axial_n2, d1=axial_d1, d2=axial_d2, dropout=p_drop)"
    else:
        s.bind(n_ctx=c.get("max_position_embeddings", 4096))
        pos = "pos(learned, max_len=n_ctx) -> dropout(p=p_drop)"
    causal = fmt(bool(c.get("is_decoder", False)))
    s.model(f"causal={causal}", f"input(tokens) -> embed(token) -> dropout(p=p_drop) -> {pos}",
            "norm(layernorm, eps=eps) -> dropout(p=p_drop) -> head(lm, tied=false, bias=true)",
            f"repeat({' -> '.join(names)}, copies, reversible=true)")
    return s


def reformer_weights(c: Config) -> dict:
    types = list(c.get("attn_layers"))
    p = period(types)
    out = {"embed.weight": Take("reformer.embeddings.word_embeddings.weight"),
           "norm.weight": Take("reformer.encoder.layer_norm.weight"),
           "norm.bias": Take("reformer.encoder.layer_norm.bias"),
           "head.weight": Take("lm_head.decoder.weight"), "head.bias": Take("lm_head.decoder.bias")}
    if c.get("axial_pos_embds", True):
        out["pos.row"] = Take("reformer.embeddings.position_embeddings.weights.0")
        out["pos.col"] = Take("reformer.embeddings.position_embeddings.weights.1")
    else:
        out["pos.weight"] = Take("reformer.embeddings.position_embeddings.embedding.weight")
    for i, kind in enumerate(types):
        h, j = f"reformer.encoder.layers.{i}.", i % p
        e = f"blocks.{i // p}."
        attn, ffn = ("attn", "ffn") if p == 1 else (f"attn{j + 1}", f"ffn{j + 1}")
        for k, part in ((2 * j + 1, "attention"), (2 * j + 2, "feed_forward")):
            for w in ("weight", "bias"):
                out[e + f"norm{k}.{w}"] = Take(h + f"{part}.layer_norm.{w}")
        projs = {"q": "query", "k": "key", "v": "value"} if kind == "local" else {"q": "query_key", "v": "value"}
        for x, theirs in projs.items():
            out[e + f"{attn}.{x}_proj.weight"] = Take(h + f"attention.self_attention.{theirs}.weight")
        out[e + f"{attn}.o_proj.weight"] = Take(h + "attention.output.dense.weight")
        for ours, theirs in (("up_proj", "dense.dense"), ("down_proj", "output.dense")):
            for w in ("weight", "bias"):
                out[e + f"{ffn}.{ours}.{w}"] = Take(h + f"feed_forward.{theirs}.{w}")
    return out
