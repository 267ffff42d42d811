"""DecBERT (2204.08688) as a spec: causal layers first, then bidirectional ones, in a model of two streams (the
bidirectional one declared `causal=false` and starting from the causal one). Its output is the two stacks composed
(each built alone, same weights); the causal mask is its word-order signal: with no position embedding, the
bidirectional encoder alone is permutation-equivariant and DecBERT is not."""
from __future__ import annotations

import pytest
import torch

import evodsl

TOP = "vocab = 50\nd_model = 32\nheads = 4\nblock = residual(mha, norm=post) -> residual(ffn, norm=post)\n"
DECBERT = TOP + ("model decbert {\n  order(causal=true) = input(tokens) -> embed(token) -> repeat(block, 2)\n"
                 "  enc(causal=false) = order -> repeat(block, 3)\n}\n")
CAUSAL = TOP + "model c(causal=true) = input(tokens) -> embed(token) -> repeat(block, 2)\n"
BIDIR = TOP + "model e = input(features, d=32) -> repeat(block, 3)\n"


def _ids(seed=0):
    return torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(seed))


def test_decbert_is_the_causal_stack_then_the_bidirectional_one():
    model = evodsl.compile(DECBERT, dtype=torch.float64)
    causal, bidir = evodsl.compile(CAUSAL, dtype=torch.float64), evodsl.compile(BIDIR, dtype=torch.float64)
    sd = model.state_dict()
    causal.load_state_dict({k.removeprefix("order_"): v for k, v in sd.items() if k.startswith("order_")})
    bidir.load_state_dict({k.removeprefix("enc_"): v for k, v in sd.items() if k.startswith("enc_")})
    ids = _ids()
    with torch.no_grad():
        assert (model(ids) - bidir(causal(ids))).abs().max().item() < 1e-12
        # the first stack is causal: a later token leaves the earlier positions of `order` as they were
        changed = ids.clone()
        changed[:, 5] = (changed[:, 5] + 1) % 50
        assert (causal(changed)[:, :5] - causal(ids)[:, :5]).abs().max().item() == 0


def test_the_causal_mask_is_the_order_signal():
    perm = torch.tensor([3, 0, 8, 1, 7, 2, 6, 4, 5])
    ids = _ids(1)
    plain = evodsl.compile(TOP + "model e = input(tokens) -> embed(token) -> repeat(block, 5)\n", dtype=torch.float64)
    model = evodsl.compile(DECBERT, dtype=torch.float64)
    with torch.no_grad():
        assert (plain(ids[:, perm]) - plain(ids)[:, perm]).abs().max().item() < 1e-10  # equivariant: no order
        assert (model(ids[:, perm]) - model(ids)[:, perm]).abs().max().item() > 1e-3  # order changes the output


def test_only_a_declared_bidirectional_stream_may_start_from_a_causal_one():
    reads = TOP + ("model m {\n  order(causal=true) = input(tokens) -> embed(token) -> repeat(block, 2)\n"
                   "  enc(causal=false) = input(tokens) -> embed(token) -> residual(xattn(softmax, kv=order))\n}\n")
    with pytest.raises(evodsl.EvoError, match="E309"):  # reading a causal stream's every position: still refused
        evodsl.parse(reads)
    read_later = TOP + ("model m(causal=true) {\n  order = input(tokens) -> embed(token) -> repeat(block, 2)\n"
                        "  mid(causal=false) = order -> repeat(block, 2)\n"
                        "  out = order -> residual(xattn(softmax, kv=mid)) -> head(lm)\n}\n")
    with pytest.raises(evodsl.EvoError, match="E309"):  # not the output: a causal stream could see the future
        evodsl.parse(read_later)
    inherited = evodsl.parse(TOP + "model m {\n  order(causal=true) = input(tokens) -> embed(token)\n"
                                   "  enc = order -> repeat(block, 2)\n}\n")
    assert inherited.streams[-1].causal  # undeclared, a stream is as causal as the one it starts from
