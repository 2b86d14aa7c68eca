"""The levers page: what each llama.cpp setting costs in tok/s and saves in memory.

For one lever at a time (KV cache types, expert offload, offload, flash attention ...), every
value's runs are set beside the runs at the lever's default value with all else equal (same
model, quant, worker, test and other settings), so the ratio reads as that lever's effect alone.
Memory is llama.cpp's own allocations as the worker recorded them: the KV cache, the process's
device memory and the host RAM beside it.
"""

import pandas as pd
import streamlit as st

from dashboard.queries import LEVERS, lever_runs

DEFAULTS = {"type_k": "f16", "type_v": "f16", "kv": "f16/f16", "n_cpu_moe": 0, "n_gpu_layers": 0,
            "flash_attn": "off", "no_kv_offload": False, "use_mmap": True, "override_tensors": ""}
MIB = 1 << 20

st.title("What each lever costs and saves")
runs = lever_runs()
if runs.empty:
    st.info("No llama.cpp results yet: run `tokenfarm sweep submit examples/moe-offload.yaml --wait`.")
    st.stop()
runs = runs.copy()
runs["kv"] = runs["type_k"].fillna("f16").astype(str) + "/" + runs["type_v"].fillna("f16").astype(str)
for f in LEVERS:
    if f in DEFAULTS:
        runs[f] = runs[f].fillna(DEFAULTS[f])
choices = [c for c in ("kv", "n_cpu_moe", "n_gpu_layers", "flash_attn", "no_kv_offload", "use_mmap",
                       "override_tensors") if runs[c].astype(str).nunique() > 1] or ["kv"]
lever = st.selectbox("Lever", choices, format_func=lambda c: "KV cache type (K/V)" if c == "kv" else c)
others = [c for c in ("kv", *LEVERS) if c not in (lever, "type_k", "type_v") and c in runs]
keys = ["model", "quant", "worker", "test", *others]
for c in others:
    runs[c] = runs[c].astype(str)  # NaN-safe grouping keys
grouped = runs.groupby([*keys, lever], dropna=False).agg(
    avg_ts=("avg_ts", "mean"), kv_bytes=("kv_bytes", "mean"), device_bytes=("device_bytes", "mean"),
    host_bytes=("host_bytes", "mean"), n_runs=("avg_ts", "size")).reset_index()
default = DEFAULTS.get(lever)
base = grouped[grouped[lever].astype(str) == str(default)].set_index(keys)
table = grouped.join(base[["avg_ts", "kv_bytes", "device_bytes", "host_bytes"]], on=keys, rsuffix="_default")
table["tok/s vs default"] = table["avg_ts"] / table["avg_ts_default"]
for what in ("kv", "device", "host"):
    table[f"{what} MiB"] = table[f"{what}_bytes"] / MIB
    table[f"{what} MiB saved"] = (table[f"{what}_bytes_default"] - table[f"{what}_bytes"]) / MIB
if table["avg_ts_default"].isna().all():
    st.info(f"No runs at the default {lever} = {default!r} to compare with: add it to the sweep's list.")
# The other settings that vary in these results, so each row says what it was compared within.
varying = [c for c in others if runs[c].nunique() > 1]
shown = ["model", "quant", "worker", "test", *varying, lever, "avg_ts", "tok/s vs default", "kv MiB", "kv MiB saved",
         "device MiB", "device MiB saved", "host MiB", "host MiB saved", "n_runs"]
st.dataframe(table[shown].sort_values(["model", "quant", "worker", "test", lever]).reset_index(drop=True),
             width="stretch", hide_index=True)
st.caption("tok/s vs default: this value's tok/s over the default's with everything else equal. "
           "Saved: the default's allocation minus this value's (llama.cpp's buffers as the worker recorded them).")
summary = table.groupby([lever, "test"], dropna=False)[["tok/s vs default", "kv MiB saved", "device MiB saved"]] \
    .mean().reset_index()
st.subheader(f"{lever}: mean over models and workers")
st.dataframe(pd.DataFrame(summary), width="stretch", hide_index=True)
