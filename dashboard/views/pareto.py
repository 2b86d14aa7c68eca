"""Pareto page: decode tok/s against KLD per VRAM tier, one point per model x quant x technique, the frontier drawn.

The points are the leaderboard's rows (orchestrator/ranking.py) that carry a quality pass; the
frontier is orchestrator.recommend.pareto_front, the one the CLI would use.
"""

import altair as alt
import pandas as pd
import streamlit as st

from dashboard.queries import leaderboard_frame
from orchestrator.ranking import TIERS_GB
from orchestrator.recommend import pareto_front

st.title("Speed against quality: the Pareto frontier")
frame = leaderboard_frame(None)
if frame.empty or "kld_mean" not in frame or frame["kld_mean"].isna().all() or frame["tg_ts"].isna().all():
    st.info("No quality measured yet: run a sweep with `quality: true` (e.g. examples/ladder.yaml) with "
            "`tokenfarm sweep submit SWEEP.yaml --wait`; speed alone is on the leaderboard.")
    st.stop()

left, right = st.columns(2)
tier = left.selectbox("VRAM tier", TIERS_GB, index=list(TIERS_GB).index(24) if 24 in TIERS_GB else 0,
                      format_func=lambda t: f"{t} GB" + (" and above" if t == TIERS_GB[-1] else ""))
# Speeds from an H100 say little about a 3060: narrow to the boxes like yours.
hardware = right.multiselect("Measured on", sorted(frame["hardware"].unique()), placeholder="all hardware")
if hardware:
    frame = frame[frame["hardware"].isin(hardware)]
points = frame[(frame["tier_gb"] <= tier) & frame["kld_mean"].notna() & frame["tg_ts"].notna()].copy()
n_unmeasured = int(((frame["tier_gb"] <= tier) & frame["kld_mean"].isna() & frame["tg_ts"].notna()).sum())
if points.empty:
    st.info(f"Nothing with a quality pass fits {tier} GB yet.")
    st.stop()
points["frontier"] = pareto_front(list(zip(points["tg_ts"], points["kld_mean"])))
points["combination"] = points["model"] + " " + points["quant"] + " " + points["technique"]
points["memory GiB"] = points["memory_bytes"] / 2**30
if len(points) > 4000:
    # Altair embeds every point in the page; the frontier is kept whole, the rest sampled.
    points = pd.concat([points[points["frontier"]], points[~points["frontier"]].sample(4000, random_state=0)])
st.caption(f"{len(points)} combinations with a quality pass fit {tier} GB; {int(points['frontier'].sum())} on the "
           f"frontier (nothing else is both faster and closer to its reference)."
           + (f" {n_unmeasured} more fit but have no quality pass." if n_unmeasured else ""))

tooltip = ["combination", "hardware", "worker", alt.Tooltip("tg_ts:Q", title="decode tok/s", format=".1f"),
           alt.Tooltip("tg_stddev_ts:Q", title="± stddev", format=".1f"), alt.Tooltip("kld_mean:Q", title="KLD",
                                                                                       format=".4f"),
           alt.Tooltip("top1_agreement:Q", title="top-1", format=".3f"),
           alt.Tooltip("memory GiB:Q", format=".2f"), "tg_test", "n_results"]
# symlog: the reference itself sits at KLD 0, which a log axis cannot show.
x = alt.X("kld_mean:Q", title="KLD from the reference (mean, lower is better)", scale=alt.Scale(type="symlog",
                                                                                              constant=0.001))
y = alt.Y("tg_ts:Q", title="decode tok/s", scale=alt.Scale(type="log"))
dots = alt.Chart(points).mark_circle(size=60, opacity=0.6).encode(x=x, y=y, color="technique:N", tooltip=tooltip)
line = alt.Chart(points[points["frontier"]].sort_values("kld_mean")).mark_line(
    color="black", interpolate="step-before", strokeDash=[5, 3]).encode(x=x, y=y)
ring = alt.Chart(points[points["frontier"]]).mark_point(size=140, color="black", filled=False).encode(
    x=x, y=y, tooltip=tooltip)
st.altair_chart(alt.layer(dots, line, ring).properties(height=460, title=f"Decode tok/s against KLD, {tier} GB tier; "
                                                        "ringed and joined: the frontier"), width="stretch")

st.subheader("On the frontier")
front = points[points["frontier"]].sort_values("tg_ts", ascending=False)
st.dataframe(pd.DataFrame({
    "model": front["model"], "quant": front["quant"], "technique": front["technique"], "decode tok/s": front["tg_ts"],
    "KLD": front["kld_mean"], "top-1": front["top1_agreement"], "memory GiB": front["memory GiB"],
    "hardware": front["hardware"]}), hide_index=True, width="stretch", column_config={
    "decode tok/s": st.column_config.NumberColumn(format="%.1f"), "KLD": st.column_config.NumberColumn(format="%.4f"),
    "top-1": st.column_config.NumberColumn(format="%.3f"), "memory GiB": st.column_config.NumberColumn(format="%.2f")})
