"""Imported llama-bench records keep their model, hardware and settings apart, and tier by the memory
they used. Each record below reproduces a bug of issue 17 as a user met it."""

from __future__ import annotations

import json

import pytest

from farm.contract import EngineConfig
from orchestrator.llamabench import machine_of, to_result
from orchestrator.ranking import hardware_class, leaderboard, settings_label

GB = 10**9


def record(ts: float, *, n_gen: int = 128, model="models/llama-2-7b.Q4_K_M.gguf", model_type="llama 7B Q4_K - Medium",
           size=4081004544, n_params=6738415616, gpu="NVIDIA GeForce RTX 4090",
           cpu="AMD Ryzen 9 7950X 16-Core Processor", backends="CUDA", **settings) -> dict:
    ns = int(n_gen * 1e9 / ts)
    return {"build_commit": "a1b2c3d4", "build_number": 6500, "cpu_info": cpu, "gpu_info": gpu, "backends": backends,
            "model_filename": model, "model_type": model_type, "model_size": size, "model_n_params": n_params,
            "n_batch": 2048, "n_ubatch": 512, "n_threads": 16, "type_k": "f16", "type_v": "f16", "n_gpu_layers": 99,
            "n_cpu_moe": 0, "flash_attn": 1, "n_prompt": 0, "n_gen": n_gen, "n_depth": 0,
            "test_time": "2025-09-01T10:00:00Z", "avg_ts": ts, "stddev_ts": 0.0, "samples_ns": [ns, ns],
            **settings}


def rows(records: list[dict], machine: str = "farm"):
    results = [to_result(rec, i + 1, machine, "s")[0] for i, rec in enumerate(records)]
    return leaderboard(results)


def test_two_models_of_the_same_quant_are_two_rows():
    # Was one row at 120 tok/s: imports carry no sha256 and the ranking grouped by it.
    board = rows([record(150.0), record(90.0, model="models/mistral-7b.Q4_K_M.gguf",
                                        model_type="llama 7B Q4_K - Medium", size=4368439296, n_params=7241732096)])
    assert sorted(round(r.tg_ts) for r in board) == [90, 150]
    assert {r.model for r in board} == {"models/llama-2-7b.Q4_K_M.gguf", "models/mistral-7b.Q4_K_M.gguf"}


def test_one_farms_three_gpus_are_three_rows():
    # Was one row at 133 ± 58 tok/s: every result of the machine pooled under one label.
    board = rows([record(160.0), record(130.0, gpu="NVIDIA GeForce RTX 3090"),
                  record(75.0, gpu="NVIDIA GeForce RTX 3060")])
    assert [(r.hardware, round(r.tg_ts)) for r in board] == [
        ("NVIDIA GeForce RTX 4090 (CUDA)", 160), ("NVIDIA GeForce RTX 3090 (CUDA)", 130),
        ("NVIDIA GeForce RTX 3060 (CUDA)", 75)]
    assert all(r.tg_stddev_ts == 0.0 for r in board)


def test_an_apple_m2_max_is_a_metal_gpu_box_not_a_cpu_box_with_0_cores():
    rec = record(60.0, cpu="Apple M2 Max", gpu="", backends="Metal,BLAS")
    result = to_result(rec, 1, "", "s")[0]
    assert result.worker == "Apple M2 Max" and result.hardware.backends == "Metal,BLAS"
    (row,) = leaderboard([result])
    assert row.hardware == "Apple M2 Max (Metal)" and "0 cores" not in row.hardware
    assert hardware_class(result.hardware.gpu, result.hardware.backends) == "GPU"
    # Newer llama-bench names the GPU too; the class is the same one chip with its backend.
    newer = to_result(record(60.0, cpu="Apple M2 Max", gpu="Apple M2 Max", backends="Metal,BLAS"), 1, "", "s")[0]
    assert newer.worker == "Apple M2 Max" and leaderboard([newer])[0].hardware == "Apple M2 Max (Metal)"


def test_the_machine_is_named_by_cpu_and_gpu_info_when_not_given():
    assert machine_of(record(1.0)) == "AMD Ryzen 9 7950X 16-Core Processor + NVIDIA GeForce RTX 4090"
    assert machine_of(record(1.0, gpu="", backends="CPU")) == "AMD Ryzen 9 7950X 16-Core Processor"
    with pytest.raises(ValueError, match="line 4: cpu_info and gpu_info are empty; name the machine with --machine"):
        to_result(record(1.0, gpu="", cpu=""), 4, "", "s")


MOE = {"model": "Qwen3-30B-A3B-Q4_K_M.gguf", "model_type": "qwen3moe 30B.A3B Q4_K - Medium",
       "size": 18_556_686_336, "n_params": 30_532_122_624}


def test_an_18_5_gb_moe_with_full_offload_is_not_in_the_8_gb_tier():
    (row,) = rows([record(110.0, **MOE)])
    assert row.memory_estimated and row.memory_bytes > 18.5 * GB and row.tier_gb == 24


def test_n_cpu_moe_30_on_a_12_gb_card_is_partial_offload_not_the_24_gb_tier():
    big = {"model": "Qwen3.5-35B-A3B-Q4_K_M.gguf", "model_type": "qwen35moe 35B.A3B Q4_K - Medium",
           "size": 20_700_000_000, "n_params": 34_700_000_000, "gpu": "NVIDIA GeForce RTX 3060"}
    full, offloaded = rows([record(40.0, **big), record(25.0, **big, n_cpu_moe=30)])
    assert (full.settings, full.tier_gb) == ("threads=16 ngl=99 fa=on", 24)
    assert offloaded.settings == "threads=16 ngl=99 fa=on n_cpu_moe=30" and offloaded.tier_gb == 12
    # Every expert in host RAM through -ot: only the shared weights stay on the card.
    (ot,) = rows([record(20.0, **big, tensor_buft_overrides="exps=CPU")])
    assert ot.settings.endswith("ot=exps=CPU") and ot.tier_gb == 8


def test_partial_offload_and_kv_types_are_their_own_rows():
    board = rows([record(150.0), record(140.0, type_k="q8_0", type_v="q8_0"), record(20.0, n_gpu_layers=8)])
    assert len(board) == 3
    by_settings = {r.settings: r for r in board}
    assert by_settings["threads=16 ngl=8 fa=on"].memory_bytes < by_settings["threads=16 ngl=99 fa=on"].memory_bytes
    assert "type_k=q8_0 type_v=q8_0" in board[1].settings


def test_settings_label_names_only_what_differs_in_llama_bench_spelling():
    assert settings_label(EngineConfig()) == ""
    assert settings_label(EngineConfig(n_gpu_layers=-1, split_mode="row", tensor_split=(0.6, 0.4),
                                       no_kv_offload=True)) == "ngl=-1 sm=row ts=0.6/0.4 nkvo=1"
    json.dumps(settings_label(EngineConfig(flash_attn="auto")))


def test_run_memory_counts_kv_types_and_no_kv_offload_on_the_device():
    from farm.contract import ModelFacts
    from farm.memory import run_memory_bytes

    facts = ModelFacts(size_bytes=4 * GB, weight_bytes=4 * GB, n_params=7 * GB, n_layer=32,
                       kv_bytes_per_token=512 << 10)
    f16, kind = run_memory_bytes(facts, EngineConfig(n_gpu_layers=99), 32768, on_device=True)
    q8, _ = run_memory_bytes(facts, EngineConfig(n_gpu_layers=99, type_k="q8_0", type_v="q8_0"), 32768, True)
    off, _ = run_memory_bytes(facts, EngineConfig(n_gpu_layers=99, no_kv_offload=True), 32768, True)
    assert kind == "vram"
    kv = (512 << 10) * 32768  # 16 GiB of f16 K and V at this context
    assert f16 - off == pytest.approx(kv * 1.15, rel=0.01)
    assert f16 - q8 == pytest.approx(kv * (1 - 8.5 / 16) * 1.15, rel=0.01)
    # No layer on the device: the run was bound by host RAM.
    assert run_memory_bytes(facts, EngineConfig(n_gpu_layers=0), 512, True)[1] == "ram"
