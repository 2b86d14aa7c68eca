"""What should I run? page: orchestrator.recommend over the stored Results, as `tokenfarm recommend` prints it."""

import pandas as pd
import streamlit as st

from dashboard.queries import analysis_results
from orchestrator.recommend import WORKLOAD_CATEGORIES, recommend

st.title("What should I run?")
results, flagged = analysis_results()
if not results:
    st.info("No results yet: run `tokenfarm sweep submit examples/demo.yaml --wait` (or `make demo`).")
    st.stop()

left, mid, right, far = st.columns(4)
vram = left.number_input("VRAM (GB)", min_value=1.0, max_value=1024.0, value=8.0, step=1.0)
ram = mid.number_input("RAM (GB, 0: GPU only)", min_value=0.0, max_value=4096.0, value=0.0, step=8.0)
workload = right.selectbox("Workload", list(WORKLOAD_CATEGORIES))
agreement = far.number_input("Minimum top-1 agreement (0: any)", min_value=0.0, max_value=1.0, value=0.0, step=0.01)

report = recommend(results, vram, ram or None, workload, agreement or None, flagged)
statement = report.data_statement()
(st.warning if report.thin else st.success)(statement)
for note in report.notes:
    st.caption(f"Note: {note}")
if not report.rows:
    st.stop()
st.dataframe(pd.DataFrame([{
    "#": r.rank, "model": r.model, "what gives the speed": r.how, "decode tok/s": r.tg_ts, "± stddev": r.tg_stddev_ts,
    "test": r.tg_test, "prefill tok/s": r.pp_ts, "KLD": r.quality.kld_mean if r.quality else None,
    "top-1": r.quality.top1_agreement if r.quality else None,
    "memory GiB": r.memory_bytes / 2**30, "limit GiB": r.memory_limit_bytes / 2**30, "fits": r.fits,
    "memory": "estimated" if r.memory_estimated else "measured", "measured on": r.hardware, "runs": r.n_results,
} for r in report.rows]), hide_index=True, width="stretch", column_config={
    "what gives the speed": st.column_config.TextColumn(width="large"),
    "decode tok/s": st.column_config.NumberColumn(format="%.1f"), "± stddev": st.column_config.NumberColumn(format="%.1f"),
    "prefill tok/s": st.column_config.NumberColumn(format="%.1f"), "KLD": st.column_config.NumberColumn(format="%.4f"),
    "top-1": st.column_config.NumberColumn(format="%.3f"), "memory GiB": st.column_config.NumberColumn(format="%.2f")})
st.caption("Ranked by decode tok/s among what fits; results from flagged workers never count. KLD and top-1: the "
           "file against its reference; empty: quality not measured. The same table as "
           f"`tokenfarm recommend --vram {vram:g}" + (f" --ram {ram:g}" if ram else "") + f" --workload {workload}"
           + (f" --min-agreement {agreement:g}" if agreement else "") + "`.")
