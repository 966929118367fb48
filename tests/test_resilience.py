"""Interruptions, through the real CLI in subprocesses on the tiny model: SIGKILL mid-epoch and SIGTERM resume to the
uninterrupted result; a NaN stops cleanly and keeps the last good files; checkpoints and adapters are replaced
atomically; an unwritable or full output directory is reported before training.

40 examples, batch 2: 20 steps per epoch; last.ckpt every 3 steps; every run stops at step 26, in epoch 1.
"""

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from probes import ROOT, by_process, probe, read_jsonl, run_cli, write_data

STEPS, EVERY = 26, 3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data"), every_n_steps=EVERY)


def fit(tiny_model_dir, data, out: Path, *extra):
    return run_cli("fit", "--config", "configs/lora.yaml", "--config", str(data / "every_n.yaml"),
                   "--model.base_model", str(tiny_model_dir), "--model.quantization", "none",
                   "--model.precision", "fp32", "--model.lora_dropout", "0", "--data.batch_size", "2",
                   "--data.train_file", str(data / "train.jsonl"), "--data.val_file", str(data / "val.jsonl"),
                   "--trainer.max_steps", str(STEPS), "--trainer.deterministic", "true",
                   "--trainer.logger.init_args.save_dir", str(out / "runs"), *probe("RecordBatches", out=out), *extra)


def weights(run: Path, name: str = "lora_adapter") -> dict:
    from safetensors.torch import load_file

    return load_file(run / name / "adapter_model.safetensors")


def assert_same_adapter(run: Path, reference: Path):
    for name in ("lora_adapter", "lora_adapter_best"):
        ours, theirs = weights(run, name), weights(reference, name)
        assert ours.keys() == theirs.keys()
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-7, msg=f"{name}: {key}")


def last_step(run: Path) -> int:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]


@pytest.fixture(scope="module")
def reference(tiny_model_dir, data, tmp_path_factory):
    """The uninterrupted run: its batches, step by step, and its run directory."""
    out = tmp_path_factory.mktemp("reference")
    result = fit(tiny_model_dir, data, out)
    assert result.returncode == 0, result.stderr[-3000:]
    (rows,) = by_process(read_jsonl(out / "rank0.jsonl"))
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    return {r["step"]: r["examples"] for r in rows}, out / "runs" / "lora" / "version_0"


def test_sigterm_then_sigkill_mid_epoch_then_resume_matches_the_uninterrupted_run(tiny_model_dir, data, reference,
                                                                                  tmp_path):
    batches, reference_run = reference
    run = tmp_path / "runs" / "lora" / "version_0"
    last = run / "checkpoints" / "last.ckpt"

    # SIGTERM, as a scheduler sends: last.ckpt is written at the end of the step, and the exit code says so.
    stopped = fit(tiny_model_dir, data, tmp_path, *probe("SignalAt", step=5, signal="SIGTERM"))
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert f"SIGTERM: saved {last} at step 5" in stopped.stdout + stopped.stderr
    assert "medassist: stopped by SIGTERM" in stopped.stderr and "Traceback" not in stopped.stderr
    assert last_step(run) == 5 and not (run / "lora_adapter").exists()

    # Resumed, then SIGKILLed: nothing runs at a kill, so the steps since the last periodic checkpoint are lost.
    resumed = fit(tiny_model_dir, data, tmp_path, "--ckpt_path", "last", *probe("SignalAt", step=8))
    assert resumed.returncode == -signal.SIGKILL
    assert f"resuming from {last}" in resumed.stderr
    assert f"restoring {last}: step 5, epoch 0" in resumed.stdout + resumed.stderr  # which checkpoint, which step
    assert last_step(run) == 6

    # Resumed again, to the end: every run trained on exactly the batches after its checkpoint, none skipped
    # or repeated (a second resume in one epoch included), and the adapters are the uninterrupted run's.
    finished = fit(tiny_model_dir, data, tmp_path, "--ckpt_path", "last")
    assert finished.returncode == 0, finished.stderr[-3000:]
    runs = by_process(read_jsonl(tmp_path / "rank0.jsonl"))
    assert [[r["step"] for r in rows] for rows in runs] == [[1, 2, 3, 4, 5], [6, 7, 8], list(range(7, STEPS + 1))]
    assert all(r["examples"] == batches[r["step"]] for rows in runs for r in rows)
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]
    assert last_step(run) == 24  # Lightning adds a final last.ckpt only to runs that saved none on the way
    assert_same_adapter(run, reference_run)


def test_nan_stops_with_the_step_and_keeps_the_last_good_files(tiny_model_dir, data, reference, tmp_path):
    _, reference_run = reference
    shutil.copytree(reference_run, tmp_path / "runs" / "lora" / "version_0")
    run = tmp_path / "runs" / "lora" / "version_0"
    before = snapshot(run / "lora_adapter") | snapshot(run / "lora_adapter_best")

    result = fit(tiny_model_dir, data, tmp_path, "--ckpt_path", "last", "--trainer.max_steps", "40",
                 *probe("PoisonAt", step=29))
    assert result.returncode == 1, result.stderr[-3000:]
    assert "medassist: error: training loss is nan at step 29" in result.stderr
    assert "Traceback" not in result.stderr
    assert snapshot(run / "lora_adapter") | snapshot(run / "lora_adapter_best") == before  # byte for byte
    # The periodic checkpoint from before the NaN is the newest: it is what `--ckpt_path last` takes next. (It is
    # last-v1.ckpt because the copied run's last.ckpt was written from another directory.)
    newest = max((run / "checkpoints").glob("last*.ckpt"), key=lambda p: p.stat().st_mtime)
    state = torch.load(newest, weights_only=False)
    assert state["global_step"] == 27 and all(torch.isfinite(t).all() for t in state["state_dict"].values())


def snapshot(directory: Path) -> dict:
    return {p.relative_to(directory.parent): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_kill_while_a_checkpoint_is_written_keeps_the_previous_one(tmp_path):
    """torch.save is cut off half way by SIGKILL: last.ckpt is still the previous, complete checkpoint."""
    script = f"""
import os, signal, torch
from medassist.callbacks import AtomicCheckpointIO
io, path = AtomicCheckpointIO(), {str(tmp_path / "last.ckpt")!r}
io.save_checkpoint({{"global_step": 3, "w": torch.ones(1000)}}, path)
def torn_save(obj, f):
    f.write(b"PK" + bytes(5000)); f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = torn_save
io.save_checkpoint({{"global_step": 6, "w": torch.zeros(1000)}}, path)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert state["global_step"] == 3 and torch.equal(state["w"], torch.ones(1000))
    (torn,) = [p for p in tmp_path.iterdir() if p.name != "last.ckpt"]  # the half-written bytes went here
    assert torn.name.startswith(".last.ckpt.") and torn.name.endswith(".tmp") and torn.stat().st_size > 5000


def test_a_failed_checkpoint_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    from medassist.callbacks import AtomicCheckpointIO

    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 3}, path)
    good = path.read_bytes()

    def full_disk(obj, f):
        f.write(b"PK" + bytes(100))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"global_step": 6}, path)
    assert path.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_a_failed_adapter_save_keeps_the_previous_adapter(tiny_model_dir, tmp_path, monkeypatch):
    from medassist.model import MedAssistLM

    module = MedAssistLM(base_model=str(tiny_model_dir), quantization="none", precision="fp32")
    module.configure_model()
    module.save_adapter(tmp_path / "lora_adapter")
    before = snapshot(tmp_path / "lora_adapter")

    def torn(directory, **kwargs):
        (Path(directory) / "adapter_model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(module.model, "save_pretrained", torn)
    with pytest.raises(OSError):
        module.save_adapter(tmp_path / "lora_adapter")
    assert snapshot(tmp_path / "lora_adapter") == before


def test_unwritable_output_is_reported_before_training(tiny_model_dir, data, tmp_path, capsys):
    """Tests run as root, which chmod does not stop: a directory under a regular file cannot be created by anyone."""
    from medassist.cli import main

    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit) as exit:
        main(["fit", "--config", str(ROOT / "configs/lora.yaml"), "--model.base_model", str(tiny_model_dir),
              "--data.train_file", str(data / "train.jsonl"), "--data.val_file", str(data / "val.jsonl"),
              "--trainer.logger.init_args.save_dir", str(tmp_path / "a-file" / "runs")])
    err = capsys.readouterr().err
    assert exit.value.code == 2
    assert f"cannot write checkpoints to {tmp_path / 'a-file' / 'runs'}" in err and "Traceback" not in err


def test_read_only_filesystem_and_full_disk_are_reported(tmp_path, monkeypatch):
    from medassist import UserError
    from medassist.cli import check_writable

    with pytest.raises(UserError, match="cannot write checkpoints to /proc/medassist"):
        check_writable(Path("/proc/medassist"))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 * 2**30, 10 * 2**30, 2**20))
    with pytest.raises(UserError, match="only 1 MiB free at .*; checkpoints need at least 512 MiB"):
        check_writable(tmp_path)
    assert not list(tmp_path.iterdir())  # the probe file is gone


def _tree(path: Path) -> dict:
    return {p.name: p.read_text() for p in path.iterdir()}


@pytest.mark.skipif(sys.platform != "linux", reason="renameat2(RENAME_EXCHANGE) is Linux-only")
def test_replace_dir_swaps_in_one_step_on_linux(tmp_path, monkeypatch):
    from medassist.files import replace_dir

    import ctypes
    import os

    a, b = tmp_path / "probe-a", tmp_path / "probe-b"
    a.mkdir(), b.mkdir()
    if ctypes.CDLL(None, use_errno=True).renameat2(-100, os.fsencode(a), -100, os.fsencode(b), 2) != 0:
        pytest.skip(f"this filesystem refuses RENAME_EXCHANGE (errno {ctypes.get_errno()}); replace_dir falls back")
    a.rmdir(), b.rmdir()
    target, new = tmp_path / "lora_adapter", tmp_path / ".lora_adapter-tmp"
    target.mkdir(), new.mkdir()
    (target / "adapter.safetensors").write_text("old")
    (new / "adapter.safetensors").write_text("new")
    (new / "medassist.json").write_text("{}")

    def two_step_rename(*args):  # the fallback's move-aside-then-rename has a moment without `target`
        raise AssertionError("replace_dir used os.replace instead of one atomic exchange")

    monkeypatch.setattr("os.replace", two_step_rename)
    replace_dir(new, target)
    assert _tree(target) == {"adapter.safetensors": "new", "medassist.json": "{}"}
    assert [p.name for p in tmp_path.iterdir()] == ["lora_adapter"]  # the old content is deleted, nothing left over


def test_replace_dir_falls_back_where_there_is_no_exchange(tmp_path, monkeypatch):
    from medassist.files import replace_dir

    def no_libc(*args, **kwargs):
        raise OSError("no libc here")

    monkeypatch.setattr("ctypes.CDLL", no_libc)
    target, new = tmp_path / "out", tmp_path / ".out-tmp"
    target.mkdir(), new.mkdir()
    (target / "train.jsonl").write_text("old")
    (new / "train.jsonl").write_text("new")
    replace_dir(new, target)
    assert _tree(target) == {"train.jsonl": "new"} and [p.name for p in tmp_path.iterdir()] == ["out"]
    fresh = tmp_path / ".fresh-tmp"
    fresh.mkdir()
    replace_dir(fresh, tmp_path / "absent")  # no target yet: a plain rename
    assert (tmp_path / "absent").is_dir() and not fresh.exists()


def test_a_failed_jsonl_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path):
    from medassist.files import write_jsonl_atomic

    path = tmp_path / "answers.jsonl"
    write_jsonl_atomic(path, [{"answer": "old"}])
    with pytest.raises(TypeError):  # the second record cannot be written: the failure comes mid-file
        write_jsonl_atomic(path, [{"answer": "new"}, {"answer": object()}])
    assert path.read_text() == '{"answer": "old"}\n' and [p.name for p in tmp_path.iterdir()] == ["answers.jsonl"]


def test_a_failed_directory_write_keeps_the_old_one_and_leaves_no_temporary_directory(tmp_path):
    from medassist.files import atomic_dir

    target = tmp_path / "lora_adapter"
    with atomic_dir(target) as tmp:
        (tmp / "adapter.safetensors").write_text("old")
    with pytest.raises(OSError, match="No space left"):
        with atomic_dir(target) as tmp:
            (tmp / "adapter.safetensors").write_text("half")
            raise OSError(28, "No space left on device")
    assert _tree(target) == {"adapter.safetensors": "old"} and [p.name for p in tmp_path.iterdir()] == ["lora_adapter"]


def test_a_failed_adapter_save_leaves_no_temporary_directory(tiny_model_dir, tmp_path, monkeypatch):
    from medassist.model import MedAssistLM

    module = MedAssistLM(base_model=str(tiny_model_dir), quantization="none", precision="fp32")
    module.configure_model()

    def full_disk(directory, **kwargs):
        (Path(directory) / "adapter_model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(module.model, "save_pretrained", full_disk)
    with pytest.raises(OSError):
        module.save_adapter(tmp_path / "lora_adapter")
    assert list(tmp_path.iterdir()) == []  # no .lora_adapter-* left behind, and no half adapter


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "fallback"])
@pytest.mark.parametrize("what", ["jsonl", "new dir", "replaced dir", "checkpoint"])
def test_every_rename_is_followed_by_an_fsync_of_its_directory(tmp_path, monkeypatch, what, exchange):
    """A rename lives in the directory's blocks: without syncing the directory, a power loss can undo it."""
    import os
    import stat

    from medassist import files

    events = []
    real_replace, real_fsync = os.replace, os.fsync
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("rename", Path(b).parent)), real_replace(a, b)))

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            events.append(("fsync dir", Path(os.readlink(f"/proc/self/fd/{fd}"))))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    if not exchange:
        monkeypatch.setattr("ctypes.CDLL", lambda *a, **k: (_ for _ in ()).throw(OSError("no libc")))
    if what == "jsonl":
        files.write_jsonl_atomic(tmp_path / "out.jsonl", [{"a": 1}])
    elif what == "checkpoint":
        from medassist.callbacks import AtomicCheckpointIO

        AtomicCheckpointIO().save_checkpoint({"global_step": 1}, tmp_path / "last.ckpt")
    else:
        if what == "replaced dir":
            (tmp_path / "out").mkdir()
        with files.atomic_dir(tmp_path / "out") as tmp:
            (tmp / "x").write_text("new")
        assert (tmp_path / "out" / "x").read_text() == "new"
    assert events and events[-1] == ("fsync dir", tmp_path)
    renames = [i for i, (kind, _) in enumerate(events) if kind == "rename"]
    assert all(any(kind == "fsync dir" for kind, _ in events[i + 1:]) for i in renames)
