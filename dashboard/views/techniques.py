"""Techniques page: what speculative decoding and prompt lookup buy over the baseline.

Speedup is the Result's own `speculation.speedup` (measured against the baseline in the same job,
on the same prompts); losslessness is its per-prompt comparison of greedy tokens with the baseline's.
"""

import altair as alt
import pandas as pd
import streamlit as st

from dashboard.queries import techniques

st.title("Techniques")
frame = techniques()
if frame.empty or frame["speedup"].isna().all():
    st.info("No spec / lookup results yet: run a sweep that lists `techniques: [baseline, spec, lookup]` "
            "with `tokenfarm sweep submit SWEEP.yaml --wait`.")
    st.stop()
frame = frame[frame["speedup"].notna()]

left, mid, right = st.columns(3)
kinds = left.multiselect("Technique", sorted(frame["technique"].unique()), placeholder="all")
models = mid.multiselect("Model", sorted(frame["model"].unique()), placeholder="all")
workers = right.multiselect("Worker", sorted(frame["worker"].unique()), placeholder="all")
if kinds:
    frame = frame[frame["technique"].isin(kinds)]
if models:
    frame = frame[frame["model"].isin(models)]
if workers:
    frame = frame[frame["worker"].isin(workers)]
if frame.empty:
    st.info("No result matches these filters.")
    st.stop()


def pooled(frame, keys: list[str]) -> pd.DataFrame:
    """Run-weighted means of the technique figures per group, vectorized (thousands of groups)."""
    figures = ["speedup", "acceptance_rate", "mean_accepted_per_pass"]
    parts = frame[keys + ["n_runs"]].copy()
    for f in figures:
        known = frame[f].notna()
        parts[f + "_w"] = (frame[f] * frame["n_runs"]).where(known, 0.0)
        parts[f + "_n"] = frame["n_runs"].where(known, 0)
    sums = parts.groupby(keys, dropna=False).sum().reset_index()
    for f in figures:
        sums[f] = sums[f + "_w"] / sums[f + "_n"].where(sums[f + "_n"] > 0)
    return sums[keys + figures + ["n_runs"]]


st.subheader("Speedup over baseline, per model and prompt category")
# One row per model (its quants pooled; narrow with the filters) keeps the map readable.
by_category = pooled(frame, ["model", "technique", "prompt_category"])
heat = alt.Chart(by_category).mark_rect().encode(
    x=alt.X("prompt_category:N", title="prompt category"), y=alt.Y("model:N", title=None, axis=alt.Axis(labelLimit=300)),
    color=alt.Color("speedup:Q", scale=alt.Scale(scheme="redblue", domainMid=1.0), title="speedup ×"),
    tooltip=["model", "technique", "prompt_category", alt.Tooltip("speedup:Q", format=".2f"), "n_runs"],
).properties(height=alt.Step(22), width=260)
text = heat.mark_text(fontSize=10).encode(text=alt.Text("speedup:Q", format=".2f"), color=alt.value("black"))
st.altair_chart(alt.layer(heat, text).facet(column=alt.Column("technique:N", title=None)), width="content")
st.caption("Blue: faster than the baseline; red: slower. A speedup below 1 is a slowdown, shown as faithfully.")

st.subheader("Acceptance vs speedup")
points = frame[frame["acceptance_rate"].notna()].copy()
if points.empty:
    st.info("These results carry no acceptance rate yet.")
else:
    points["pair"] = points["model"] + " " + points["quant"]
    if len(points) > 4000:
        # Altair embeds every point in the page; a sample keeps the scatter's shape and the page fast.
        points = points.sample(4000, random_state=0)
    scatter = alt.Chart(points).mark_circle(opacity=0.5).encode(
        x=alt.X("acceptance_rate:Q", title="acceptance rate", scale=alt.Scale(domain=[0, 1])),
        y=alt.Y("speedup:Q", title="speedup ×"), color="technique:N",
        tooltip=["pair", "technique", "prompt_category", "n_draft", "p_min", "ngram_max", "worker",
                 alt.Tooltip("acceptance_rate:Q", format=".2f"), alt.Tooltip("speedup:Q", format=".2f"),
                 alt.Tooltip("mean_accepted_per_pass:Q", format=".2f", title="accepted tokens per pass")],
    )
    even = alt.Chart(pd.DataFrame({"speedup": [1.0]})).mark_rule(strokeDash=[6, 4], color="black").encode(y="speedup:Q")
    label = alt.Chart(pd.DataFrame({"speedup": [1.0], "acceptance_rate": [0.02], "t": ["break-even (speedup = 1)"]})
                      ).mark_text(align="left", dy=-7).encode(x="acceptance_rate:Q", y="speedup:Q", text="t:N")
    st.altair_chart(alt.layer(scatter, even, label).properties(height=380), width="stretch")

st.subheader("Losslessness")
loss = frame.groupby(["model", "quant", "technique"]).agg(**{
    "runs compared": ("n_lossless_known", "sum"), "identical to baseline": ("n_lossless", "sum"),
    "earliest divergence (token index)": ("first_divergence_min", "min")}).reset_index()
loss["verdict"] = [
    "not recorded" if n == 0 else ("lossless: identical tokens" if same == n else f"diverged in {n - same} of {n}")
    for n, same in zip(loss["runs compared"], loss["identical to baseline"])
]
st.dataframe(loss, hide_index=True, width="stretch")
st.caption("Greedy tokens of each technique compared with the baseline's on the same prompt. Batched verification "
           "changes floating-point summation order, so quantized targets can diverge after some tokens.")

with st.expander("Break-even map: speedup and acceptance by settings"):
    table = pooled(frame, ["model", "quant", "technique", "n_draft", "p_min", "ngram_max", "prompt_category"])
    st.dataframe(table.rename(columns={"mean_accepted_per_pass": "accepted tokens per pass (mean)"}),
                 hide_index=True, width="stretch")
    st.caption("Accepted tokens per pass: drafted tokens the target kept per verify pass (each pass adds one "
               "token of its own). Acceptance rate: accepted / drafted.")
