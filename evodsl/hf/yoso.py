"""YOSO from HF configs (YosoModel: a RoBERTa-style encoder with YOSO attention), as a spec writer and a weight map."""
from __future__ import annotations

from ._config import Config
from ._spec import Spec
from .decoders import mlp_act
from .encoders import bert_encoder_weights


def yoso_spec(c: Config) -> Spec:
    c.require("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    act = mlp_act(c, "hidden_act", "gelu")
    if c.get("conv_window", None) is not None:
        c.refuse("conv_window", "YOSO's depthwise convolution of V (conv_window) is not imported",
                 "conv_window=null (YosoConfig's default)")
    mode = "expectation" if c.get("use_expectation", True) else "sample"
    s = Spec("yoso", "YosoModel", c)
    s.bind(vocab=c.get("vocab_size"), n_ctx=c.get("max_position_embeddings", 4096), d_model=c.get("hidden_size"),
           heads=c.get("num_attention_heads"), d_ff=c.get("intermediate_size"), layers=c.get("num_hidden_layers"),
           hashes=c.get("num_hash", 64), tau=c.get("hash_code_len", 9), eps=c.get("layer_norm_eps", 1e-12),
           p_drop=c.get("hidden_dropout_prob", 0.1))
    s.line(f"block = residual(mha(yoso, hashes=hashes, tau=tau, mode={mode}) -> dropout(p=p_drop)) -> norm\n"
           f"     -> residual(ffn(mlp, act={act}) -> dropout(p=p_drop)) -> norm")
    segments = c.get("type_vocab_size", 1)
    embed = f"embed(token, segments={segments})" if segments else "embed(token)"
    # the position table has n_ctx + 2 rows, position t reads row t + 2 (RoBERTa's padding offset); no head: the
    # last hidden state (Spec.model's form, with nothing after the blocks)
    s.body = ("model yoso(causal=false) =\n"
              f"    input(tokens) -> {embed} -> pos(learned, max_len=n_ctx, offset=2) -> norm -> dropout(p=p_drop)\n"
              "    -> repeat(block, layers)\n")
    return s


def yoso_weights(c: Config) -> dict:
    return bert_encoder_weights(c, 1)  # no pooler; YosoConfig's type_vocab_size defaults to 1
