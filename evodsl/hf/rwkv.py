"""RWKV-4 from HF configs (RwkvForCausalLM): the embedding, a LayerNorm before the first block (HF's pre_ln on layer
0, the authors' ln0), pre-norm residual blocks of LayerNorm -> rnn(rwkv4) (the time mix) and LayerNorm -> ffn(rwkv)
(the channel mix), a final LayerNorm and an untied head, as a spec writer and a weight map. HF's time-mix and
channel-mix weights load as they are (the same names inside rnn and ffn; the mixes [1, 1, d] as HF stores them).

rescale_every (HF's eval-time halving: block i's output and value weights divided by 2^(i // k) and the stream
halved after every k blocks, against float16 overflow) is not written: it is the same model in exact arithmetic
but for the LayerNorms' eps, and HF undoes it in training mode; load_hf reads the weights HF keeps, the unscaled
ones whenever the HF model is in training mode or rescale_every = 0. Left out (refused): attention_hidden_size other
than hidden_size (rnn(rwkv4) is d wide)."""
from __future__ import annotations

from ._config import Config
from ._spec import Spec, fmt
from .decoders import Take


def rwkv_spec(c: Config) -> Spec:
    c.require("vocab_size", "hidden_size", "num_hidden_layers")
    d = c.get("hidden_size")
    if c.get("attention_hidden_size", None) not in (None, d):
        c.refuse("attention_hidden_size", f"attention_hidden_size {c.get('attention_hidden_size')} is not "
                 f"hidden_size ({d})", "rnn(rwkv4) is d wide: set attention_hidden_size = hidden_size (or null)")
    s = Spec("rwkv", "RwkvForCausalLM", c)
    s.bind(vocab=c.get("vocab_size"), d_model=d, layers=c.get("num_hidden_layers"),
           d_ff=c.get("intermediate_size", None) or 4 * d, eps=c.get("layer_norm_epsilon", 1e-5))
    s.line("block = norm(layernorm, eps=eps) -> rnn(rwkv4)\n     -> norm(layernorm, eps=eps) -> ffn(rwkv, d_ff=d_ff)")
    tied = c.get("tie_word_embeddings", False)
    s.model("causal=true", "input(tokens) -> embed(token) -> norm(layernorm, eps=eps)",
            f"norm(layernorm) -> head(lm, tied={fmt(tied)})")
    return s


def rwkv_weights(c: Config) -> dict:
    tied = c.get("tie_word_embeddings", False)
    out = {"embed.weight": Take("rwkv.embeddings.weight"),
           "norm1.weight": Take("rwkv.blocks.0.pre_ln.weight"), "norm1.bias": Take("rwkv.blocks.0.pre_ln.bias"),
           "norm2.weight": Take("rwkv.ln_out.weight"), "norm2.bias": Take("rwkv.ln_out.bias"),
           "head.weight": Take("rwkv.embeddings.weight" if tied else "head.weight")}
    att = ["time_decay", "time_first", "time_mix_key", "time_mix_value", "time_mix_receptance", "key.weight",
           "value.weight", "receptance.weight", "output.weight"]
    ffn = ["time_mix_key", "time_mix_receptance", "key.weight", "receptance.weight", "value.weight"]
    for i in range(c.get("num_hidden_layers")):
        h, e = f"rwkv.blocks.{i}.", f"blocks.{i}."
        for ours, theirs in (("norm1", "ln1"), ("norm2", "ln2")):
            for p in ("weight", "bias"):
                out[f"{e}{ours}.{p}"] = Take(f"{h}{theirs}.{p}")
        out.update({f"{e}rnn.{name}": Take(f"{h}attention.{name}") for name in att})
        out.update({f"{e}ffn.{name}": Take(f"{h}feed_forward.{name}") for name in ffn})
    return out
