"""One device per run: exclusive, kill-safe locks on device slots."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from lightning_stl.devices import claim_device, wants_device_pool

HOLDER = textwrap.dedent(
    """
    import sys, time
    from lightning_stl.devices import claim_device
    with claim_device(int(sys.argv[1]), sys.argv[2], poll_seconds=0.05) as index:
        print(index, time.time(), flush=True)
        time.sleep(float(sys.argv[3]))
        print(time.time(), flush=True)
    """
)


def start_holder(num: int, lock_dir, seconds: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(num), str(lock_dir), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )


def test_concurrent_runs_get_distinct_devices_and_a_third_waits(tmp_path):
    holders = [start_holder(2, tmp_path, 1.5) for _ in range(3)]
    outputs = [h.communicate(timeout=60)[0].split() for h in holders]
    claims = sorted((float(o[1]), int(o[0]), float(o[2])) for o in outputs)
    first, second, third = claims
    assert {first[1], second[1]} == {0, 1}
    # the third could only start once one of the first two had released its device
    assert third[0] >= min(first[2], second[2]) - 0.05
    assert third[1] in (0, 1)


def test_a_killed_holder_releases_its_device(tmp_path):
    holder = start_holder(1, tmp_path, 60)
    assert holder.stdout.readline().split()[0] == "0"
    holder.kill()
    holder.wait()
    start = time.time()
    with claim_device(1, tmp_path, poll_seconds=0.05) as index:
        assert index == 0
    assert time.time() - start < 5


def test_claims_in_one_process_are_exclusive_too(tmp_path):
    with claim_device(2, tmp_path) as a, claim_device(2, tmp_path) as b:
        assert {a, b} == {0, 1}


@pytest.mark.parametrize(
    ("accelerator", "devices", "cuda", "enabled", "expected"),
    [
        ("auto", 1, 0, "auto", False),  # CPU machine: nothing to claim
        ("auto", 1, 1, "auto", False),  # one GPU: nothing to share
        ("auto", 1, 4, "auto", True),
        ("gpu", 1, 4, "auto", True),
        ("cpu", 1, 4, "auto", False),
        ("auto", 2, 4, "auto", False),  # DDP over several devices: Lightning places it
        ("auto", 1, 4, False, False),
        ("auto", 1, 1, True, True),
    ],
)
def test_when_a_run_claims_a_device(accelerator, devices, cuda, enabled, expected):
    assert wants_device_pool(accelerator, devices, cuda, enabled) is expected


def test_locks_are_named_by_physical_gpu(monkeypatch, tmp_path):
    from lightning_stl.devices import physical_device_names

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert physical_device_names(2) == ["3", "5"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert physical_device_names(2) == ["0", "1"]
    with claim_device(2, tmp_path, names=["3", "5"]) as index:
        assert index == 0 and (tmp_path / "device3.lock").exists()


def test_trials_per_device_fills_every_device_before_sharing_one(tmp_path):
    with (
        claim_device(2, tmp_path, trials_per_device=2) as a,
        claim_device(2, tmp_path, trials_per_device=2) as b,
        claim_device(2, tmp_path, trials_per_device=2) as c,
        claim_device(2, tmp_path, trials_per_device=2) as d,
    ):
        assert (a, b) in ((0, 1), (1, 0)) and sorted([a, b, c, d]) == [0, 0, 1, 1]


def test_a_shared_slot_waits_while_the_device_lacks_free_memory(tmp_path):
    import threading

    free = {"bytes": 1 * 2**30}
    claimed = threading.Event()

    def second():
        with claim_device(
            1, tmp_path, 0.02, trials_per_device=2, free_memory=lambda i: free["bytes"],
            min_free_bytes=4 * 2**30,
        ):  # fmt: skip
            claimed.set()

    with claim_device(1, tmp_path, trials_per_device=2) as first:
        assert first == 0
        thread = threading.Thread(target=second, daemon=True)
        thread.start()
        assert not claimed.wait(0.4)  # 1 GiB free < 4 GiB: the second slot is not taken
        free["bytes"] = 8 * 2**30
        assert claimed.wait(5)  # enough memory: it shares the device with the first
    thread.join(5)


def test_one_gpu_shared_by_several_trials_uses_the_pool():
    assert wants_device_pool("auto", 1, 1, "auto", trials_per_device=2)
    assert not wants_device_pool("auto", 1, 1, "auto", trials_per_device=1)
    with (
        pytest.raises(ValueError, match="trials_per_device=0 is not allowed"),
        claim_device(1, "/tmp", trials_per_device=0),
    ):
        pass


def fake_smi(tmp_path, monkeypatch, output: str):
    fake = tmp_path / "nvidia-smi"
    fake.write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "args"}\necho "{output}"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    properties = type("Properties", (), {"uuid": "3f2a-77"})
    monkeypatch.setattr("torch.cuda.get_device_properties", lambda index: properties)
    monkeypatch.setattr("torch.cuda.mem_get_info", lambda index: (7.0 * 2**30, 8.0 * 2**30))


def test_free_memory_is_read_from_nvidia_smi_for_the_devices_uuid(tmp_path, monkeypatch):
    """Without creating a CUDA context, and for the same GPU whatever the numbering."""
    from lightning_stl.devices import free_device_memory

    fake_smi(tmp_path, monkeypatch, "1536")
    assert free_device_memory(1) == 1536 * 2**20
    assert (tmp_path / "args").read_text().split()[-2:] == ["-i", "GPU-3f2a-77"]


def test_free_memory_falls_back_to_cuda_where_nvidia_smi_cannot_tell(tmp_path, monkeypatch):
    from lightning_stl.devices import free_device_memory

    fake_smi(tmp_path, monkeypatch, "[N/A]")  # a MIG slice
    assert free_device_memory(1) == 7.0 * 2**30
