"""Leaderboard page: for each VRAM tier, the fastest model x quant x technique x settings x hardware that fits."""

import altair as alt
import pandas as pd
import streamlit as st

from dashboard.queries import leaderboard_frame, measurements
from orchestrator.ranking import TIERS_GB

EMPTY = "No results yet: run `tokenfarm sweep submit examples/demo.yaml --wait` (or `make demo`)."
TOP_N = 50

st.title("Leaderboard by VRAM tier")
options = measurements()
if options.empty:
    st.info(EMPTY)
    st.stop()

left, mid, right, far = st.columns(4)
hardware = left.multiselect("Hardware class", ["GPU", "CPU"], placeholder="all")
engines = mid.multiselect("Engine", sorted(options["backend"].unique()), placeholder="all")
depths = sorted(int(d) for d in options.loc[options["test"].str.startswith("tg"), "n_depth"].unique()) or [0]
depth = right.selectbox("Context depth (decode)", depths, format_func=lambda d: f"d{d}" if d else "none (d0)")
techniques = far.multiselect("Technique", sorted(options["technique"].unique()), placeholder="all")

frame = leaderboard_frame(None, depth, tuple(hardware), tuple(engines), tuple(techniques))
if frame.empty:
    st.info("No result matches these filters: clear a filter, or measure it, e.g. a sweep with "
            f"`n_depth: [{depth}]`, submitted with `tokenfarm sweep submit SWEEP.yaml --wait`.")
    st.stop()


def gb(n: float) -> str:
    return f"{n / 2**30:.1f}"


def params_b(n: float) -> str:
    return f"{n / 1e9:.2f}" if n else ""


view = pd.DataFrame({
    "model": frame["model"], "quant": frame["quant"], "technique": frame["technique"], "engine": frame["backend"],
    "settings": frame["settings"].replace("", "defaults"),
    "decode tok/s": frame["tg_ts"], "± stddev": frame["tg_stddev_ts"], "decode runs": frame["tg_n_runs"],
    "test": frame["tg_test"], "prefill tok/s": frame["pp_ts"], "prefill ± stddev": frame["pp_stddev_ts"],
    "prefill test": frame["pp_test"], "TTFT ms": frame["ttft_ms"],
    "params B (total)": frame["n_params"].map(params_b), "params B (active)": frame["n_params_active"].map(params_b),
    "memory GiB": frame["memory_bytes"].map(gb),
    "memory": frame["memory_estimated"].map({True: "estimated", False: "measured"}),
    "hardware": frame["hardware"], "tier_gb": frame["tier_gb"],
})
# Quality of the file against its reference (issue 14's quality pass), where one was measured.
has_quality = "kld_mean" in frame and frame["kld_mean"].notna().any()
if has_quality:
    view.insert(view.columns.get_loc("prefill tok/s"), "KLD", frame["kld_mean"])
    view.insert(view.columns.get_loc("prefill tok/s"), "top-1", frame["top1_agreement"])
st.caption("Ranked by decode tok/s (mean over runs; ± is the pooled stddev of every repetition). "
           "A row is one model x quant x technique x settings x hardware. Memory is the measured peak where a run "
           "recorded one, else estimated from the file and its offload settings (n_gpu_layers, n_cpu_moe, -ot, "
           "no_kv_offload). "
           "Results from flagged workers never rank."
           + (" KLD: mean KL divergence of the file's next-token distributions from its reference's; top-1: share "
              "of tokens where both agree on the top token (empty: quality not measured)." if has_quality else ""))

best = view.sort_values("decode tok/s", ascending=False)
# Every combination against the memory it needs, tier limits drawn: what fits where, and how fast.
points = best.head(3000).assign(**{"memory GiB": lambda f: f["memory GiB"].astype(float)})
dots = alt.Chart(points).mark_circle(opacity=0.6).encode(
    x=alt.X("memory GiB:Q", scale=alt.Scale(type="log"), title="peak memory (GiB)"),
    y=alt.Y("decode tok/s:Q", scale=alt.Scale(type="log")), color="technique:N",
    tooltip=["model", "quant", "technique", "hardware", "memory", alt.Tooltip("decode tok/s:Q", format=".1f")],
)
limits = alt.Chart(pd.DataFrame({"memory GiB": list(TIERS_GB)})).mark_rule(strokeDash=[4, 4], color="gray").encode(
    x="memory GiB:Q", tooltip=["memory GiB"])
st.altair_chart(alt.layer(limits, dots).properties(height=280, title="Decode tok/s against the memory each "
                                                  "combination needs; dashed: the VRAM tiers"), width="stretch")

tabs = st.tabs([f"{t} GB" + (" and above" if t == TIERS_GB[-1] else "") for t in TIERS_GB])
for tier, tab in zip(TIERS_GB, tabs):
    fits = best[best["tier_gb"] <= tier].drop(columns=["tier_gb"])
    with tab:
        if fits.empty:
            st.info(f"Nothing measured fits {tier} GB yet.")
            continue
        shown = fits.head(TOP_N).copy()
        shown.insert(0, "rank", range(1, len(shown) + 1))
        st.caption(f"{len(fits)} combinations fit {tier} GB; the top {len(shown)} shown.")
        st.dataframe(shown, hide_index=True, width="stretch", column_config={
            "decode tok/s": st.column_config.NumberColumn(format="%.1f"),
            "± stddev": st.column_config.NumberColumn(format="%.1f"),
            "prefill tok/s": st.column_config.NumberColumn(format="%.1f"),
            "prefill ± stddev": st.column_config.NumberColumn(format="%.1f"),
            "TTFT ms": st.column_config.NumberColumn(format="%.1f"),
            "KLD": st.column_config.NumberColumn(format="%.4f"),
            "top-1": st.column_config.NumberColumn(format="%.3f"),
        })
