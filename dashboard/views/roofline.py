"""MoE and the roofline page: decode tok/s against active bytes per token, each worker's limit drawn.

The roofline is bandwidth ÷ bytes read per token: a decode point above its worker's line is
physically impossible, one far below it leaves speed on the table. MoE models read only their
active experts, so they sit to the left of a dense model of the same total size.
"""

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from dashboard.queries import measurements, model_facts, workers

st.title("MoE and the roofline")
frame = measurements()
if frame.empty:
    st.info("No results yet: run `tokenfarm sweep submit examples/demo.yaml --wait` (or `make demo`).")
    st.stop()
facts = model_facts()
tg = frame[frame["test"].str.startswith("tg") & (frame["n_depth"] == 0) & (frame["technique"] == "baseline")]
tg = tg.merge(facts, on="model_sha256", how="left")
# Dense models read every weight: where no active-bytes figure is stored, the file size stands in.
tg["bytes_per_token"] = tg["active_bytes"].where(tg["active_bytes"] > 0).fillna(tg["size_bytes"])
tg["moe"] = np.where(tg["n_expert"].fillna(0) > 0, "MoE", "dense")
hw = workers()
if tg.empty or tg["bytes_per_token"].isna().all():
    st.info("No decode results with model facts yet: run `tokenfarm sweep submit examples/demo.yaml --wait`.")
    st.stop()

names = sorted(tg["worker"].unique())
chosen = st.multiselect("Workers", names, default=names[:4], placeholder="all")
if chosen:
    tg = tg[tg["worker"].isin(chosen)]
    hw = hw[hw["worker"].isin(chosen)]
tg = tg[tg["bytes_per_token"].notna() & (tg["bytes_per_token"] > 0)]

points = alt.Chart(tg).mark_point(filled=True, size=60).encode(
    x=alt.X("bytes_per_token:Q", scale=alt.Scale(type="log"), title="active bytes read per token"),
    y=alt.Y("avg_ts:Q", scale=alt.Scale(type="log"), title="decode tok/s"),
    color="worker:N", shape=alt.Shape("moe:N", title="model"),
    tooltip=["model", "quant", "worker", "test", alt.Tooltip("avg_ts:Q", format=".1f"),
             alt.Tooltip("roofline_pct:Q", format=".0f", title="roofline %")],
)
layers = [points]
bw = hw[hw["bandwidth_gbps"].notna() & (hw["bandwidth_gbps"] > 0)]
if bw.empty:
    st.info("No worker has a measured memory bandwidth yet, so no roofline is drawn: workers record it once "
            "the bandwidth probe lands (`tokenfarm worker start` measures it at start-up).")
elif not tg.empty:
    xs = np.geomspace(tg["bytes_per_token"].min() / 1.5, tg["bytes_per_token"].max() * 1.5, 30)
    lines = pd.DataFrame([{"worker": w, "bytes_per_token": x, "roofline tok/s": g * 1e9 / x}
                          for w, g in zip(bw["worker"], bw["bandwidth_gbps"]) for x in xs])
    layers.append(alt.Chart(lines).mark_line(strokeDash=[4, 3]).encode(
        x="bytes_per_token:Q", y="roofline tok/s:Q", color="worker:N"))
st.altair_chart(alt.layer(*layers).properties(height=420), width="stretch")
st.caption("Dashed: each worker's roofline, bandwidth ÷ bytes per token. Points: baseline decode at depth 0.")

st.subheader("Roofline % per result")
if not (tg["roofline_pct"].fillna(0) > 0).any():
    st.info("No result records `roofline_pct` yet: it comes with the bandwidth probe and model accounting.")
table = tg[["model", "quant", "moe", "worker", "test", "avg_ts", "roofline_tok_s", "roofline_pct", "n_params",
            "n_params_active", "n_expert", "n_expert_used", "bytes_per_token"]].sort_values("roofline_pct", ascending=False)
st.dataframe(table, hide_index=True, width="stretch", column_config={
    "avg_ts": st.column_config.NumberColumn("decode tok/s", format="%.1f"),
    "roofline_tok_s": st.column_config.NumberColumn("roofline tok/s", format="%.1f"),
    "roofline_pct": st.column_config.ProgressColumn("roofline %", min_value=0, max_value=100, format="%.0f%%"),
})
