"""Prefill vs decode page: tok/s against prompt length and against context depth, per model and quant.

It makes the seed's point visible: techniques move decode, prefill stays where it was.
"""

import altair as alt
import streamlit as st

from dashboard.queries import measurements, workers

st.title("Prefill vs decode")
frame = measurements()
if frame.empty:
    st.info("No results yet: run `tokenfarm sweep submit examples/demo.yaml --wait` (or `make demo`).")
    st.stop()

hw = workers().set_index("worker")["hardware"].to_dict()
frame = frame.assign(hardware=frame["worker"].map(hw).fillna(frame["worker"]))
left, mid, right = st.columns(3)
models = sorted(frame["model"].unique())
model = left.selectbox("Model", models)
frame = frame[frame["model"] == model]
quants = mid.multiselect("Quant", sorted(frame["quant"].unique()), placeholder="all")
if quants:
    frame = frame[frame["quant"].isin(quants)]
machines = sorted(frame["hardware"].unique())
machine = right.selectbox("Hardware", machines)
frame = frame[frame["hardware"] == machine]

pp = frame[frame["test"].str.startswith("pp")]
tg = frame[frame["test"].str.startswith("tg")]
a, b = st.columns(2)
with a:
    st.subheader("Prefill: tok/s vs prompt length")
    if pp.empty:
        st.info("No prefill results for this model: add `n_prompt: [128, 512, 2048]` to a sweep.")
    else:
        st.altair_chart(alt.Chart(pp).mark_line(point=True).encode(
            x=alt.X("n_prompt:Q", scale=alt.Scale(type="log", base=2), title="prompt tokens"),
            y=alt.Y("avg_ts:Q", title="prefill tok/s"), color="quant:N", strokeDash="technique:N",
            tooltip=["quant", "technique", "test", alt.Tooltip("avg_ts:Q", format=".1f"), "n_runs"],
        ).properties(height=320), width="stretch")
with b:
    st.subheader("Decode: tok/s vs context depth")
    if tg.empty:
        st.info("No decode results for this model: add `n_gen: [128]` and `n_depth: [0, 1024, 4096]` to a sweep.")
    else:
        deepest = tg.groupby(["quant", "technique", "n_depth"], as_index=False).apply(
            lambda g: g.loc[g["n_gen"].idxmax()], include_groups=False)
        st.altair_chart(alt.Chart(deepest).mark_line(point=True).encode(
            x=alt.X("n_depth:Q", title="context depth (tokens in the KV cache)"),
            y=alt.Y("avg_ts:Q", title="decode tok/s"), color="quant:N", strokeDash="technique:N",
            tooltip=["quant", "technique", "test", alt.Tooltip("avg_ts:Q", format=".1f"), "n_runs"],
        ).properties(height=320), width="stretch")
st.caption("Solid vs dashed lines are techniques: spec and lookup change decode, not prefill.")
st.dataframe(frame[["quant", "technique", "test", "avg_ts", "stddev_ts", "n_runs", "ttft_ns"]].sort_values(
    ["quant", "technique", "test"]), hide_index=True, width="stretch")
