"""Peak memory (RSS) of an ONNX export: torch's exporter on the module, against the streamed export.

Each export runs in a fresh Python process (so that every peak is its own): it imports evodsl, builds the model
(its weights: W bytes), records its RSS, exports with `backends.lower_onnx.export` (stream=False: the exporter
on the module, the way below 2 GiB; stream=True: the graph traced on the meta device and the weights streamed
into external data, the way from 2 GiB) including onnxruntime's check, and reports its peak RSS (getrusage).
The table gives the peak above the RSS before the model was built, in units of W.

    .venv/bin/python benchmarks/bench_export_memory.py [--gpt2-layers 2,12,24] [--llama7b]

--llama7b adds specs/llama.evo in float16 (12.6 GiB of weights), streamed: the 24 GiB machine's case.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import torch
import evodsl
from evodsl.backends.lower_onnx import export
spec, overrides, dtype, stream, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4] == "1", sys.argv[5]
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
base = rss()
model = evodsl.compile(Path(spec), overrides=overrides, dtype=getattr(torch, dtype))
weights = sum(p.numel() * p.element_size() for p in model.parameters())
built = rss()
start = time.perf_counter()
r = export(model, evodsl.parse(Path(spec), overrides), Path(out), stream=stream, release=stream)
took = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(dict(base=base, built=built, weights=weights, peak=peak, seconds=took, bytes=r.bytes,
                      rel=r.max_abs_diff / max(r.output_scale, 1e-30))))
"""


def run(spec: str, overrides: dict, dtype: str, stream: bool) -> dict:
    """The child's numbers, or {"error": its last line of output} when it fails (an E405 refusal, say)."""
    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
        out = subprocess.run([sys.executable, "-c", CHILD, str(ROOT / "specs" / spec), json.dumps(overrides), dtype,
                              "1" if stream else "0", str(Path(tmp) / "m.onnx")],
                             capture_output=True, text=True)
    if out.returncode:
        said = [line.strip() for line in (out.stderr + out.stdout).splitlines() if line.strip()]
        return {"error": f"exit {out.returncode}: " + (said[-1] if said else "no output")}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpt2-layers", default="2,12,24", help="GPT-2 small with these depths")
    ap.add_argument("--llama7b", action="store_true", help="also specs/llama.evo in float16, streamed")
    args = ap.parse_args()
    gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    print(f"{platform.machine()}, {os.cpu_count()} cores, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
          f"{datetime.date.today().isoformat()}; one process per export\n")
    print("| spec | dtype | export | weights W GiB | RSS before build GiB | peak GiB | (peak - before) / W "
          "| peak - before - W GiB | seconds | rel. diff ORT vs torch |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    cases = [("gpt2.evo", {"layers": int(n)}, "float32") for n in args.gpt2_layers.split(",")]
    if args.llama7b:
        cases.append(("llama.evo", {}, "float16"))
    for spec, overrides, dtype in cases:
        for stream in ((True,) if spec == "llama.evo" else (False, True)):
            r = run(spec, overrides, dtype, stream)
            name = spec + "".join(f" {k}={v}" for k, v in overrides.items())
            if "error" in r:
                print(f"| {name} | {dtype} | {'streamed' if stream else 'exporter on the module'} | failed: "
                      f"{r['error'][:200]} |", flush=True)
                continue
            extra = r["peak"] - r["base"] - r["weights"]
            print(f"| {name} | {dtype} | {'streamed' if stream else 'exporter on the module'} | {gib(r['weights'])} "
                  f"| {gib(r['base'])} | {gib(r['peak'])} | {(r['peak'] - r['base']) / r['weights']:.2f} "
                  f"| {gib(extra)} | {r['seconds']:.0f} | {r['rel']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
