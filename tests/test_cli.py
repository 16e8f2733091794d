"""The command line end to end (in process, plus one real subprocess for the entry point)."""

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import catprune
from catprune.cli.main import build_parser, main, psnr

SRC = str(Path(catprune.__file__).resolve().parents[1])


@pytest.fixture(scope="module")
def tiny_pipeline_dir(tmp_path_factory):
    from catprune.models.shapes import build_random_shapes_pipeline

    path = tmp_path_factory.mktemp("tiny_shapes")
    pipe = build_random_shapes_pipeline(seed=0, num_layers=2, attention_head_dim=8, num_attention_heads=2)
    pipe.save_pretrained(str(path))
    return str(path)


def test_env_prints_versions(capsys):
    assert main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["torch"] == torch.__version__ and "diffusers" in info and "cuda_available" in info


def _module(*argv, timeout=300):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")]))}
    return subprocess.run(
        [sys.executable, "-m", "catprune", *argv], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_entry_point_runs_as_module(tmp_path):
    """``python -m catprune`` is this source tree's CLI: its version, a real generation, and exit statuses."""
    done = _module("env", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["catprune"] == catprune.__version__
    out = tmp_path / "module.png"
    done = _module(
        "generate", "a red circle", "--model", "shapes", "--steps", "3", "--start-step", "2", "--out", str(out)
    )
    assert done.returncode == 0, done.stderr
    assert Image.open(out).size == (128, 128) and "(1 pruned)" in done.stdout
    done = _module("generate", "a red circle", "--height", "0")
    assert done.returncode == 2 and "argument --height: expected a positive integer, got '0'" in done.stderr
    assert "Traceback" not in done.stderr


def test_generate_compare(tiny_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "cmp.png"
    rc = main(
        ["generate", "a large red circle at the center", "--model", tiny_pipeline_dir, "--steps", "6",
         "--start-step", "2", "--keep-ratio", "0.5", "--compare", "--out", str(out), "--json"]
    )  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "PSNR(CAT vs dense)" in text and "speed-up" in text and "medians of 3 runs" in text
    report = json.loads(text[text.index("{") :])
    assert report["macs_ratio"] < 1 and 0 < report["psnr_db"] < math.inf and report["pruned_steps"] == 4
    assert report["repeats"] == 3 and len(report["dense_seconds_all"]) == len(report["cat_seconds_all"]) == 3
    assert report["dense_seconds"] == statistics.median(report["dense_seconds_all"])
    assert report["speedup"] == pytest.approx(report["dense_seconds"] / report["cat_seconds"])
    assert f"MACs ratio {report['macs_ratio']:.3f}" in text
    image = Image.open(out)
    assert image.width > 2 * 128 and image.height > 128  # two panels side by side, with a header
    assert f"PSNR {report['psnr_db']:.2f} dB" in image.text["Description"]  # the caption carries the PSNR
    header = np.asarray(image.convert("L"))[: image.height - 256, image.width // 2 :]
    assert (header < 128).sum() > 200  # and is drawn above the CAT panel


def test_generate_dense_and_batch(tiny_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "img.png"
    assert main(["generate", "a small blue square at the top left", "--model", tiny_pipeline_dir, "--steps", "4",
                 "--dense", "--out", str(out), "--json"]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert text.startswith("dense: ") and "catprune stats" not in text
    assert json.loads(text[text.index("{") :])["dense"] is True
    assert Image.open(out).size == (128, 128)
    assert main(["generate", "a small blue square at the top left", "--model", tiny_pipeline_dir, "--steps", "5",
                 "--start-step", "2", "--batch-size", "2", "--out", str(out), "--json"]) == 0  # fmt: skip
    text = capsys.readouterr().out
    report = json.loads(text[text.index("{") :])
    assert text.startswith("CAT: ") and "catprune stats: 5 steps (3 pruned), 4 rows" in text
    assert report["label"] == "CAT" and report["pruned_steps"] == 3 and 0 < report["macs_ratio"] < 1
    first, second = (np.asarray(Image.open(tmp_path / f"img_{i}.png")) for i in range(2))
    assert report["images"] == [str(tmp_path / "img_0.png"), str(tmp_path / "img_1.png")]
    assert first.shape == second.shape == (128, 128, 3) and not np.array_equal(first, second)


def test_generate_bad_input_is_a_clear_error(tiny_pipeline_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "a red circle", "--model", tiny_pipeline_dir, "--keep-ratio", "2"])
    assert exit_info.value.code == 2
    assert "argument --keep-ratio: expected a number in (0, 1]" in capsys.readouterr().err
    assert main(["generate", "a red circle", "--model", "/nonexistent/folder"]) == 2
    assert "could not load" in capsys.readouterr().err


def test_bench_tiny_preset_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    rc = main(["bench", "--preset", "sd3-tiny", "--sizes", "64x64,64x48", "--steps", "6", "--start-step", "3",
               "--repeats", "1", "--dtype", "fp32", "--json", str(path)])  # fmt: skip
    assert rc == 0
    data = json.loads(path.read_text())
    assert "environment" in data and len(data["results"]) == 2
    first = data["results"][0]
    assert first["macs_speedup"] > 1 and first["loop_speedup"] > 0 and first["cat"]["pruned_step_s"] > 0
    assert "MACs x" in capsys.readouterr().out


def test_bench_final_dense_steps_and_schedule(tmp_path, capsys):
    """``--final-dense-steps`` and ``--keep-ratio-end`` reach the CAT side (more MACs than without, recorded in the
    case); the planner's step-time rows count the final steps as dense and leave schedules out; bad values name the
    flag."""
    path, plain_path = tmp_path / "bench.json", tmp_path / "plain.json"
    common = ["bench", "--preset", "sd3-tiny", "--sizes", "64x64", "--steps", "8", "--start-step", "3", "--repeats",
              "1", "--dtype", "fp32", "--no-vae"]  # fmt: skip
    assert main([*common, "--json", str(plain_path)]) == 0
    assert main([*common, "--final-dense-steps", "2", "--json", str(path)]) == 0
    plain, final = (json.loads(p.read_text())["results"][0] for p in (plain_path, path))
    assert final["case"]["final_dense_steps"] == 2 and final["case"]["keep_ratio_end"] is None
    assert final["cat"]["macs"] > plain["cat"]["macs"] and final["cat"]["macs_dense"] == plain["cat"]["macs_dense"]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    try:
        from cost_rows_from_bench import rows_from_record
    finally:
        sys.path.pop(0)
    ratio = rows_from_record(json.loads(path.read_text()), "fd")[0]["pruned_macs_ratio"]
    plain_rows = rows_from_record(json.loads(plain_path.read_text()), "plain")
    assert ratio == pytest.approx(plain_rows[0]["pruned_macs_ratio"])
    schedule_path = tmp_path / "schedule.json"
    assert main([*common, "--keep-ratio-end", "0.6", "--json", str(schedule_path)]) == 0
    record = json.loads(schedule_path.read_text())
    assert record["results"][0]["case"]["keep_ratio_end"] == 0.6 and rows_from_record(record, "s") == []
    capsys.readouterr()
    for flag, value, words in (("--final-dense-steps", "-1", "integer >= 0"), ("--keep-ratio-end", "0", "(0, 1]")):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["bench", flag, value])
        err = capsys.readouterr().err
        assert f"argument {flag}" in err and words in err and repr(value) in err


def test_bench_bad_numbers_name_the_flag_before_any_model_is_built(monkeypatch, capsys):
    import catprune.bench

    def no_build(*args, **kwargs):
        raise AssertionError("a model was built for a command that must fail on its flags")

    monkeypatch.setattr(catprune.bench, "build_pipeline", no_build)
    for flag, value, words in (
        ("--keep-ratio", "2", "(0, 1]"),
        ("--steps", "0", "positive integer"),
        ("--steps", ",", "at least one value"),
        ("--batch-sizes", "0", "positive integer"),
        ("--repeats", "0", "positive integer"),
        ("--sizes", "64", "WxH"),
    ):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["bench", flag, value])
        err = capsys.readouterr().err
        assert f"argument {flag}" in err and words in err and repr(value) in err
    # in range for argparse, out of range for CATConfig: named by its flag, before the pipeline
    assert main(["bench", "--preset", "sd3-tiny", "--sizes", "64x64", "--start-step", "1"]) == 2
    err = capsys.readouterr().err
    assert "catprune bench: error: --start-step: expected an int >= 2" in err and "CATConfig" not in err


def test_bench_times_both_contexts_and_the_rows_name_them(tmp_path, capsys):
    """``--context reuse,extrapolate`` runs one case per context; scripts/cost_rows_from_bench.py carries the context
    into the planner's step-time rows (a record without it is the paper's reuse)."""
    path = tmp_path / "bench.json"
    rc = main(["bench", "--preset", "sd3-tiny", "--sizes", "64x64", "--steps", "6", "--start-step", "3",
               "--repeats", "1", "--dtype", "fp32", "--context", "reuse,extrapolate", "--forecast-max-ratio", "1",
               "--json", str(path)])  # fmt: skip
    assert rc == 0
    record = json.loads(path.read_text())
    cases = [r["case"] for r in record["results"]]
    assert [(c["context"], c["forecast_max_ratio"]) for c in cases] == [("reuse", 1.0), ("extrapolate", 1.0)]
    assert "extrapolate" in capsys.readouterr().out.splitlines()[-1]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    try:
        from cost_rows_from_bench import rows_from_record
    finally:
        sys.path.pop(0)
    rows = rows_from_record(record, "test")
    assert [r["context"] for r in rows] == ["reuse", "extrapolate"]
    steps = record["results"][0]["cat"]["step_s"]
    assert rows[0]["capture_ms"] == pytest.approx(steps[3 - 1] * 1e3, abs=1e-3)  # start 3: the capture is step 2
    for result in record["results"]:
        del result["case"]["context"]
    assert {r["context"] for r in rows_from_record(record, "old")} == {"reuse"}
    record["results"][1]["case"]["cache_dtype"] = "fp8"  # the planner's configurations keep the model's dtype
    assert [r["source"] for r in rows_from_record(record, "fp8")] == ["fp8 (steps 6, start 3)"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--context", "forecast"])


def test_psnr():
    assert psnr(torch.zeros(3), torch.zeros(3)) == float("inf")
    assert psnr(torch.zeros(4), torch.full((4,), 0.1)) == pytest.approx(20.0)


def test_generate_with_the_shapes_model(tmp_path, capsys):
    """`catprune generate "a red circle" --model shapes` on the shipped model, offline (few steps to keep CI fast)."""
    out, dense_out = tmp_path / "red.png", tmp_path / "dense.png"
    shapes = ["--model", "shapes"]
    assert main(["generate", "a red circle", *shapes, "--steps", "4", "--start-step", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("CAT: ") and "catprune stats: 4 steps (2 pruned), 2 rows x 1024 image tokens" in text
    assert main(["generate", "a red circle", *shapes, "--steps", "4", "--dense", "--out", str(dense_out)]) == 0
    capsys.readouterr()
    image = np.asarray(Image.open(out).convert("RGB")) / 255.0
    dense = np.asarray(Image.open(dense_out).convert("RGB")) / 255.0
    assert image.shape == (128, 128, 3)
    assert 20 < psnr(image, dense) < math.inf  # pruned (not identical), and close to the dense image
    red = (image[..., 0] > 0.6) & (image[..., 1] < 0.35) & (image[..., 2] < 0.35)
    assert 0.02 < red.mean() < 0.5  # a red shape on a background, not a blank or saturated image
    assert main(["generate", "a red hexagon", *shapes, "--steps", "2", "--out", str(out)]) == 2
    assert "hexagon" in capsys.readouterr().err  # unknown words are named


def test_scenes_is_the_default_model_of_generate(tmp_path, capsys):
    """Without --model, `generate` runs the embedded scenes model: a scenes caption works (few steps), a shapes
    caption is refused (exit 2, no traceback) with the tokenizer's error that names its unknown words."""
    from catprune.models import DEFAULT_MODEL, EXAMPLE_CAPTIONS

    args = build_parser().parse_args(["generate", "x"])
    assert DEFAULT_MODEL == "scenes" and args.model == "scenes"
    out = tmp_path / "owl.png"
    caption = EXAMPLE_CAPTIONS["scenes"]
    assert main(["generate", caption, "--steps", "3", "--start-step", "2", "--out", str(out), "--json"]) == 0
    text = capsys.readouterr().out
    report = json.loads(text[text.index("{") :])
    assert report["model"] == "scenes" and report["pruned_steps"] == 1 and Image.open(out).size == (128, 128)
    assert main(["generate", EXAMPLE_CAPTIONS["shapes"], "--dense", "--out", str(tmp_path / "bad.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("catprune generate: error: prompt 'a large red circle at the center' has words outside the "
                          "scenes vocabulary: ['circle', 'large']") and "Traceback" not in err  # fmt: skip
    assert "catprune.models.scenes.OBJECT_NAMES" in err and "an owl at the top left" in err
    assert not (tmp_path / "bad.png").exists()


def test_bench_reads_real_weights_from_a_pipeline_folder(tmp_path, capsys):
    from catprune.bench import build_pipeline

    pipe, _ = build_pipeline("sd3-tiny", "cpu", torch.float32, seed=3)
    pipe.transformer.save_pretrained(str(tmp_path / "transformer"))
    pipe.vae.save_pretrained(str(tmp_path / "vae"))
    loaded, entry = build_pipeline("sd3-tiny", "cpu", torch.float32, weights=str(tmp_path))
    weight = next(iter(pipe.transformer.state_dict().values()))
    assert torch.equal(next(iter(loaded.transformer.state_dict().values())), weight)
    assert main(["bench", "--preset", "sd3-tiny", "--weights", str(tmp_path), "--sizes", "64x64", "--steps", "5",
                 "--start-step", "2", "--repeats", "1", "--dtype", "fp32", "--no-vae"]) == 0  # fmt: skip
    assert "sd3-tiny" in capsys.readouterr().out
    assert main(["bench", "--preset", "sd3-tiny", "--weights", str(tmp_path / "missing")]) == 2
    assert "weights" in capsys.readouterr().err


def test_bench_text_encoders_stay_resident(monkeypatch):
    from catprune.bench import build_pipeline, families

    tiny = {
        "clip-l": dict(kind="clip", hidden_size=8, intermediate_size=16, num_attention_heads=2, num_hidden_layers=1,
                       projection_dim=8),
        "clip-g": dict(kind="clip", hidden_size=8, intermediate_size=16, num_attention_heads=2, num_hidden_layers=1,
                       projection_dim=8),
        "t5-xxl": dict(kind="t5", d_model=8, d_ff=16, d_kv=4, num_heads=2, num_layers=1, vocab_size=32),
    }  # fmt: skip
    monkeypatch.setattr(families, "TEXT_ENCODER_CONFIGS", tiny)
    pipe, _ = build_pipeline("sd3-tiny", "cpu", torch.float32, text_encoders=True)
    kinds = [type(m).__name__ for m in pipe._catprune_bench_resident]
    assert kinds == ["CLIPTextModelWithProjection", "CLIPTextModelWithProjection", "T5EncoderModel"]
    with pytest.raises(ValueError, match="preset"):
        build_pipeline("no-such-model", "cpu", torch.float32)


def test_bench_flux_refuses_a_cfg_batch():
    from catprune.bench import _embeddings, build_pipeline

    pipe, entry = build_pipeline("flux-tiny", "cpu", torch.float32)
    with pytest.raises(ValueError, match="no-cfg"):
        _embeddings(pipe, entry, 1, "cpu", torch.float32, cfg=True)


# ---------------------------------------------------------------- every flag checked before the model loads
MISSING = "/nonexistent/model/folder"  # a flag error must come before "could not load"


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--height", "0"], "argument --height: expected a positive integer, got '0'"),
        (["--width", "-8"], "argument --width: expected a positive integer, got '-8'"),
        (["--steps", "0"], "argument --steps: expected a positive integer"),
        (["--batch-size", "0"], "argument --batch-size: expected a positive integer"),
        (["--repeats", "0", "--compare"], "argument --repeats: expected a positive integer"),
        (["--guidance-scale", "nan"], "argument --guidance-scale: expected a finite number, got 'nan'"),
        (["--guidance-scale", "inf"], "argument --guidance-scale: expected a finite number, got 'inf'"),
        (["--keep-ratio", "nan"], "argument --keep-ratio: expected a finite number, got 'nan'"),
        (["--keep-ratio", "0"], "argument --keep-ratio: expected a number in (0, 1]"),
        (["--seed", "1180591620717411303424"], "argument --seed: expected an integer seed in [0, 2**63 - 1]"),
        (["--seed", "-1"], "argument --seed: expected an integer seed in [0, 2**63 - 1]"),
        (["--dtype", "fp64"], "argument --dtype: expected float32 (fp32), bfloat16 (bf16) or float16 (fp16)"),
        (["--backend", "tpu"], "argument --backend: invalid choice: 'tpu'"),
        (["--compare", "--dense"], "argument --dense: not allowed with argument --compare"),
    ],
)
def test_bad_flags_are_refused_by_name(extra, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "a red circle", "--model", MISSING, *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--device", "cuda"], "--device: got 'cuda', but this torch build sees no CUDA device"),
        (["--device", "tpu"], "--device: expected a torch device such as cpu or cuda, got 'tpu'"),
        (["--device", "cpu", "--backend", "cudagraph"], "--backend: 'cudagraph' captures CUDA graphs and needs"),
        (["--start-step", "1"], "--start-step: expected an int >= 2"),
        (["--repeats", "2"], "--repeats: only applies with --compare"),
    ],
)
def test_device_backend_and_config_errors_name_the_flag(extra, words, capsys):
    if "cuda" in extra and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["generate", "a red circle", "--model", MISSING, *extra]) == 2
    err = capsys.readouterr().err
    assert words in err and "CATConfig." not in err and "could not load" not in err


def test_output_path_is_checked_before_generating(tmp_path, capsys):
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    cases = [
        (str(tmp_path), "is a directory"),
        (str(afile / "image.png"), "is a file, not a directory"),
        (str(tmp_path / "image"), "expected an image file name ending in .png"),
        (str(tmp_path / "image.txt"), "expected an image file name ending in .png"),
    ]
    for out, words in cases:
        assert main(["generate", "a red circle", "--model", MISSING, "--out", out]) == 2
        err = capsys.readouterr().err
        assert f"--out: {out!r}" in err or f"--out: cannot create {out!r}" in err or f"got {out!r}" in err
        assert words in err and "could not load" not in err


def test_help_shows_defaults_and_the_backend_flag(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for words in ["(default: 0.3)", "(default: 8)", "(default: 0)", "(default: outputs/catprune.png)",
                  "--backend {eager,compile,cudagraph,compile+cudagraph}", "(default: eager)", "--repeats",
                  "(default: 3)", "(default: scenes)", "'shapes' (embedded, offline, the fast alternative"]:  # fmt: skip
        assert words in text, words


@pytest.mark.parametrize("spelling, name", [("fp32", "float32"), ("float32", "float32"), ("bf16", "bfloat16"),
                                            ("bfloat16", "bfloat16"), ("fp16", "float16"), ("float16", "float16")])  # fmt: skip
def test_dtype_spellings_are_the_same_for_every_subcommand(spelling, name):
    parser = build_parser()
    assert parser.parse_args(["generate", "x", "--dtype", spelling]).dtype == name
    assert parser.parse_args(["eval", "--dtype", spelling]).dtype == name
    assert parser.parse_args(["bench", "--dtype", spelling]).dtype == name


# ---------------------------------------------------------------- the CLI tells the truth
def test_a_run_that_prunes_nothing_is_warned_and_labelled_dense_equivalent(tiny_pipeline_dir, tmp_path, capsys):
    cat, dense = tmp_path / "cat.png", tmp_path / "dense.png"
    common = ["a red circle", "--model", tiny_pipeline_dir, "--steps", "3"]
    assert main(["generate", *common, "--out", str(cat), "--json"]) == 0  # default --start-step 8 >= 3 steps
    captured = capsys.readouterr()
    assert "warning: nothing will be pruned (--start-step 8 >= --steps 3" in captured.err
    assert captured.out.startswith("CAT (dense-equivalent: nothing pruned): ")
    report = json.loads(captured.out[captured.out.index("{") :])
    assert report["dense_equivalent"] is True and report["pruned_steps"] == 0
    assert main(["generate", *common, "--keep-ratio", "1", "--start-step", "2", "--out", str(tmp_path / "k.png")]) == 0
    captured = capsys.readouterr()
    assert "warning: nothing will be pruned (--keep-ratio 1 recomputes every token)" in captured.err
    assert captured.out.startswith("CAT (dense-equivalent: nothing pruned): ")
    assert main(["generate", *common, "--dense", "--out", str(dense)]) == 0
    assert "warning" not in capsys.readouterr().err
    assert np.array_equal(np.asarray(Image.open(cat)), np.asarray(Image.open(dense)))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "k.png")), np.asarray(Image.open(dense)))


def test_compare_with_identical_images_writes_valid_json(tiny_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "cmp.png"
    assert main(["generate", "a red circle", "--model", tiny_pipeline_dir, "--steps", "3", "--start-step", "2",
                 "--keep-ratio", "1", "--compare", "--repeats", "1", "--out", str(out), "--json"]) == 0  # fmt: skip
    captured = capsys.readouterr()
    text = captured.out

    def refuse(constant):
        raise AssertionError(f"not JSON: {constant}")

    report = json.loads(text[text.index("{") :], parse_constant=refuse)
    assert report["psnr_db"] is None and "identical" in report["psnr_note"]
    assert report["label"] == "CAT (dense-equivalent)" and report["dense_equivalent"] is True
    assert "PSNR(CAT vs dense) = inf (identical images)" in text
    assert "--repeats 1" in captured.err  # one run has no error bar, and the CLI says so
    assert "identical to dense" in Image.open(out).text["Description"]


def test_compare_says_when_timings_are_too_noisy(tiny_pipeline_dir, tmp_path, capsys, monkeypatch):
    import catprune.cli.main as cli

    real = cli._timed_call
    times = iter([9.0, 9.0, 1.0, 0.5, 2.0, 0.5, 1.0, 0.5])  # 2 warm-ups, then (dense, CAT) x 3
    monkeypatch.setattr(cli, "_timed_call", lambda *a, **k: (real(*a, **k)[0], next(times)))
    assert main(["generate", "a red circle", "--model", tiny_pipeline_dir, "--steps", "3", "--start-step", "2",
                 "--compare", "--out", str(tmp_path / "c.png"), "--json"]) == 0  # fmt: skip
    captured = capsys.readouterr()
    report = json.loads(captured.out[captured.out.index("{") :])
    assert report["dense_seconds_all"] == [1.0, 2.0, 1.0] and report["cat_seconds_all"] == [0.5, 0.5, 0.5]
    assert report["speedup"] == 2.0 and report["dense_spread"] == 1.0 and report["timing_noisy"] is True
    assert "too noisy to trust" in captured.err and "dense 100%" in captured.err


def test_empty_prompt_warns_that_it_is_the_unconditional_image(tiny_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "empty.png"
    assert main(["generate", "", "--model", tiny_pipeline_dir, "--steps", "2", "--dense", "--out", str(out)]) == 0
    assert "the prompt is empty: this generates the unconditional image" in capsys.readouterr().err
    assert out.exists()


def test_ctrl_c_prints_one_line_exits_130_and_leaves_no_partial_image(tiny_pipeline_dir, tmp_path, capsys,
                                                                      monkeypatch):  # fmt: skip
    from PIL import Image as PILImage

    out = tmp_path / "keep.png"
    out.write_bytes(b"previous image")
    real_save = PILImage.Image.save

    def interrupted_save(self, fp, *args, **kwargs):
        real_save(self, fp, *args, **kwargs)  # the bytes are written ...
        raise KeyboardInterrupt  # ... and Ctrl-C arrives before the file is complete

    monkeypatch.setattr(PILImage.Image, "save", interrupted_save)
    rc = main(["generate", "a red circle", "--model", tiny_pipeline_dir, "--steps", "2", "--dense", "--out", str(out)])
    assert rc == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "catprune generate: interrupted (no partial image written)"
    assert "Traceback" not in err
    assert out.read_bytes() == b"previous image"  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.png"]  # and no temporary file is left


def test_generate_selection_context_and_final_dense_steps(tiny_pipeline_dir, tmp_path, capsys):
    """``--selection``, ``--context`` and ``--final-dense-steps`` reach the CATConfig of a single image and of a
    batch run (its settings, hence its fingerprint); ``--speedup`` refuses them; a bad value names the flag."""
    out = tmp_path / "drift.png"
    flags = ["--selection", "drift", "--context", "extrapolate", "--final-dense-steps", "1"]
    assert main(["generate", "a large red circle at the center", "--model", tiny_pipeline_dir, "--steps", "6",
                 "--start-step", "2", *flags, "--out", str(out), "--json"]) == 0  # fmt: skip
    text = capsys.readouterr().out
    report = json.loads(text[text.index("{") :])
    config = report["config"]
    assert (config["selection"], config["context"], config["final_dense_steps"]) == ("drift", "extrapolate", 1)
    assert report["pruned_steps"] == 3  # 6 steps: 2 warm-up, 3 pruned, 1 final dense
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a small blue square at the top left\n")
    assert main(["generate", "--prompts", str(prompts), "--model", tiny_pipeline_dir, "--steps", "4",
                 "--start-step", "2", *flags, "--out", str(tmp_path / "run"), "--no-progress"]) == 0  # fmt: skip
    capsys.readouterr()
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["settings"]["catprune"]["selection"] == "drift"
    assert manifest["settings"]["catprune"]["final_dense_steps"] == 1
    assert main(["generate", "a red circle", "--speedup", "2", "--final-dense-steps", "2"]) == 2
    assert "cannot be combined with --final-dense-steps" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "a red circle", "--final-dense-steps", "-1"])
    assert "argument --final-dense-steps" in capsys.readouterr().err


def test_bench_too_large_size_names_the_flag_before_timing(tmp_path, capsys):
    """A size beyond what the preset's transformer places (SD3's pos_embed_max_size) fails before the first case
    with the limit in pixels and the flag; nothing is timed or written."""
    path = tmp_path / "bench.json"
    rc = main(["bench", "--preset", "sd3-tiny", "--sizes", "64x64,4096x4096", "--steps", "4", "--start-step", "2",
               "--repeats", "1", "--json", str(path)])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert "--sizes: expected at most 256 pixels per side for --preset sd3-tiny" in err and "got 4096x4096" in err
    assert not path.exists() and "Traceback" not in err
