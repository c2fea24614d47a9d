"""``retrolm db build --engine ray``: the same files as a local build, resumable after the
driver is killed, and one-line errors without Ray or without a cluster.

Ray runs on this machine only (``num_cpus=2``, no dashboard, no usage reports) and is shut
down after the module; tests that need it skip, saying how to install it, where it is not.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest

from retrolm.cli import main
from retrolm.retrieval import build_database
from retrolm.retrieval.store import read_manifest, write_manifest

from .conftest import TINY_DB
from .test_database import SRC, files

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # never report to the network

NO_RAY = "Ray Data is not installed (optional extra): make install-ray"


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray for the module; ``build_database`` joins it instead of starting one."""
    ray = pytest.importorskip("ray", reason=NO_RAY)
    pytest.importorskip("ray.data", reason=NO_RAY)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def same_files(got: Path, want: Path) -> None:
    a, b = files(got), files(want)
    a.pop(".lock", None), b.pop(".lock", None)  # the lock file holds a pid
    assert sorted(a) == sorted(b)
    for name in b:
        assert a[name] == b[name], f"{name} differs from the local build's"


def undo_neighbours(built: Path, db: Path) -> Path:
    """A copy of a complete build with its neighbour stage not done."""
    import shutil

    shutil.copytree(built, db)
    m = read_manifest(db)
    m["stages_done"].remove("neighbours")
    m["complete"] = False
    write_manifest(db, m)
    for name in ("neighbours.bin", "neighbour_dists.bin"):
        (db / name).unlink()
    return db


def test_a_local_build_finishes_on_ray_with_identical_files(
    tmp_path, corpus_dir, tiny_config, built_db, ray_local
):
    """The neighbour stage of a local build is undone and rerun on Ray actors: the
    manifest, the neighbour files and every other file are the local build's, byte for
    byte (the engines share the block markers, so either resumes the other)."""
    db = undo_neighbours(built_db, tmp_path / "db")
    build_database(corpus_dir, db, replace(tiny_config, engine="ray", workers=2))
    same_files(db, built_db)


@pytest.mark.slow
def test_ray_build_equals_the_local_one(tmp_path, corpus_dir, tiny_config, built_db):
    """Every stage from scratch through the command line, which starts (and stops) its own
    local Ray: 2 encoder actors, 2 index-add actors, 2 search actors."""
    pytest.importorskip("ray.data", reason=NO_RAY)
    db = tmp_path / "db"
    flags = [
        f"--{k.replace('_', '-')}={v}"
        for k, v in asdict(replace(tiny_config, engine="ray", workers=2)).items()
        if v is not None
    ]
    out = subprocess.run(
        [sys.executable, "-m", "retrolm", "db", "build", str(corpus_dir), str(db), *flags],
        env=dict(os.environ, PYTHONPATH=SRC),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"database {db}: " in out.stdout
    same_files(db, built_db)


@pytest.mark.slow
def test_index_add_on_ray_is_byte_identical_for_every_kind(tmp_path, ray_local):
    """Actors encode (flat, ivf, ivfpq) or read (hnsw) the add blocks; the driver adds them
    in block order: the index equals ``build_index``'s, byte for byte, over 3 add blocks."""
    import faiss

    from retrolm.retrieval import ray_engine
    from retrolm.retrieval.build import BuildConfig
    from retrolm.retrieval.index import build_index, choose_index
    from retrolm.retrieval.store import EMBEDDINGS_FILE, array_info

    n, d = 2 * ray_engine.ADD_BLOCK // 64 + 123, 32
    x = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x.tofile(tmp_path / EMBEDDINGS_FILE)
    manifest = {"arrays": {"embeddings": array_info(EMBEDDINGS_FILE, np.float32, (n, d))}}
    config = BuildConfig(engine="ray", workers=2)
    old = ray_engine.ADD_BLOCK
    ray_engine.ADD_BLOCK = 1024  # several add blocks on a small array
    try:
        for kind in ("flat", "ivf", "ivfpq", "hnsw"):
            spec = choose_index(n, d, kind, 1 << 30)
            want = build_index(spec, x, block_size=ray_engine.ADD_BLOCK)
            got = ray_engine.index_on_ray(tmp_path, manifest, config, spec)
            assert got.ntotal == n
            assert bytes(faiss.serialize_index(got)) == bytes(faiss.serialize_index(want)), kind
    finally:
        ray_engine.ADD_BLOCK = old


# Starts Ray with every embed and neighbour call slowed down in its workers (a Ray worker
# setup hook), then builds on Ray, so that the test can kill the driver mid-stage.
SLOW_RAY_BUILD = """
import json, sys
import ray
from retrolm.retrieval import BuildConfig, build_database
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
         runtime_env={"worker_process_setup_hook": "slow_hook.slow_down"})
build_database(sys.argv[1], sys.argv[2], BuildConfig(**json.loads(sys.argv[3])))
"""
SLOW_HOOK = """
import time
def slow_down():
    from retrolm.retrieval import encoder, neighbours
    def slowed(fn):
        def wrapper(*a, **k):
            time.sleep(0.4)
            return fn(*a, **k)
        return wrapper
    encoder.FrozenEncoder.embed = slowed(encoder.FrozenEncoder.embed)
    neighbours.neighbours_block = slowed(neighbours.neighbours_block)
"""


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["embed", "neighbours"])
def test_resume_after_the_driver_is_killed(
    tmp_path, corpus_dir, tiny_config, built_db, ray_local, stage
):
    """SIGKILL the driver (and the Ray it started: its process group) once some blocks
    of ``stage`` are marked done; the rerun on Ray skips them and ends with the files of
    an uninterrupted local build."""
    (tmp_path / "slow_hook.py").write_text(SLOW_HOOK)
    (tmp_path / "slow_ray_build.py").write_text(SLOW_RAY_BUILD)
    db, config = tmp_path / "db", replace(tiny_config, engine="ray", workers=2)
    proc = subprocess.Popen(
        [sys.executable, "slow_ray_build.py", str(corpus_dir), str(db), json.dumps(asdict(config))],
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, str(tmp_path)])),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # Ray's processes join the group the test kills
    )
    try:
        t0 = time.time()
        while not any((db / ".progress" / stage).glob("*.done")):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.time() - t0 < 240, f"no {stage} block was finished in 240 s"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    marked = sorted((db / ".progress" / stage).glob("*.done"))
    assert not read_manifest(db)["complete"]
    blocks = -(-read_manifest(db)["num_chunks"] // tiny_config.block_size)
    assert 0 < len(marked) < blocks  # killed mid-stage
    build_database(corpus_dir, db, config)  # resume on Ray, in this process
    same_files(db, built_db)


def test_without_ray_or_a_cluster_the_cli_says_so_in_one_line(
    tmp_path, corpus_dir, tiny_encoder, capsys, monkeypatch
):
    argv = ["db", "build", str(corpus_dir), str(tmp_path / "db"), "--engine", "ray"]
    argv += ["--encoder", str(tiny_encoder), "--vocab-size", "1000"]
    # no Ray cluster at this address: refused at once, before anything is written
    assert main([*argv, "--address", "127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip()
    if "not installed" not in err:
        assert "no Ray cluster answers at --address '127.0.0.1:9'" in err
        assert "ray start --head" in err
        assert "\n" not in err
    assert not (tmp_path / "db" / "manifest.json").exists()
    assert main([*argv, "--address", "nowhere"]) == 2
    err = capsys.readouterr().err.strip()
    assert "not host:port" in err or "not installed" in err
    assert main(["db", "build", str(corpus_dir), str(tmp_path / "db"), "--address", "x:1"]) == 2
    assert "is for --engine ray" in capsys.readouterr().err
    # Ray missing: one line naming the extra
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert "--engine ray needs Ray Data" in err and "pip install 'retrolm[ray]'" in err
    assert not (tmp_path / "db" / "manifest.json").exists()


def test_device_and_engine_errors(tmp_path, tiny_encoder, ray_local):
    import torch

    from retrolm.retrieval import BuildConfig
    from retrolm.retrieval.encoder import FrozenEncoder
    from retrolm.retrieval.ray_engine import embed_on_ray
    from retrolm.retrieval.store import _Blocks

    with pytest.raises(ValueError, match="device='tpu' is not cpu or cuda"):
        BuildConfig(device="tpu")
    with pytest.raises(ValueError, match="engine='spark' is not one of"):
        BuildConfig(engine="spark")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda', but torch sees no CUDA GPU"):
            FrozenEncoder(tiny_encoder, device="cuda")
    if not ray_local.cluster_resources().get("GPU"):  # GPU actors would wait for ever
        config = BuildConfig(engine="ray", device="cuda")
        with pytest.raises(ValueError, match="the Ray cluster has no GPU: use --device cpu"):
            embed_on_ray(tmp_path, {}, config, _Blocks(tmp_path, "embed", 10, 4))


def test_a_damaged_index_fails_in_one_line_not_in_endless_actor_retries(
    tmp_path, corpus_dir, built_db, tiny_encoder, capsys, ray_local
):
    db = undo_neighbours(built_db, tmp_path / "db")
    (db / "index.faiss").write_bytes(b"junk" * 100)
    argv = ["db", "build", str(corpus_dir), str(db), "--engine", "ray", "--encoder"]
    argv += [str(tiny_encoder)] + [f"--{k.replace('_', '-')}={v}" for k, v in TINY_DB.items()]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "faiss could not read the index file" in err
