"""Device probe for the pruned-step implementation (speed targets): per-step replay times of variants, one profile.

Times single transformer calls (SD3-medium config, random weights, bf16, 1024x1024, CFG batch 2, keep 0.3) as
CUDA-graph replays, median of 30, for: the stock dense step and the pruned step as implemented now ("addcmul"),
each eager-in-graph and under torch.compile, plus "regional" (torch.compile of each block function, cache writes
inside). Prints a table last. (The block before the addcmul rewrite, "unfused", was compared here until the block
took the text lane; docs/measurements.md keeps its numbers.)

Usage: python scripts/probe_fastpath.py --out $OUT
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from catprune.adapters import BufferStore, adapter_for
from catprune.adapters.sd3 import SD3Adapter
from catprune.bench import build_pipeline, graph_replay_ms
from catprune.evaluation.machine import cuda_sync


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch._dynamo.config.cache_size_limit = 64
    start = time.time()
    pipe, entry = build_pipeline("sd3-medium", "cuda", torch.bfloat16)
    model = pipe.transformer
    adapter = adapter_for(model)
    g = torch.Generator("cpu").manual_seed(0)
    call = dict(
        hidden_states=torch.randn(2, 16, 128, 128, generator=g).to("cuda", torch.bfloat16),
        encoder_hidden_states=torch.randn(2, 333, 4096, generator=g).to("cuda", torch.bfloat16),
        pooled_projections=torch.randn(2, 2048, generator=g).to("cuda", torch.bfloat16),
        timestep=torch.tensor([500.0, 500.0], device="cuda"),
        return_dict=False,
    )
    info = adapter.inspect_call((), call)
    inputs = adapter.fast_inputs(info)
    caches = [BufferStore() for _ in model.transformer_blocks]
    m = info.num_tokens
    k = round(0.3 * m)
    idx = torch.randperm(m, generator=g)[:k].sort().values.to("cuda").expand(2, -1).contiguous()
    rows = []
    with torch.no_grad():
        with adapter.capture(caches, info):
            model(**call)
        dense = adapter.dense_fn(model.forward)
        fused_block = SD3Adapter._block

        def pruned_with(block_impl):
            SD3Adapter._block = block_impl
            fn = adapter.pruned_fn(caches, info)
            return lambda **t: fn(idx=idx, **t)

        variants = [("dense", "eager", lambda: dense)]
        variants += [("pruned addcmul", "eager", lambda: pruned_with(fused_block))]
        variants += [("dense", "compile", lambda: torch.compile(dense, dynamic=False))]
        variants += [("pruned addcmul", "compile", lambda: torch.compile(pruned_with(fused_block), dynamic=False))]

        def regional():
            compiled = torch.compile(fused_block, dynamic=False)
            return pruned_with(compiled)

        variants += [("pruned addcmul", "regional", regional)]
        for name, mode, make in variants:
            t0 = time.time()
            try:
                fn = make()
                ms, graphed = graph_replay_ms(fn, inputs, repeats=30)
                out = graphed.output.clone()
                SD3Adapter._block = fused_block
                ref = pruned_with(fused_block)(**inputs) if name.startswith("pruned") else dense(**inputs)
                err = float((out.float() - ref.float()).norm() / ref.float().norm())
            except Exception as exc:
                print(f"VARIANT {name} {mode} failed: {type(exc).__name__}: {exc}", flush=True)
                continue
            finally:
                SD3Adapter._block = fused_block
            rows.append((name, mode, ms, err))
            print(f"VARIANT {name:16s} {mode:9s} {ms:8.2f} ms  rel err vs eager {err:.1e}  ({time.time() - t0:.0f}s)")

        # the profile of the compiled pruned step (no graph): what does inductor leave?
        from torch.profiler import ProfilerActivity, profile

        for label, fn in (
            ("pruned addcmul eager", pruned_with(fused_block)),
            ("pruned addcmul compile", torch.compile(pruned_with(fused_block), dynamic=False)),
        ):
            for _ in range(2):
                fn(**inputs)
            cuda_sync()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn(**inputs)
                cuda_sync()
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=70)
            total = sum(e.self_device_time_total for e in prof.key_averages()) / 1e3
            with open(os.path.join(args.out, f"profile_{label.replace(' ', '_')}.txt"), "w") as f:
                f.write(f"total kernel time {total:.2f} ms\n{table}")
            print(f"PROFILE {label}: total kernel time {total:.2f} ms\n{table}", flush=True)

        # attention backends at the pruned and dense shapes
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kv = caches[0]["attn"]
        for label, q_len in (("pruned", k + 333), ("dense", m + 333)):
            q = torch.randn(2, q_len, 24, 64, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
            kk, vv = kv[0].transpose(1, 2), kv[1].transpose(1, 2)
            for backend in (
                None,
                SDPBackend.CUDNN_ATTENTION,
                SDPBackend.FLASH_ATTENTION,
                SDPBackend.EFFICIENT_ATTENTION,
            ):

                def attn(q=q, kk=kk, vv=vv, backend=backend):
                    if backend is None:
                        return torch.nn.functional.scaled_dot_product_attention(q, kk, vv)
                    with sdpa_kernel([backend]):
                        return torch.nn.functional.scaled_dot_product_attention(q, kk, vv)

                try:
                    ms, _ = graph_replay_ms(lambda: attn(), {}, repeats=30)
                    print(f"SDPA {label} q={q_len} {backend}: {ms * 24:.2f} ms per step (24 blocks)", flush=True)
                except Exception as exc:
                    print(f"SDPA {label} {backend} failed: {type(exc).__name__}: {str(exc)[:200]}")
    print(f"device: {torch.cuda.get_device_name()}  total {time.time() - start:.0f}s")
    print(f"{'variant':18s}{'mode':>10s}{'ms/step':>10s}{'rel err':>10s}")
    for name, mode, ms, err in rows:
        print(f"{name:18s}{mode:>10s}{ms:>10.2f}{err:>10.1e}")


if __name__ == "__main__":
    main()
