"""Batch generation (``catprune generate --prompts FILE --out DIR``): outputs, resume after SIGKILL, torch.distributed
sharding, and every bad-input case. CPU, a tiny random shapes pipeline, 3 steps at 32x32, six prompts."""

import errno
import io
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from catprune.batch import Item, make_batches, read_prompts, shard
from catprune.batch.progress import Progress
from catprune.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "a large red circle at the center",
    "a small blue square at the top left",
    "a large green triangle at the bottom right",
    "a small yellow circle at the center",
    "a large purple square at the top right",
    "a small cyan triangle at the bottom left",
]
IDS = [f"{i:06d}" for i in range(1, 7)]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from catprune.models.shapes import build_random_shapes_pipeline

    path = tmp_path_factory.mktemp("tiny_shapes")
    build_random_shapes_pipeline(seed=0, num_layers=2, attention_head_dim=8, num_attention_heads=2).save_pretrained(
        str(path)
    )
    return str(path)


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def args(tiny_model, prompts, out, *extra):
    return ["generate", "--prompts", str(prompts), "--out", str(out), "--model", tiny_model, "--steps", "3",
            "--start-step", "2", "--keep-ratio", "0.5", "--height", "32", "--width", "32", "--batch-size", "2",
            "--no-progress", *extra]  # fmt: skip


def images(out) -> dict[str, bytes]:
    return {p.stem: p.read_bytes() for p in sorted(Path(out).glob("*.png"))}


def temporaries(out) -> list[str]:
    return [p.name for p in Path(out).iterdir() if p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def reference(tiny_model, prompt_file, tmp_path_factory):
    """An uninterrupted one-process run: the bytes every other run must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "out"
    assert main(args(tiny_model, prompt_file, out)) == 0
    return out, images(out)


def _subprocess_env():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


# ---------------------------------------------------------------------------------------------- outputs and resume
def test_run_writes_images_sidecars_manifest_and_skips_done(reference, tiny_model, prompt_file, capsys):
    out, ref = reference
    assert sorted(ref) == IDS and not temporaries(out)
    sidecar = json.loads((out / "000002.json").read_text())
    assert sidecar["prompt"] == PROMPTS[1] and sidecar["id"] == "000002" and sidecar["num_inference_steps"] == 3
    assert sidecar["catprune"]["keep_ratio"] == 0.5 and 0 < sidecar["macs_ratio"] < 1
    assert sidecar["tokens_computed"] < sidecar["tokens_dense"] and sidecar["seconds"] > 0
    assert Image.open(out / "000002.png").size == (32, 32)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["finished"] and manifest["counts"]["done"] == 6 and manifest["counts"]["generated"] == 6
    assert 0 < manifest["macs"]["saved_fraction"] < 1 and manifest["images_per_s"] > 0
    run = json.loads((out / "run.json").read_text())
    assert run["fingerprint"] == sidecar["fingerprint"] == manifest["fingerprint"]

    # the same command again: nothing generated, nothing rewritten
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("0*")}
    capsys.readouterr()
    assert main(args(tiny_model, prompt_file, out)) == 0
    assert "0 generated, 6 already done" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("0*")} == mtimes
    assert json.loads((out / "manifest.json").read_text())["counts"]["skipped_already_done"] == 6


def test_broken_or_missing_outputs_are_redone(reference, tiny_model, prompt_file, tmp_path):
    ref_out, ref = reference
    out = tmp_path / "out"
    shutil.copytree(ref_out, out)
    (out / "000001.png").write_bytes(ref["000001"][:100])  # truncated image
    (out / "000003.json").write_text("{not json")  # broken sidecar
    sidecar = json.loads((out / "000005.json").read_text())
    (out / "000005.json").write_text(json.dumps({**sidecar, "prompt": "another prompt"}))  # does not match the item
    (out / "000006.png").unlink()  # missing image
    (out / ".000004.png.0123abcd.tmp").write_bytes(b"partial")  # a killed run's temporary file
    assert main(args(tiny_model, prompt_file, out)) == 0
    assert images(out) == ref and not temporaries(out)
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["generated"] == 4 and counts["skipped_already_done"] == 2


def test_batching_only_changes_roundoff(reference, tiny_model, prompt_file, tmp_path):
    """A batch computes each item from its own generator: batch size 1 gives the same images up to float round-off."""
    _, ref = reference
    out = tmp_path / "single"
    assert main([*args(tiny_model, prompt_file, out), "--batch-size", "1"]) == 0
    singles = images(out)
    for key in IDS:
        a = np.asarray(Image.open(out / f"{key}.png"), dtype=np.int16)
        b = np.asarray(Image.open(io.BytesIO(ref[key])), dtype=np.int16)
        assert np.abs(a - b).max() <= 2, key
    # different seeds give different images (the check above is not vacuous)
    first = np.asarray(Image.open(out / "000001.png"), dtype=np.int16)
    assert len(set(singles.values())) == 6 and np.abs(first - np.asarray(Image.open(out / "000004.png"))).max() > 2


def test_jsonl_overrides_are_batched_apart(tiny_model, tmp_path):
    path = tmp_path / "p.jsonl"
    lines = [
        {"prompt": PROMPTS[0], "id": "a"},
        {"prompt": PROMPTS[1], "id": "b", "num_inference_steps": 2},
        {"prompt": PROMPTS[2], "id": "c", "seed": 5},
        {"prompt": PROMPTS[3], "id": "d", "num_inference_steps": 2, "guidance_scale": 2.0},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    out = tmp_path / "out"
    assert main(args(tiny_model, path, out)) == 0
    side = {k: json.loads((out / f"{k}.json").read_text()) for k in "abcd"}
    assert side["a"]["batch_size"] == side["c"]["batch_size"] == 2  # same settings: one call
    assert side["b"]["batch_size"] == side["d"]["batch_size"] == 1  # different guidance: never together
    assert side["b"]["num_inference_steps"] == 2 and side["a"]["num_inference_steps"] == 3
    assert side["c"]["seed"] == 5 and side["d"]["guidance_scale"] == 2.0


# ---------------------------------------------------------------------------------------------- SIGKILL and torchrun
KILLER = """
import os, signal, sys
import catprune.batch.io as bio
from catprune.cli.main import main

real, calls = os.replace, [0]
def replace(src, dst):
    calls[0] += 1
    if calls[0] == int(os.environ["KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)  # between the temporary file and its rename
    return real(src, dst)
bio.os.replace = replace
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_mid_run_then_resume_gives_identical_bytes(reference, tiny_model, prompt_file, tmp_path):
    _, ref = reference
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    out = tmp_path / "out"
    # replaces: run.json, then (png, json) per item; the 6th is item 3's image, in the second batch
    done = subprocess.run([sys.executable, str(script), *args(tiny_model, prompt_file, out)],
                          env={**_subprocess_env(), "KILL_AT": "6"}, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == -9, done.stderr
    assert sorted(images(out)) == IDS[:2] and len(temporaries(out)) == 1  # nothing partial under a final name
    assert main(args(tiny_model, prompt_file, out)) == 0
    assert images(out) == ref and not temporaries(out)
    assert json.loads((out / "manifest.json").read_text())["counts"]["skipped_already_done"] == 2


# two runs in one torchrun launch (one start-up): the first joins the process group itself; gloo cannot re-join in
# the same process, so the group is kept for the second run, which finds it initialised and uses it
TWICE = """
import sys
import torch.distributed as dist
from catprune.cli.main import main

destroy, dist.destroy_process_group = dist.destroy_process_group, lambda *a, **k: None
argv = sys.argv[1:]
cut = argv.index("--")
rc = main(argv[:cut]) or main(argv[cut + 1:])
destroy()
sys.exit(rc)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_one_and_resume_across_world_sizes(reference, tiny_model, prompt_file, tmp_path):
    """torchrun with 2 processes: a fresh run equals the 1-process bytes, and it resumes a directory a 1-process run
    left half done (world size 1 -> 2)."""
    ref_out, ref = reference
    script = tmp_path / "twice.py"
    script.write_text(TWICE)
    fresh, resumed = tmp_path / "fresh", tmp_path / "resumed"
    shutil.copytree(ref_out, resumed)
    for key in ("000002", "000005", "000006"):
        (resumed / f"{key}.png").unlink()
    (resumed / ".000002.png.deadbeef.tmp").write_bytes(b"partial")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(script),
           *args(tiny_model, prompt_file, fresh), "--", *args(tiny_model, prompt_file, resumed)]  # fmt: skip
    done = subprocess.run(cmd, env=_subprocess_env(), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert images(fresh) == ref and images(resumed) == ref
    assert not temporaries(fresh) and not temporaries(resumed)
    manifest = json.loads((fresh / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["counts"]["generated"] == 6  # summed over both ranks
    resumed_counts = json.loads((resumed / "manifest.json").read_text())["counts"]
    assert resumed_counts["generated"] == 3 and resumed_counts["skipped_already_done"] == 3
    assert done.stderr.count("images in") == 2  # one summary per run, from rank 0 only


# ---------------------------------------------------------------------------------------------- bad input
def test_missing_and_empty_prompt_files(tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(args(tiny_model, tmp_path / "nope.txt", out)) == 2
    err = capsys.readouterr().err
    assert "--prompts" in err and "nope.txt" in err and not out.exists()
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert main(args(tiny_model, empty, out)) == 2
    err = capsys.readouterr().err
    assert "empty.txt" in err and "at least one prompt" in err


@pytest.mark.parametrize(
    "line, expected",
    [
        ('{"prompt": "a red circle", oops}', "malformed JSON"),
        ('{"prompt": "a red circle", "sead": 3}', "'sead'"),
        ('{"prompt": "a red circle", "seed": -1}', "seed"),
        ('{"prompt": "a red circle", "id": "../escape"}', "id"),
        ('{"prompt": "a red circle", "id": "manifest"}', "manifest"),
        ('["a red circle"]', "JSON object"),
    ],
)
def test_malformed_jsonl_line_stops_naming_file_and_line(tiny_model, tmp_path, capsys, line, expected):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": PROMPTS[0]}) + "\n" + line + "\n")
    assert main(args(tiny_model, path, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert f"{path}, line 2" in err and expected in err and "--on-error skip" in err


def test_on_error_skip_skips_the_bad_line_only(tiny_model, tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    path.write_text(f'{{"prompt": "{PROMPTS[0]}"}}\n{{broken\n{{"prompt": "{PROMPTS[1]}"}}\n')
    out = tmp_path / "out"
    assert main([*args(tiny_model, path, out), "--on-error", "skip"]) == 0
    assert "line 2" in capsys.readouterr().err
    assert sorted(images(out)) == ["000001", "000003"]  # ids stay line numbers


def test_duplicate_ids(tiny_model, tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a red circle", "id": 7}\n{"prompt": "a blue square", "id": "x"}\n'
                    '{"prompt": "a blue circle", "id": "7"}\n')  # fmt: skip
    assert main(args(tiny_model, path, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "line 3" in err and "first on line 1" in err and "'7'" in err


def test_unwritable_output_directory(tiny_model, prompt_file, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main(args(tiny_model, prompt_file, blocker / "out")) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "writable" in err and str(blocker) in err


def test_disk_full_keeps_earlier_images_and_leaves_nothing_partial(reference, tiny_model, prompt_file, tmp_path,
                                                                   monkeypatch, capsys):  # fmt: skip
    import catprune.batch.io as bio

    _, ref = reference
    real, calls = bio._write_all, [0]

    def write_all(fd, data):
        calls[0] += 1
        if calls[0] == 6:  # run.json, then (png, json) per item: item 3's image
            os.write(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    monkeypatch.setattr(bio, "_write_all", write_all)
    out = tmp_path / "out"
    assert main(args(tiny_model, prompt_file, out)) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "re-run the same command" in err and "line 3" in err
    assert images(out) == {k: ref[k] for k in IDS[:2]} and not temporaries(out)
    monkeypatch.setattr(bio, "_write_all", real)
    assert main(args(tiny_model, prompt_file, out)) == 0
    assert images(out) == ref


def test_other_settings_are_refused_unless_overwrite(reference, tiny_model, prompt_file, tmp_path, capsys):
    ref_out, _ = reference
    out = tmp_path / "out"
    shutil.copytree(ref_out, out)
    assert main([*args(tiny_model, prompt_file, out), "--keep-ratio", "0.7"]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "keep_ratio" in err and "--overwrite" in err
    assert main([*args(tiny_model, prompt_file, out), "--dense", "--overwrite"]) == 0
    assert json.loads((out / "run.json").read_text())["settings"]["catprune"] == "dense"
    assert all(json.loads((out / f"{k}.json").read_text())["catprune"] == "dense" for k in IDS)


def test_ctrl_c_exits_130_with_one_line_and_nothing_partial(tiny_model, prompt_file, tmp_path, monkeypatch, capsys):
    import catprune.batch.runner as runner

    real, calls = runner._generate, [0]

    def interrupted(*a, **k):
        calls[0] += 1
        if calls[0] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(runner, "_generate", interrupted)
    out = tmp_path / "out"
    assert main([*args(tiny_model, prompt_file, out), "--manifest-every", "2"]) == 130
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("catprune")]
    assert len(err) == 1 and "interrupted" in err[0] and "resume" in err[0]
    assert sorted(images(out)) == IDS[:2] and not temporaries(out)
    manifest = json.loads((out / "manifest.json").read_text())  # the periodic one, after the first 2 images
    assert not manifest["finished"] and manifest["counts"]["done"] == 2 and manifest["counts"]["pending"] == 4


def test_flag_conflicts(tiny_model, prompt_file, tmp_path, capsys):
    assert main(["generate", "a red circle", "--prompts", str(prompt_file), "--out", str(tmp_path)]) == 2
    assert "got both" in capsys.readouterr().err
    assert main(["generate", "--prompts", str(prompt_file)]) == 2  # batch mode needs --out DIR
    err = capsys.readouterr().err
    assert "--out" in err and "directory" in err
    assert main(["generate"]) == 2
    assert "--prompts" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- units
def test_batches_and_shards_do_not_depend_on_world_size():
    items = [Item(i, i + 1, f"{i}", "p", 0, num_inference_steps=4 if i % 3 == 0 else None) for i in range(11)]
    batches = make_batches(items, batch_size=2, steps=28, guidance_scale=None)
    assert all(len(b.items) <= 2 and all(i.settings_key(28, None)[0] == b.steps for i in b.items) for b in batches)
    assert sorted(i.id for b in batches for i in b.items) == sorted(i.id for i in items)
    for world in (1, 2, 3, 5):
        shards = [shard(batches, rank, world) for rank in range(world)]
        assert len({len(s) for s in shards}) == 1  # every rank walks the same number of rounds
        flat = [b.index for s in shards for b in s if b is not None]
        assert sorted(flat) == list(range(len(batches)))  # each batch exactly once


def test_seed_depends_on_id_and_base_seed_only(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.jsonl"
    a.write_text("p1\np2\n")
    b.write_text('{"prompt": "other", "id": "000002"}\n{"prompt": "p1", "id": "000001"}\n')
    seeds_a = {i.id: i.seed for i in read_prompts(a, base_seed=3)}
    seeds_b = {i.id: i.seed for i in read_prompts(b, base_seed=3)}
    assert seeds_a == seeds_b and len(set(seeds_a.values())) == 2
    assert seeds_a != {i.id: i.seed for i in read_prompts(a, base_seed=4)}


def test_progress_line_without_tqdm(capsys):
    progress = Progress(total=4, stream=sys.stdout, interval_s=0.0, use_tqdm=False)
    progress.update(2)
    progress.set(4)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("catprune generate: 2/4 images") and "img/s" in lines[0] and "ETA" in lines[0]
    assert lines[-1].startswith("catprune generate: 4/4 images")


# ---------------------------------------------------------------------------------------------- the GPU benchmark
def test_batch_bench_script_cpu_path(tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts" / "batch_bench.py"), "--device", "cpu", "--dtype", "float32",
           "--shapes-prompts", "2", "--shapes-size", "32", "--sd3-preset", "sd3-tiny", "--sd3-prompts", "2",
           "--sd3-size", "64", "--steps", "3", "--start-step", "2", "--out", str(tmp_path),
           "--json", str(tmp_path / "bench.json")]  # fmt: skip
    done = subprocess.run(cmd, env=_subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert [(r["case"], r["mode"]) for r in rows] == [("shapes", "dense"), ("shapes", "cat"),
                                                      ("random:sd3-tiny", "dense"), ("random:sd3-tiny", "cat")]  # fmt: skip
    assert all(r["images"] == 2 and r["images_per_s"] > 0 for r in rows)
    assert rows[1]["macs_saved"] > 0 and rows[0]["macs_saved"] == 0
    assert "img/s" in done.stdout
