"""One device call: check the fast backends against eager, then time dense vs CAT (speed targets).

Usage (on a GPU machine, diffusers importable):
    python scripts/device_bench.py --out $OUT [--part main|scaling|all]

Writes bench JSON + a log under --out and prints the table last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

import catprune
from catprune.bench import (
    BenchCase,
    build_pipeline,
    environment,
    format_details,
    format_table,
    run_case,
    save_json,
)
from catprune.evaluation.machine import cuda_sync


def rel_err(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def random_call(device, seed: int) -> dict:
    """Random inputs of one SD3-medium transformer call at 1024x1024 with CFG (batch 2), bf16."""
    g = torch.Generator("cpu").manual_seed(seed)
    return dict(
        hidden_states=torch.randn(2, 16, 128, 128, generator=g).to(device, torch.bfloat16),
        encoder_hidden_states=torch.randn(2, 333, 4096, generator=g).to(device, torch.bfloat16),
        pooled_projections=torch.randn(2, 2048, generator=g).to(device, torch.bfloat16),
        timestep=torch.tensor([500.0, 500.0], device=device),
        return_dict=False,
    )


def check_backends(pipe, entry, out) -> dict:
    """CAT eager vs dense latents (12 steps), and a full-selection pruned step against the dense step in bf16.
    (The backends are compared against eager on the bench's own runs, see main.)"""
    from catprune.adapters import BufferStore, adapter_for
    from catprune.bench import _embeddings

    device = "cuda"
    embeds = _embeddings(pipe, entry, 1, device, torch.bfloat16)
    kwargs = dict(**embeds, height=1024, width=1024, num_inference_steps=12, output_type="latent")
    report = {}
    with torch.no_grad():
        catprune.apply(pipe, catprune.CATConfig(keep_ratio=0.3, start_step=4))
        cat = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(0)).images
        catprune.remove(pipe)
        dense = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(0)).images
        report["latents CAT eager vs dense, 12 steps (rel err)"] = rel_err(cat, dense)

        model = pipe.transformer
        adapter = adapter_for(model)
        call = random_call(device, seed=1)
        info = adapter.inspect_call((), call)
        caches = [BufferStore() for _ in model.transformer_blocks]
        with adapter.capture(caches, info):
            dense_out = model(**call)[0]
        idx = torch.arange(info.num_tokens, device=device).expand(2, -1)
        full = adapter.build_output(adapter.pruned_forward(caches, idx, info), info)[0]
        report["full-selection pruned step vs dense step (rel err, bf16)"] = rel_err(full, dense_out)
        # how much of the speed-up is implementation rather than pruning: the bench's split (--split, on by default
        # here) times catprune's full-selection step through the public API in every timed case
    for key, value in report.items():
        print(f"CHECK {key}: {value:.4g}", flush=True)
    with open(os.path.join(out, "checks.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report


def check_modes(pipe, entry) -> None:
    """The fast backends give the eager path's images within bf16 tolerance: final CAT latents of one 12-step
    generation (start_step 4) under each backend, against eager."""
    from catprune.bench import _embeddings

    embeds = _embeddings(pipe, entry, 1, "cuda", torch.bfloat16)
    kwargs = dict(**embeds, height=1024, width=1024, num_inference_steps=12, output_type="latent")
    latents = {}
    with torch.no_grad():
        for mode in ("eager", "cudagraph", "compile+cudagraph"):
            catprune.apply(pipe, catprune.CATConfig(keep_ratio=0.3, start_step=4, backend=mode))
            for _ in range(2):  # the second generation replays the captured graphs
                latents[mode] = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(0)).images
        catprune.remove(pipe)
        dense = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(0)).images
        # the scale of compile's own bf16 drift: the dense model, stock vs compiled (through catprune's backend)
        catprune.apply(pipe, catprune.CATConfig(start_step=10**6, backend="compile+cudagraph"))
        for _ in range(2):
            dense_compiled = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(0)).images
        catprune.remove(pipe)
    print(f"CHECK dense latents compile+cudagraph vs eager, 12 steps (rel err): {rel_err(dense_compiled, dense):.2e}")
    for mode in ("cudagraph", "compile+cudagraph"):
        print(f"CHECK CAT latents {mode} vs eager, 12 steps (rel err): {rel_err(latents[mode], latents['eager']):.2e}")
    print(f"CHECK CAT eager vs dense latents, 12 steps (rel err, for scale): {rel_err(latents['eager'], dense):.2e}")


def profile_steps(pipe, out) -> None:
    """Kernel-time profile of one eager dense step and one eager pruned step (k = 0.3 M), for the write-up."""
    from torch.profiler import ProfilerActivity, profile

    from catprune.adapters import BufferStore, adapter_for

    model = pipe.transformer
    adapter = adapter_for(model)
    device = "cuda"
    g = torch.Generator("cpu").manual_seed(2)
    call = random_call(device, seed=2)
    info = adapter.inspect_call((), call)
    caches = [BufferStore() for _ in model.transformer_blocks]
    idx = torch.randperm(info.num_tokens, generator=g)[: round(0.3 * info.num_tokens)].sort().values
    idx = idx.to(device).expand(2, -1).contiguous()
    with torch.no_grad():
        with adapter.capture(caches, info):
            model(**call)
        for _ in range(2):
            model(**call)
            adapter.pruned_forward(caches, idx, info)
        cuda_sync()
        for name, fn in (
            ("dense", lambda: model(**call)),
            ("pruned", lambda: adapter.pruned_forward(caches, idx, info)),
        ):
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn()
                cuda_sync()
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60)
            total = sum(e.self_device_time_total for e in prof.key_averages()) / 1e3
            print(f"PROFILE {name}: total kernel time {total:.2f} ms", flush=True)
            with open(os.path.join(out, f"profile_{name}.txt"), "w") as f:
                f.write(f"total kernel time {total:.2f} ms\n{table}")
            print(table, flush=True)


def offload_check(pipe, entry) -> None:
    """CAT applied after pipe.enable_model_cpu_offload() gives the same latents as on a resident model."""
    from catprune.bench import _embeddings

    embeds = _embeddings(pipe, entry, 1, "cuda", torch.bfloat16)
    kwargs = dict(**embeds, height=512, width=512, num_inference_steps=6, output_type="latent")
    config = catprune.CATConfig(keep_ratio=0.3, start_step=2)
    report = {}
    with torch.no_grad():
        catprune.apply(pipe, config)
        resident = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(0)).images
        catprune.remove(pipe)
        pipe.to("cpu")
        pipe.enable_model_cpu_offload()
        catprune.apply(pipe, config)  # after enabling offload
        after = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(0)).images
        report["offload, applied after enabling (rel err vs resident)"] = rel_err(after, resident)
        report["offload, stats pruned steps"] = catprune.stats(pipe).pruned_steps
        catprune.remove(pipe)
    for key, value in report.items():
        print(f"CHECK {key}: {value}", flush=True)


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--part", default="main", choices=["main", "scaling", "all", "none"])
    parser.add_argument("--modes", default="eager,cudagraph,compile+cudagraph")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--offload", action="store_true")
    parser.add_argument("--no-check", action="store_true")
    parser.add_argument("--check-modes", action="store_true", help="CAT latents per backend against eager")
    parser.add_argument("--text-encoders", action="store_true", help="resident random text encoders (peak memory)")
    parser.add_argument("--steps", default="28,50")
    parser.add_argument(
        "--dense-baseline", default="same", help="the dense side of every case (catprune bench --dense-baseline)"
    )
    parser.add_argument("--no-split", action="store_true", help="skip timing catprune's full-selection step")
    parser.add_argument(
        "--presets", default="", help="extra presets, one 1024x1024 28-step cudagraph row each (family defaults)"
    )
    return parser.parse_args()


def main():
    args = parse_args()
    os.makedirs(args.out, exist_ok=True)
    print(json.dumps(environment()), flush=True)
    start = time.time()
    pipe, entry = build_pipeline("sd3-medium", "cuda", torch.bfloat16, text_encoders=args.text_encoders)
    results = []
    dense_side = dict(dense_baseline=args.dense_baseline, split=not args.no_split)
    json_path = os.path.join(args.out, f"bench_{args.part}.json")
    if args.check_modes:
        check_modes(pipe, entry)
        print(f"mode checks done at {time.time() - start:.0f}s", flush=True)
    if args.part in ("main", "all"):
        if not args.no_check:
            check_backends(pipe, entry, args.out)
            print(f"checks done at {time.time() - start:.0f}s", flush=True)
        if args.profile:
            profile_steps(pipe, args.out)

        for mode in args.modes.split(","):
            for steps in [int(x) for x in args.steps.split(",") if x]:
                case = BenchCase(steps=steps, mode=mode, repeats=3, **dense_side)
                results.append(run_case(case, pipe=pipe, entry=entry, device="cuda"))
                print(format_table(results[-1:]).splitlines()[-1], f"t={time.time() - start:.0f}s", flush=True)
                save_json(results, json_path)
        # the fast backends must give the eager path's images (bf16 tolerance): compare final CAT latents
        try:
            from torch._dynamo.utils import counters

            print("DYNAMO", dict(counters["stats"]), "graph_breaks:", dict(counters["graph_break"]), flush=True)
        except Exception as exc:  # diagnostics only
            print("DYNAMO counters unavailable:", exc)
        by_mode = {r.case.mode: r.latents for r in results if r.case.steps == 28}
        for mode, lat in by_mode.items():
            if mode != "eager" and "eager" in by_mode:
                print(f"CHECK CAT latents {mode} vs eager, 28 steps (rel err): {rel_err(lat, by_mode['eager']):.2e}")
    if args.part in ("scaling", "all"):
        mode = "cudagraph"
        for (w, h), batch in (((512, 512), 1), ((2048, 2048), 1), ((1344, 768), 1), ((1024, 1024), 4)):
            case = BenchCase(width=w, height=h, batch_size=batch, steps=28, mode=mode, repeats=1, **dense_side)
            results.append(run_case(case, pipe=pipe, entry=entry, device="cuda"))
            print(format_table(results[-1:]).splitlines()[-1], f"t={time.time() - start:.0f}s", flush=True)
            save_json(results, json_path)
    for preset in [p for p in args.presets.split(",") if p]:
        try:
            del pipe
            torch.cuda.empty_cache()
            pipe, entry = build_pipeline(preset, "cuda", torch.bfloat16)
            size = 128 if preset == "shapes" else 1024
            case = BenchCase(
                preset=preset, width=size, height=size, steps=28, mode="cudagraph", repeats=3, **dense_side
            )
            results.append(run_case(case, pipe=pipe, entry=entry, device="cuda"))
            print(format_table(results[-1:]).splitlines()[-1], f"t={time.time() - start:.0f}s", flush=True)
            save_json(results, json_path)
        except Exception as exc:  # one preset failing must not lose the others' rows
            print(f"PRESET {preset} failed: {type(exc).__name__}: {exc}", flush=True)
            pipe = None
    if args.offload and pipe is not None and not args.presets:  # last: it moves the pipeline to the CPU
        try:
            offload_check(pipe, entry)
        except Exception as exc:  # reported, not fatal for the timing run
            print(f"CHECK offload failed: {type(exc).__name__}: {exc}", flush=True)
    print(format_details(results))
    print(f"device: {torch.cuda.get_device_name()}  total {time.time() - start:.0f}s")
    print(format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
