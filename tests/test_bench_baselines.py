"""``catprune bench --dense-baseline`` / ``--split`` on CPU with the tiny preset (few steps, one repeat), and
``scripts/profile_step.py``'s CPU path."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from catprune.bench import MethodResult
from catprune.bench.baselines import CHOICES, check_dense_baseline, install, pick_best, split
from catprune.bench.cli import cmd_bench
from catprune.cli.main import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["bench", "--preset", "sd3-tiny", "--sizes", "64x64", "--start-step", "3", "--repeats", "1", "--dtype", "fp32",
        "--modes", "eager"]  # fmt: skip


def test_dense_baseline_flag_accepts_every_choice_and_defaults_to_same():
    parser = build_parser()
    assert parser.parse_args(["bench"]).dense_baseline == "same"
    for name in CHOICES:
        assert parser.parse_args(["bench", "--dense-baseline", name]).dense_baseline == name


def test_dense_baseline_flag_error_names_flag_expected_received_and_fix(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["bench", "--dense-baseline", "fastest"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --dense-baseline: expected one of same, best, eager, compile" in err
    assert "got 'fastest'" in err and "Use best" in err


def test_dense_baseline_check_in_the_library():
    with pytest.raises(ValueError, match=r"dense_baseline: expected one of .*got 'compile:fast'.*Use 'best'"):
        check_dense_baseline("compile:fast")


@pytest.mark.parametrize("name", ["cudagraph", "compile:reduce-overhead"])
def test_cuda_only_baselines_are_refused_on_cpu_before_building_models(name, capsys):
    assert main([*TINY, "--steps", "5", "--dense-baseline", name, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"dense_baseline: {name!r}" in err and "needs a CUDA device, got cpu" in err and "Use 'eager'" in err


def test_pick_best_keeps_the_minimum_of_the_timed_candidates():
    fake = {"eager": 0.050, "compile": 0.042, "compile:max-autotune-no-cudagraphs": 0.044, "cudagraph": 0.046}
    asked = []
    winner, times = pick_best(list(fake), lambda name: asked.append(name) or fake[name])
    assert winner == "compile" and times == fake and asked == list(fake)
    assert pick_best(["eager", "compile"], lambda name: 1.0)[0] == "eager"  # ties: the first
    with pytest.raises(ValueError, match="at least one candidate"):
        pick_best([], lambda name: 1.0)


def test_install_compile_and_undo_leave_the_module_as_it_was():
    layer = torch.nn.Linear(4, 4)
    undo = install(layer, "compile:max-autotune-no-cudagraphs")  # compiles lazily: nothing runs here
    assert "forward" in layer.__dict__
    undo()
    assert "forward" not in layer.__dict__ and layer.forward.__func__ is torch.nn.Linear.forward
    undo = install(layer, "eager")
    undo()
    assert "forward" not in layer.__dict__


def test_best_dense_baseline_reports_winner_and_all_candidates(tmp_path, capsys):
    path = tmp_path / "bench.json"
    fake = {"eager": 0.010, "compile": 0.030, "compile:max-autotune-no-cudagraphs": 0.020}  # eager wins: no compile
    asked = []
    args = build_parser().parse_args([*TINY, "--steps", "5,6", "--dense-baseline", "best", "--split", "--json",
                                      str(path)])  # fmt: skip
    assert cmd_bench(args, time_candidate=lambda name: asked.append(name) or fake[name]) == 0
    assert sorted(asked) == sorted(list(fake) * 2)  # once per step count, the CUDA-only ones skipped on a CPU
    data = json.loads(path.read_text())
    for result in data["results"]:
        baseline = result["baseline"]
        assert baseline["requested"] == "best" and baseline["name"] == "eager"
        assert baseline["candidates_ms"] == pytest.approx({k: 1e3 * v for k, v in fake.items()})
        if not torch.cuda.is_available():
            assert set(baseline["skipped"]) == {"cudagraph", "compile:reduce-overhead"}
        assert result["dense"]["macs"] == result["dense"]["macs_dense"] == result["cat"]["macs_dense"]
        assert result["dense"]["pruned_step_s"] is None and result["dense"]["loop_s"] > 0
        sp = result["split"]
        assert sp["full_selection_step_ms"] > 0 and sp["pruned_step_ms"] > 0 and sp["pruning_macs_x"] > 1
        assert sp["pruning_efficiency"] == pytest.approx(sp["pruning_x"] / sp["pruning_macs_x"])
    summary = data["summary"]
    assert [g["steps"] for g in summary] == [5, 6]
    assert all(g["dense_baseline"] == "eager" and g["best_cat_mode"] == "eager" for g in summary)
    out = capsys.readouterr().out
    assert "dense candidates (ms/step): eager 10.00 *, compile 30.00" in out and "split eager 64x64" in out
    assert out.splitlines()[-1].startswith("sd3-tiny") and out.splitlines()[-1].endswith("eager")


def test_dense_candidates_limit_what_best_times(tmp_path, capsys):
    path = tmp_path / "bench.json"
    asked = []
    args = build_parser().parse_args([*TINY, "--steps", "5", "--dense-baseline", "best", "--dense-candidates",
                                      "eager,compile", "--json", str(path)])  # fmt: skip
    assert cmd_bench(args, time_candidate=lambda name: asked.append(name) or {"eager": 2.0, "compile": 3.0}[name]) == 0
    assert asked == ["eager", "compile"]
    baseline = json.loads(path.read_text())["results"][0]["baseline"]
    assert baseline["name"] == "eager" and baseline["skipped"]["compile:max-autotune-no-cudagraphs"]
    assert main([*TINY, "--steps", "5", "--dense-baseline", "best", "--dense-candidates", "eager,jit"]) == 2
    err = capsys.readouterr().err
    assert "dense_candidates: expected names among eager, compile" in err and "got 'jit'" in err
    assert "Pass e.g. --dense-candidates" in err


def test_default_dense_side_is_catprunes_dense_path_in_the_same_mode(tmp_path):
    path = tmp_path / "bench.json"
    assert main([*TINY, "--steps", "5", "--json", str(path)]) == 0
    result = json.loads(path.read_text())["results"][0]
    assert result["baseline"]["requested"] == "same" and result["baseline"]["candidates_ms"] == {}
    assert result["split"] is None


def test_split_arithmetic():
    def method(step_s, macs):
        return MethodResult(1.0, [], 0.05, step_s, 0.0, 0, 0, pruned_step_macs=macs)

    sp = split(0.050, method(0.045, 1000), method(0.025, 400))
    assert sp["implementation_x"] == pytest.approx(0.050 / 0.045)
    assert sp["pruning_x"] == pytest.approx(1.8) and sp["pruning_macs_x"] == pytest.approx(2.5)
    assert sp["pruning_efficiency"] == pytest.approx(1.8 / 2.5)
    assert "pruning_efficiency" not in split(0.05, method(None, None), method(0.025, 400))


# ---------------------------------------------------------------------------------------- scripts/profile_step.py
@pytest.mark.parametrize(
    "name, category",
    [
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "GEMM"),
        ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT", "GEMM"),
        ("triton_tem_fused_addmm_3", "GEMM"),
        ("void flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, cutlass::bfloat16_t>>", "attention/SDPA"),
        ("void at::native::sbtopk::gatherTopK<float, unsigned int, 2>", "selection/topk/sort"),
        ("void cub::DeviceRadixSortOnesweepKernel<Policy900>", "selection/topk/sort"),
        ("void at::native::indexSelectLargeIndex<c10::BFloat16, long, unsigned int, 2, 2, -2, true>", "gather/scatter/index"),
        ("void at::native::_scatter_gather_elementwise_kernel<128, 4>", "gather/scatter/index"),
        ("Memcpy DtoD (Device -> Device)", "copies"),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::direct_copy_kernel_cuda>", "copies"),
        ("triton_per_fused_native_layer_norm_1", "elementwise/norm"),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>", "elementwise/norm"),
        ("cudaLaunchKernelExC_v11060", "other"),
    ],
)  # fmt: skip
def test_kernel_names_fall_into_their_category(name, category):
    from catprune.bench.profiling import categorize

    assert categorize(name) == category


def test_profile_step_cpu_path_categories_sum_to_the_total(tmp_path):
    path = tmp_path / "profile.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "profile_step.py"), "--device", "cpu", "--kinds", "stock,pruned",
           "--replays", "2", "--json", str(path), "--operators"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(path.read_text())
    assert report["preset"] == "sd3-tiny" and list(report["kinds"]) == ["stock", "pruned"]
    for row in report["kinds"].values():
        assert row["kernel_ms"] > 0 and row["wall_ms"] > 0
        assert sum(row["categories"].values()) == pytest.approx(row["kernel_ms"])
        assert set(row["categories"]) >= {"GEMM", "attention/SDPA", "gather/scatter/index", "other"}
    assert report["kinds"]["pruned"]["phases"] == ["pruned", "pruned"]
    assert report["kinds"]["pruned"]["tokens_computed"] == round(0.3 * 16 * 16)
    assert "GEMM" in out.stdout and "wall - kernels" in out.stdout
    ops = report["kinds"]["pruned"]["operators"]  # [name, input shapes, ms per call, occurrences per call]
    assert ops and "top pruned operators" in out.stdout
    assert all(a[2] >= b[2] > 0 for a, b in zip(ops, ops[1:], strict=False))  # by self time, largest first
    assert any(name in ("aten::addmm", "aten::mm", "aten::linear") for name, *_ in ops)  # the GEMMs are there
