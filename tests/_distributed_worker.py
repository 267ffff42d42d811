"""Run by tests/test_distributed.py: `python tests/_distributed_worker.py PORT OUT.json` spawns 2 gloo ranks;
each takes one AdamW step of a small gpt2-like and a small llama-like spec under DDP, FSDP2 and tensor
parallelism, and compares the loss and the updated parameters with one process doing the same step on the
whole batch. Rank 0 writes {spec: {kind: {"loss": max |diff|, "params": max |diff|, "sharded": n}}} to OUT."""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

WORLD = 2
GPT2 = """
vocab   = 64
d_model = 32
block = norm -> mha(softmax, heads=4) -> norm -> ffn(mlp, act=gelu_tanh)
model gpt2_small(causal=true) =
    input(tokens) -> embed(token) -> pos(learned, max_len=32) -> repeat(block, 2) -> norm -> head(lm, tied=true)
"""
LLAMA = """
vocab   = 64
d_model = 32
block = norm(rmsnorm) -> mha(softmax, heads=4, kv_heads=2, bias=false)
    -> norm(rmsnorm) -> ffn(swiglu, d_ff=48, bias=false)
model llama_small(causal=true) =
    input(tokens) -> embed(token) -> pos(rope) -> repeat(block, 2) -> norm(rmsnorm) -> head(lm, tied=false)
"""
# aux losses (DDP; fsdp() refuses them): adaptive span's penalty, added to the loss after the forward
SPAN = """
vocab   = 64
d_model = 32
block = norm -> mha(adaptive_span, heads=4, R=4, max_span=16, span_init=0.5, penalty=0.01) -> ffn(mlp)
model span_small(causal=true) =
    input(tokens) -> embed(token) -> pos(rope) -> repeat(block, 2) -> norm -> head(lm, tied=false)
"""
LOCAL = GPT2.replace("mha(softmax, heads=4)", "mha(local, heads=4, window=5)")  # a band over 12 positions
# fsdp_ckpt: FSDP2 over a model compiled with checkpoint=True (the blocks recomputed, and re-gathered, in backward)
XPOS = LLAMA.replace("pos(rope)", "pos(xpos, scale_base=16)")  # xPos: rope's turn and a per-channel decay, per head alike
SPECS = {"gpt2": (GPT2, ("ddp", "fsdp", "tp")), "llama": (LLAMA, ("ddp", "fsdp", "tp", "fsdp_ckpt")),
         "span": (SPAN, ("ddp",)), "local": (LOCAL, ("tp",)), "xpos": (XPOS, ("tp",))}


def _step(model, ids):
    """One AdamW step on next-token cross-entropy: (loss, {name: updated parameter, whole})."""
    from torch.distributed.tensor import DTensor

    # eps 1e-6: the key projection's bias has a gradient of exactly zero in exact arithmetic (a constant added
    # to every score of a query), so what autograd gives is rounding noise, which Adam at eps 1e-8 would turn
    # into a step of about lr in a direction that differs with the order of the sums
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-6, foreach=False)
    logits = model(ids)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)) + model.aux_loss()
    loss.backward()
    opt.step()
    params = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
              for n, p in model.named_parameters()}
    sharded = sum(isinstance(p, DTensor) for p in model.parameters())
    return loss.detach(), params, sharded


def _units(model) -> list[str]:
    """FSDP2's units: the modules sharded together, "a+b" for a group (one state), sorted."""
    from torch.distributed.fsdp import FSDPModule

    groups: dict[int, list[str]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, FSDPModule):
            groups.setdefault(id(mod._get_fsdp_state()), []).append(name)
    return sorted("+".join(names) for names in groups.values())


def _compile(spec, checkpoint=False):
    import evodsl

    return evodsl.compile(spec, seed=0, checkpoint=checkpoint).train()


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)  # two ranks on a small machine: one thread each
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        import evodsl.distributed as ed

        mesh = init_device_mesh("cpu", (WORLD,))
        torch.manual_seed(0)
        results = {}
        for name, (spec, kinds) in SPECS.items():
            ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(1))
            ref_loss, ref, _ = _step(_compile(spec), ids)
            half = ids.chunk(WORLD)[rank]  # data parallel: each rank its share of the batch
            runs = {"ddp": lambda: (ed.ddp(_compile(spec)), half),
                    "fsdp": lambda: (ed.fsdp(_compile(spec), mesh), half),
                    "tp": lambda: (ed.tensor_parallel(_compile(spec), mesh), ids),  # TP: every rank the whole batch
                    "fsdp_ckpt": lambda: (ed.fsdp(_compile(spec, checkpoint=True), mesh), half)}
            results[name] = {}
            for kind in kinds:
                model, batch = runs[kind]()
                loss, params, sharded = _step(model, batch)
                if kind != "tp":  # the mean of the ranks' means is the mean over the whole batch
                    dist.all_reduce(loss)
                    loss = loss / WORLD
                params = {k.removeprefix("module."): v for k, v in params.items()}
                worst = max((params[k] - ref[k]).abs().max().item() for k in ref) if params.keys() == ref.keys() \
                    else float("inf")
                diffs = torch.tensor([(loss - ref_loss).abs().item(), worst, float(params.keys() == ref.keys())])
                dist.all_reduce(diffs, op=dist.ReduceOp.MAX)
                results[name][kind] = {"loss": diffs[0].item(), "params": diffs[1].item(),
                                       "all_params": bool(diffs[2].item() == 1), "sharded": sharded,
                                       "units": _units(model)}
        if rank == 0:
            with open(out, "w") as f:
                json.dump(results, f)
        dist.barrier()  # neither rank tears down while the other may still talk to it
    finally:
        dist.destroy_process_group()
    # skip the interpreter's finalization: gloo's threads and the TCP store's server, torn down by static
    # destructors at exit, can abort ("terminate called without an active exception", SIGABRT) after the work
    # is done and written; that is torch's teardown, not the step this checks
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    mp.spawn(_worker, args=(int(sys.argv[1]), sys.argv[2]), nprocs=WORLD, join=True)
