"""Interop with Hugging Face transformers: import a config as a spec, load its weights.

    spec = evodsl.from_hf("llama/config.json")          # .evo text; `evodsl from-hf config.json -o llama.evo`
    model = evodsl.compile(spec)
    evodsl.load_hf(model, hf_state_dict, "llama/config.json")

Nothing here imports transformers: a config is JSON, a checkpoint is a state dict or safetensors files.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ._config import Config, read_config
from .bloom import bloom_spec, bloom_weights
from .deberta import deberta_spec, deberta_weights
from .decoders import gpt2_spec, gpt2_weights, llama_spec, llama_weights
from .deepseek import deepseek_v2_spec, deepseek_v2_weights
from .encdec import bart_spec, bart_weights, t5_spec, t5_weights
from .encoders import bert_spec, bert_weights
from .gemma2 import gemma2_spec, gemma2_weights
from .mamba import mamba_spec, mamba_weights
from .mamba2 import mamba2_spec, mamba2_weights
from .reformer import reformer_spec, reformer_weights
from .rwkv import rwkv_spec, rwkv_weights
from .weights import load_hf, read_checkpoint, read_safetensors
from .yoso import yoso_spec, yoso_weights

__all__ = ["from_hf", "load_hf", "read_safetensors", "read_checkpoint", "read_config", "FAMILIES"]


@dataclass(frozen=True)
class Family:
    spec: Callable  # Config -> Spec
    weights: Callable  # Config -> {evodsl name: Take}
    unused: tuple = ()  # checkpoint tensors the HF model's forward never reads (Reformer's lm_head.bias)


FAMILIES = {
    "gpt2": Family(gpt2_spec, gpt2_weights),
    "llama": Family(llama_spec, llama_weights),
    "mistral": Family(llama_spec, llama_weights),
    "gemma": Family(llama_spec, llama_weights),
    "phi3": Family(llama_spec, llama_weights),
    "gemma2": Family(gemma2_spec, gemma2_weights),
    "bert": Family(bert_spec, bert_weights),
    "t5": Family(t5_spec, t5_weights),
    "bart": Family(bart_spec, bart_weights),
    "deepseek_v2": Family(deepseek_v2_spec, deepseek_v2_weights),
    "yoso": Family(yoso_spec, yoso_weights),
    "reformer": Family(reformer_spec, reformer_weights, ("lm_head.bias",)),
    "bloom": Family(bloom_spec, bloom_weights),
    "deberta": Family(deberta_spec, deberta_weights),
    "mamba": Family(mamba_spec, mamba_weights),
    "mamba2": Family(mamba2_spec, mamba2_weights),
    "rwkv": Family(rwkv_spec, rwkv_weights),
}


def family_of(config: Config) -> Family:
    kind = config.model_type
    if kind not in FAMILIES:
        config.refuse("model_type", f"no importer for model_type {kind!r}" if kind else "the config has no model_type",
                      "from-hf reads: " + ", ".join(sorted(FAMILIES)))
        config.raise_if_any()
    return FAMILIES[kind]


def from_hf(config) -> str:
    """A readable .evo spec of the HF model that `config` describes (a dict, a PretrainedConfig, a config.json or
    a folder holding one). A feature with no evodsl form raises EvoError (E415) naming it and its key. The text is
    in evodsl fmt's canonical layout."""
    from ..fmt import format_source

    c = read_config(config)
    spec = family_of(c).spec(c)
    c.raise_if_any()
    return format_source(str(spec))


def weight_map(config) -> dict:
    c = read_config(config)
    out = family_of(c).weights(c)
    c.raise_if_any()
    return out


def unused_tensors(config) -> tuple:
    return family_of(read_config(config)).unused
