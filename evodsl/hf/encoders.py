"""Encoders from HF configs: BERT (BertModel, with its pooler), as a spec writer and a weight map."""
from __future__ import annotations

from ._config import Config
from ._spec import Spec
from .decoders import Take, mlp_act


def bert_spec(c: Config) -> Spec:
    c.require("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    act = mlp_act(c, "hidden_act", "gelu")
    kind = c.get("position_embedding_type", "absolute")
    if kind != "absolute":
        c.refuse("position_embedding_type", f"BERT's {kind!r} position scores have no evodsl form",
                 "position_embedding_type=absolute is pos(learned)")
    if c.get("is_decoder", False) or c.get("add_cross_attention", False):
        c.refuse("is_decoder", "BERT as a decoder (is_decoder / add_cross_attention) is not imported",
                 "import the encoder (is_decoder=false)")
    s = Spec("bert", "BertModel", c)
    s.bind(vocab=c.get("vocab_size"), n_ctx=c.get("max_position_embeddings", 512), d_model=c.get("hidden_size"),
           heads=c.get("num_attention_heads"), d_ff=c.get("intermediate_size"), layers=c.get("num_hidden_layers"),
           eps=c.get("layer_norm_eps", 1e-12), p_drop=c.get("hidden_dropout_prob", 0.1),
           p_attn=c.get("attention_probs_dropout_prob", 0.1))
    s.line("block = residual(mha(softmax, dropout=p_attn) -> dropout(p=p_drop)) -> norm\n"
           f"     -> residual(ffn(mlp, act={act}) -> dropout(p=p_drop)) -> norm")
    segments = c.get("type_vocab_size", 2)
    embed = f"embed(token, segments={segments})" if segments else "embed(token)"
    s.model("causal=false", f"input(tokens) -> {embed} -> pos(learned, max_len=n_ctx) -> norm -> dropout(p=p_drop)",
            "head(pooler)")
    return s


BERT_LAYER = {"attn.q_proj": "attention.self.query", "attn.k_proj": "attention.self.key",
              "attn.v_proj": "attention.self.value", "attn.o_proj": "attention.output.dense",
              "norm1": "attention.output.LayerNorm", "ffn.up_proj": "intermediate.dense",
              "ffn.down_proj": "output.dense", "norm2": "output.LayerNorm"}


def bert_encoder_weights(c: Config, segments: int) -> dict:
    """BERT's embeddings (token, position, segment where type_vocab_size, default `segments`, is nonzero), their
    LayerNorm and every encoder layer (BERT_LAYER), mapped to ours; RoBERTa-style encoders (YOSO) share it."""
    out = {"embed.weight": Take("embeddings.word_embeddings.weight"),
           "pos.weight": Take("embeddings.position_embeddings.weight"),
           "norm.weight": Take("embeddings.LayerNorm.weight"), "norm.bias": Take("embeddings.LayerNorm.bias")}
    if c.get("type_vocab_size", segments):
        out["embed.segment.weight"] = Take("embeddings.token_type_embeddings.weight")
    for i in range(c.get("num_hidden_layers")):
        h, e = f"encoder.layer.{i}.", f"blocks.{i}."
        for ours, theirs in BERT_LAYER.items():
            for part in (".weight", ".bias"):
                out[e + ours + part] = Take(h + theirs + part)
    return out


def bert_weights(c: Config) -> dict:
    return {**bert_encoder_weights(c, 2),
            "head.dense.weight": Take("pooler.dense.weight"), "head.dense.bias": Take("pooler.dense.bias")}
