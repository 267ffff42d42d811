"""Loading HF weights into a model compiled from an imported spec, and reading safetensors checkpoints.

`load_hf` fills every tensor of the model from the HF state dict through the family's weight map, converting
layouts (GPT-2's Conv1D stores W transposed; Phi-3 and GPT-2 fuse q, k, v). Anything wrong is reported at once,
before a single tensor is written: HF tensors the map needs and the checkpoint lacks, checkpoint tensors nothing
reads, tensors whose shapes differ, and model tensors the map does not fill (the model was not built from this
config's spec). A checkpoint is read one tensor at a time, so loading holds the model plus one tensor.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from .. import progress
from ..diagnostics import Diagnostic, EvoError

# buffers some checkpoints carry that are computed, not learned: the rotary frequencies, GPT-2's causal masks
DERIVED = ("rotary_emb.inv_freq", "attn.bias", "attn.masked_bias", "position_ids")
ZERO = ("final_logits_bias",)  # BART's logits bias, a zero buffer: the spec's head has none, so it must stay zero
SEEDED = (".rotations",)  # our buffers drawn from a seed the spec gives (mha(lsh)'s hash rotations): not loaded
SHOWN = 8  # names listed per kind of problem


def _listing(names) -> str:
    names = sorted(names)
    return ", ".join(names[:SHOWN]) + (f", ... ({len(names) - SHOWN} more)" if len(names) > SHOWN else "")


def _convert(t: torch.Tensor, take) -> torch.Tensor:
    if take.part is not None:  # [heads * parts * w, ...] -> [heads * w, ...], slice i of each head
        heads, parts, i = take.part
        t = t.reshape(heads, parts, -1, *t.shape[1:])[:, i].reshape(-1, *t.shape[1:])
    if take.rows is not None:
        t = (t.t() if take.t else t)[take.rows[0]:take.rows[1]]
        return t
    return t.t() if take.t else t


def load_hf(model: torch.nn.Module, hf_state: Mapping, config) -> torch.nn.Module:
    """Copy an HF state dict (a dict of tensors, a folder of safetensors files, or one .safetensors file) into
    `model`, compiled from `evodsl.from_hf(config)`. Raises EvoError (E416) listing every missing, unexpected or
    mis-shaped tensor; on success every tensor of the model was written. Returns the model."""
    from . import unused_tensors, weight_map

    if isinstance(hf_state, (str, Path)):
        hf_state = read_safetensors(hf_state)
    plan = weight_map(config)
    ours = {k: v for k, v in model.state_dict(keep_vars=True).items() if not k.endswith(SEEDED)}
    locate = _locator(hf_state, plan)
    problems, sources, used = [], {}, set()
    missing, shapes = [], []
    for name, take in plan.items():
        key = locate(take.hf)
        if key not in hf_state:
            missing.append(take.hf)
            continue
        used.add(key)
        sources[name] = (key, take)
    unfilled = set(ours) - set(plan)
    absent = set(plan) - set(ours)
    unexpected = {k for k in hf_state if k not in used and not k.endswith(DERIVED + ZERO + unused_tensors(config))
                  and not _tied_copy(hf_state, k, used, plan, locate)}
    nonzero = [k for k in hf_state if k.endswith(ZERO) and bool(hf_state[k].any())]
    for name, (key, take) in sources.items():
        if name not in ours:
            continue
        want = tuple(ours[name].shape)
        got = _shape(hf_state, key, take)
        if got != want:
            shapes.append(f"{key} {list(got)} for {name} {list(want)}")
    if missing:
        problems.append(Diagnostic("E416", f"{len(missing)} tensors missing from the checkpoint: {_listing(missing)}",
                                   help="is this checkpoint of the config's model (same family and sizes)?"))
    if unexpected:
        problems.append(Diagnostic("E416", f"{len(unexpected)} checkpoint tensors nothing reads: {_listing(unexpected)}",
                                   help="a task head or a family the spec does not have; load the base model's "
                                        "tensors only"))
    if nonzero:
        problems.append(Diagnostic("E416", f"{_listing(nonzero)} is not zero: the spec's head has no bias",
                                   help="this checkpoint's logits carry a bias the imported model cannot hold"))
    if shapes:
        problems.append(Diagnostic("E416", f"{len(shapes)} tensors of another shape: {_listing(shapes)}",
                                   help="the config's sizes differ from the checkpoint's"))
    if unfilled or absent:
        problems.append(Diagnostic("E416", "the model is not the config's spec: "
                                   + (f"no HF tensor for {_listing(unfilled)}" if unfilled else "")
                                   + ("; " if unfilled and absent else "")
                                   + (f"no model tensor {_listing(absent)}" if absent else ""),
                                   help="compile the spec that evodsl.from_hf(config) writes, then load"))
    if problems:
        raise EvoError(problems)
    with torch.no_grad():
        for i, (name, (key, take)) in enumerate(sources.items(), 1):
            progress.step("loading weights", i, len(sources))
            ours[name].copy_(_convert(hf_state[key], take))
    progress.done()
    return model


def _tied_copy(state, key: str, used: set, plan: dict, locate) -> bool:
    """A tied weight saved under a second name (an untied-looking lm_head of a tied model, T5's and BART's
    per-stack embed_tokens beside `shared`): the same storage as a tensor that is read, or HF's lm_head when
    the spec's head reads the embedding."""
    heads = [t.hf for name, t in plan.items() if name.endswith("head.weight")]
    if key == locate("lm_head.weight") and heads and "lm_head.weight" not in heads:
        return True
    if isinstance(state, SafetensorsState) or not key.endswith("embed_tokens.weight"):
        return False
    ptr = state[key].data_ptr()
    return any(state[u].data_ptr() == ptr for u in used)


def _shape(state, key, take) -> tuple:
    t = state.shape_of(key) if isinstance(state, SafetensorsState) else tuple(state[key].shape)
    if take.part is not None:
        t = (t[0] // take.part[1], *t[1:])
    t = tuple(reversed(t)) if take.t else tuple(t)
    if take.rows is not None:
        t = (take.rows[1] - take.rows[0], *t[1:])
    return t


def _locator(state, plan):
    """name -> checkpoint key. The plan's names are HF's task-model names ("transformer.h.0..." for GPT-2); a
    checkpoint may hold them as they are, under a wrapper's prefix ("bert.embeddings..." from a task model
    around BertModel), or without the task model's first component ("h.0..." saved from GPT2Model)."""
    names = [t.hf for t in plan.values()]
    if not names or any(n in state for n in names):
        return lambda n: n
    first = names[0]
    for key in state:  # a prefix added
        prefix = key[: -len(first)]
        if key.endswith(first) and all(prefix + n in state for n in names[:8]):
            return lambda n: prefix + n
    head = first.split(".")[0] + "."  # a prefix dropped
    wrapped = [n for n in names[:8] if n.startswith(head)]
    if wrapped and all(n[len(head):] in state for n in wrapped):
        return lambda n: n[len(head):] if n.startswith(head) else n
    return lambda n: n


class SafetensorsState(Mapping):
    """The tensors of one or more .safetensors files, read one at a time when asked for."""

    def __init__(self, files: list[Path]):
        from safetensors import safe_open

        self._open = safe_open
        self.files, self.where, self._shapes = files, {}, {}
        for f in files:
            with safe_open(str(f), framework="pt") as handle:
                for key in handle.keys():
                    self.where[key] = f
                    self._shapes[key] = tuple(handle.get_slice(key).get_shape())

    def shape_of(self, key: str) -> tuple:
        return self._shapes[key]

    def __getitem__(self, key: str) -> torch.Tensor:
        with self._open(str(self.where[key]), framework="pt") as handle:
            return handle.get_tensor(key)

    def __iter__(self):
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)


def read_safetensors(path) -> SafetensorsState:
    """A .safetensors file, or a folder of them (a sharded checkpoint: model-00001-of-00004.safetensors, ...)."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise EvoError([Diagnostic("E401", f"no .safetensors files at {str(path)!r}",
                                   help="pass a checkpoint folder (config.json and *.safetensors) or one "
                                        ".safetensors file")])
    try:
        return SafetensorsState(files)
    except Exception as err:  # a corrupt or foreign file: safetensors raises its own errors
        raise EvoError([Diagnostic("E401", f"cannot read safetensors at {str(path)!r}: {err}")]) from None


def read_checkpoint(path) -> tuple[SafetensorsState, Path] | None:
    """(tensors, config.json) of an HF checkpoint: a folder of *.safetensors and config.json, or one .safetensors
    file with config.json beside it. None when `path` is neither (an evodsl artifact)."""
    path = Path(path)
    if not (path.is_dir() or path.suffix == ".safetensors"):
        return None
    folder = path if path.is_dir() else path.parent
    if path.is_dir() and not any(path.glob("*.safetensors")):
        other = sorted(p.name for p in path.glob("*.bin"))[:2]
        raise EvoError([Diagnostic("E401", f"no .safetensors files in {str(path)!r}"
                                   + (f" (only {', '.join(other)})" if other else ""),
                                   help="evodsl reads safetensors checkpoints (model.save_pretrained writes them)")])
    config = folder / "config.json"
    if not config.is_file():
        raise EvoError([Diagnostic("E401", f"no config.json beside the weights in {str(folder)!r}",
                                   help="an HF checkpoint folder holds config.json; its family and sizes say how "
                                        "the tensors map")])
    return read_safetensors(path), config
