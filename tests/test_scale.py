"""Training at scale and without loss: torchrun DDP over gloo, kill -9 and resume, model cards."""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from edgeconv.training.rundir import PREV_STATE_NAME, STATE_NAME, load_state, save_state
from edgeconv_runtime.errors import EdgeconvError


def edgeconv(*args, timeout=600, env=None):
    return subprocess.run([sys.executable, "-m", "edgeconv", *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_torchrun_two_cpu_processes_over_gloo(tmp_path, mnist_test_dir):
    common = ["--data", "mnist-5k", "--test-data", str(mnist_test_dir), "--model", "chollet_mnist", "--epochs", "2",
              "--optimizer", "adam", "--lr", "0.002", "--threads", "1", "--seed", "3"]
    out2 = tmp_path / "ddp"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "edgeconv", "train",
                        *common, "--out", str(out2)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    s0 = json.loads((out2 / "shards.rank0.json").read_text())
    s1 = json.loads((out2 / "shards.rank1.json").read_text())
    assert s0["backend"] == "gloo" and s0["world_size"] == 2
    assert s0["final_weights_sha256"] == s1["final_weights_sha256"]  # gradients were averaged: identical weights
    n_train = 4500
    for epoch in ("1", "2"):
        a, b = set(s0["epochs"][epoch]), set(s1["epochs"][epoch])
        assert not a & b and len(a | b) == n_train  # disjoint halves covering the epoch
    assert s0["epochs"]["1"] != s0["epochs"]["2"]  # reshuffled per epoch
    m2 = json.loads((out2 / "metrics.json").read_text())
    assert m2["world_size"] == 2
    # only rank 0 wrote the run's files
    assert sorted(p.name for p in out2.iterdir() if not p.name.startswith("shards")) == sorted(
        ["model.pt", "metrics.json", "history.csv", "history.json", "curves.png", "state.pt", "state.prev.pt", "MODEL_CARD.md", "model_card.json"])
    out1 = tmp_path / "single"
    r = edgeconv("train", *common, "--out", str(out1))
    assert r.returncode == 0, r.stderr
    m1 = json.loads((out1 / "metrics.json").read_text())
    assert abs(m2["test_accuracy"] - m1["test_accuracy"]) < 0.03, (m1["test_accuracy"], m2["test_accuracy"])


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_loses_nothing(tmp_path):
    out = tmp_path / "crash"
    cmd = [sys.executable, "-m", "edgeconv", "train", "--data", "mnist-5k", "--model", "chollet_mnist", "--epochs", "5", "--augment",
           "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        hist = out / "history.json"
        while not (hist.exists() and len(json.loads(hist.read_text() or "[]")) >= 2):
            assert proc.poll() is None, f"training exited with {proc.returncode} before its second epoch"
            assert time.time() < deadline, "no second epoch within 300 s"
            time.sleep(0.1)
        time.sleep(0.5)  # into the third epoch
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    killed_at = load_state(out)["epoch"]
    assert 2 <= killed_at < 5
    r = edgeconv("train", "--resume", str(out))
    assert r.returncode == 0, r.stderr
    hist = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4, 5]  # continuous: none repeated, none skipped
    m = json.loads((out / "metrics.json").read_text())
    assert m["resumed"] and m["epochs_run"] == 5 and m["test_accuracy"] is None and m["val_accuracy"] > 0.9
    r = edgeconv("train", "--resume", str(out))
    assert r.returncode == 2 and "already finished" in r.stderr


def test_corrupt_state_falls_back_to_previous(tmp_path, caplog):
    save_state(tmp_path, {"epoch": 1, "x": torch.ones(2)})
    save_state(tmp_path, {"epoch": 2, "x": torch.ones(2)})
    assert load_state(tmp_path)["epoch"] == 2
    (tmp_path / STATE_NAME).write_bytes(b"\x00garbage")
    assert load_state(tmp_path)["epoch"] == 1
    assert any("resuming from the previous epoch" in r.getMessage() for r in caplog.records)
    (tmp_path / PREV_STATE_NAME).write_bytes(b"")
    with pytest.raises(EdgeconvError, match="no resumable state"):
        load_state(tmp_path)


def test_disk_full_never_destroys_the_previous_state(tmp_path, monkeypatch):
    save_state(tmp_path, {"epoch": 1, "x": torch.ones(3)})
    good = (tmp_path / STATE_NAME).read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(EdgeconvError, match="No space left on device"):
        save_state(tmp_path, {"epoch": 2, "x": torch.ones(3)})
    assert (tmp_path / STATE_NAME).read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_NAME]  # no temp file left behind


def test_model_cards_for_run_and_bundle(mnist_run, mnist_bundle):
    card = json.loads((mnist_run / "model_card.json").read_text())
    assert card["model"] == "chollet_mnist" and card["parameters"] == 93_322
    assert card["data"]["class_counts"]["train"]["0"] + card["data"]["class_counts"]["val"]["0"] == 500
    assert card["data"]["class_counts"]["test"]["7"] == 1028  # the official t10k set
    assert len(card["data"]["fingerprint"]) == 64 and card["training"]["seed"] == 0
    assert 0.9 < card["accuracy"]["test"] <= 1
    md = (mnist_run / "MODEL_CARD.md").read_text()
    assert "# Model card: chollet_mnist" in md and "curves.png" in md and "| test |" in md
    bcard = json.loads((mnist_bundle / "model_card.json").read_text())
    assert {a["precision"] for a in bcard["export"]} == {"fp32", "fp16", "int8"}
    assert "## Exported artifacts" in (mnist_bundle / "MODEL_CARD.md").read_text()
    assert (mnist_bundle / "curves.png").is_file()


@pytest.mark.slow
def test_torchrun_feature_extraction_and_fine_tune(tmp_path, catsdogs_tiny):
    """Transfer strategies under DDP too: head (and top blocks) trained on sharded epochs, rank 0 writes."""
    out = tmp_path / "ddp_ft"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "edgeconv", "train",
                        "--data", str(catsdogs_tiny), "--model", "efficientnet_lite0", "--strategy", "fine-tune", "--head-epochs", "3",
                        "--epochs", "1", "--unfreeze", "1", "--size", "96", "--threads", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["epochs_run"] == 4 and m["test_accuracy"] > 0.6
    s0 = json.loads((out / "shards.rank0.json").read_text())
    s1 = json.loads((out / "shards.rank1.json").read_text())
    assert s0["final_weights_sha256"] == s1["final_weights_sha256"]
