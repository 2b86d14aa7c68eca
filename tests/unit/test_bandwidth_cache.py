"""The bandwidth probe runs once per boot: a later process reads the figure a first one measured."""

import json
import subprocess
import sys

import pytest

from worker import hardware


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "bandwidth.json"
    monkeypatch.setenv("TOKENFARM_BANDWIDTH_CACHE", str(path))
    hardware.bandwidth.cache_clear()
    yield path
    hardware.bandwidth.cache_clear()


def test_a_second_process_reuses_the_first_ones_measurement(cache, monkeypatch):
    calls = []
    monkeypatch.setattr(hardware, "_load_1m", lambda: 0.0)
    monkeypatch.setattr(hardware, "host_bandwidth_gbps", lambda: calls.append("host") or 12.5)
    monkeypatch.setattr(hardware, "device_bandwidth_gbps", lambda: 0.0)
    assert hardware.bandwidth() == (12.5, 0.0)
    assert calls == ["host"]
    assert json.loads(cache.read_text())["host_gbps"] == 12.5
    # Another process on the same boot: no probe runs, the figure is the cached one.
    out = subprocess.run([sys.executable, "-c", "from worker import hardware; print(hardware.bandwidth()[0])"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "12.5"


def test_a_cache_from_another_boot_is_measured_again(cache, monkeypatch):
    cache.write_text(json.dumps({"boot_id": "an earlier boot", "host_gbps": 99.0, "device_gbps": 0.0}))
    monkeypatch.setattr(hardware, "host_bandwidth_gbps", lambda: 7.0)
    monkeypatch.setattr(hardware, "device_bandwidth_gbps", lambda: 0.0)
    assert hardware.bandwidth() == (7.0, 0.0)
    assert json.loads(cache.read_text())["boot_id"] == hardware._boot_id()


def test_a_torn_cache_file_is_measured_again(cache, monkeypatch):
    cache.write_text('{"boot_id": ')
    monkeypatch.setattr(hardware, "host_bandwidth_gbps", lambda: 3.0)
    monkeypatch.setattr(hardware, "device_bandwidth_gbps", lambda: 0.0)
    assert hardware.bandwidth() == (3.0, 0.0)


def test_the_summary_still_carries_the_figure(cache, monkeypatch):
    monkeypatch.setattr(hardware, "host_bandwidth_gbps", lambda: 21.0)
    monkeypatch.setattr(hardware, "device_bandwidth_gbps", lambda: 0.0)
    hardware.summary.cache_clear()
    try:
        hw = hardware.summary()
    finally:
        hardware.summary.cache_clear()
    assert hw.host_bandwidth_gbps == 21.0 and hw.bandwidth_gbps == 21.0


def test_a_figure_taken_under_more_load_is_measured_again_and_the_highest_kept(cache, monkeypatch):
    # A probe while other processes stream memory underestimates; reused on a quieter machine it
    # would make every honest decode look implausible (the collector's roofline check).
    monkeypatch.setattr(hardware, "_load_1m", lambda: 8.0)
    monkeypatch.setattr(hardware, "host_bandwidth_gbps", lambda: 6.8)
    monkeypatch.setattr(hardware, "device_bandwidth_gbps", lambda: 0.0)
    assert hardware.bandwidth() == (6.8, 0.0)
    assert json.loads(cache.read_text())["load_1m"] == 8.0
    hardware.bandwidth.cache_clear()
    monkeypatch.setattr(hardware, "_load_1m", lambda: 1.0)
    monkeypatch.setattr(hardware, "host_bandwidth_gbps", lambda: 19.7)
    assert hardware.bandwidth() == (19.7, 0.0)
    hardware.bandwidth.cache_clear()
    # Under as much load again, the figure is reused, not probed (and a loaded probe cannot lower it).
    monkeypatch.setattr(hardware, "_load_1m", lambda: 1.2)
    monkeypatch.setattr(hardware, "host_bandwidth_gbps", lambda: 5.0)
    assert hardware.bandwidth() == (19.7, 0.0)
    saved = json.loads(cache.read_text())
    assert saved["host_gbps"] == 19.7 and saved["load_1m"] == 1.0
