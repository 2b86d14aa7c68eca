"""Workers and sweeps page: sweep progress, failures with their reasons, workers with last seen and trust."""

import altair as alt
import streamlit as st

from dashboard.queries import failure_reasons, failures, sweeps, workers

st.title("Workers and sweeps")
runs = sweeps()
if runs.empty:
    st.info("No sweeps yet: run `tokenfarm sweep submit examples/demo.yaml --wait` (or `make demo`).")
    st.stop()

st.subheader("Sweeps")
st.dataframe(runs[["name", "created_at", "n_jobs", "queued", "sent", "running", "done", "failed", "progress", "sweep_id"]],
             hide_index=True, width="stretch", column_config={
                 "progress": st.column_config.ProgressColumn("progress", min_value=0, max_value=1, format="percent"),
             })

st.subheader("Workers")
machines = workers()
if machines.empty:
    st.info("No worker has sent a result yet: start one with `tokenfarm worker start --name mybox`.")
else:
    shown = ["worker", "trust", "last_seen", "n_results", "n_failed", "n_rejected", "n_canary_passed", "n_canary_failed",
             "n_crosscheck_agreed", "n_crosscheck_disagreed", "flag_reason", "hardware", "n_gpus", "vram_bytes", "bandwidth_gbps"]
    st.dataframe(machines[[c for c in shown if c in machines.columns]], hide_index=True, width="stretch")
    st.caption("trusted: marked by the operator (`tokenfarm workers trust`), its results set canary references · "
               "registered: results checked, not trusted · flagged: failed a canary, lost cross-checks or flagged "
               "by hand; its results never rank.")

st.subheader("Failures")
reasons = failure_reasons()
if reasons.empty:
    st.success("No failed jobs.")
else:
    reasons = reasons.assign(reason=reasons["error"].fillna("(no reason recorded)").str.slice(0, 90))
    st.altair_chart(alt.Chart(reasons).mark_bar().encode(
        x=alt.X("n:Q", title="failed jobs"), y=alt.Y("reason:N", sort="-x", title=None, axis=alt.Axis(labelLimit=500)), tooltip=["error", "n"],
    ).properties(height=alt.Step(24)), width="stretch")
    st.dataframe(failures(), hide_index=True, width="stretch")
