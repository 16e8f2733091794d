"""The command line end to end (in process, plus one real subprocess for the entry point)."""

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from catprune.cli.main import main, psnr


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


def test_entry_point_runs_as_module():
    done = subprocess.run([sys.executable, "-m", "catprune", "env"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "diffusers" in done.stdout


def test_generate_compare(tiny_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "cmp.png"
    rc = main(
        ["generate", "a large red circle at the center", "--model", tiny_pipeline_dir, "--steps", "6",
         "--start-step", "2", "--keep-ratio", "0.5", "--compare", "--out", str(out), "--json"]
    )  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "PSNR(CAT vs dense)" in text and "speed-up" in text
    report = json.loads(text[text.index("{") :])
    assert report["macs_ratio"] < 1 and report["psnr_db"] > 0
    image = Image.open(out)
    assert image.width > 2 * 128 and image.height > 128  # two panels side by side, with a header


def test_generate_dense_and_batch(tiny_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "img.png"
    assert main(["generate", "a small blue square at the top left", "--model", tiny_pipeline_dir, "--steps", "4",
                 "--dense", "--out", str(out)]) == 0  # fmt: skip
    assert Image.open(out).size == (128, 128)
    assert main(["generate", "a small blue square at the top left", "--model", tiny_pipeline_dir, "--steps", "5",
                 "--start-step", "2", "--batch-size", "2", "--out", str(out)]) == 0  # fmt: skip
    assert (tmp_path / "img_0.png").exists() and (tmp_path / "img_1.png").exists()
    assert "catprune stats" in capsys.readouterr().out


def test_generate_bad_input_is_a_clear_error(tiny_pipeline_dir, capsys):
    assert main(["generate", "a red circle", "--model", tiny_pipeline_dir, "--keep-ratio", "2"]) == 2
    assert "keep_ratio" in capsys.readouterr().err
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


def test_psnr():
    assert psnr(torch.zeros(3), torch.zeros(3)) == float("inf")
    assert psnr(torch.zeros(4), torch.full((4,), 0.1)) == pytest.approx(20.0)


def test_generate_with_the_default_embedded_model(tmp_path, capsys):
    """`catprune generate "a red circle"` on the shipped model, offline (few steps to keep CI fast)."""
    out = tmp_path / "red.png"
    assert main(["generate", "a red circle", "--steps", "4", "--start-step", "2", "--out", str(out)]) == 0
    image = Image.open(out).convert("RGB")
    assert image.size == (128, 128)
    assert "catprune stats" in capsys.readouterr().out
    assert main(["generate", "a red hexagon", "--steps", "2", "--out", str(out)]) == 2
    assert "hexagon" in capsys.readouterr().err  # unknown words are named


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


def test_bench_embedded_shapes_preset(capsys):
    """The shapes preset benchmarks the shipped model (pixel space: no VAE decode in the end-to-end time)."""
    assert main(["bench", "--preset", "shapes", "--sizes", "64x64", "--steps", "5", "--start-step", "2",
                 "--repeats", "1", "--dtype", "fp32"]) == 0  # fmt: skip
    row = capsys.readouterr().out.splitlines()[-1]
    assert row.startswith("shapes") and "64x64" in row


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


@pytest.mark.parametrize("preset", ["pixart-tiny", "flux-tiny"])
def test_bench_other_families(preset, capsys):
    """PixArt-Sigma and Flux presets run through their stock pipelines (Flux without a CFG batch by default)."""
    assert main(["bench", "--preset", preset, "--sizes", "64x48", "--steps", "5", "--start-step", "2",
                 "--repeats", "1", "--dtype", "fp32"]) == 0  # fmt: skip
    assert capsys.readouterr().out.splitlines()[-1].startswith(preset)


def test_bench_flux_refuses_a_cfg_batch():
    from catprune.bench import _embeddings, build_pipeline

    pipe, entry = build_pipeline("flux-tiny", "cpu", torch.float32)
    with pytest.raises(ValueError, match="no-cfg"):
        _embeddings(pipe, entry, 1, "cpu", torch.float32, cfg=True)
