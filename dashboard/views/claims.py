"""The 2026 claims, measured: orchestrator.claims over the stored Results, each verdict computed with its query shown."""

import pandas as pd
import streamlit as st

from dashboard.queries import analysis_results
from orchestrator.claims import claims

ICON = {"holds": ":green[holds]", "refuted": ":red[refuted]", "not enough data": ":orange[not enough data]"}

st.title("The 2026 claims, measured")
results, flagged = analysis_results()
st.caption(f"Verdicts computed from {len(results)} stored ok results of {len({r.worker for r in results})} workers "
           f"({len(flagged)} flagged workers never count); none is written by hand. Same as `tokenfarm claims`.")
if not results:
    st.info("No results yet: run `tokenfarm sweep submit examples/speculative.yaml --wait` for the speculation "
            "claims and examples/torch-moe.yaml for the MoE ones.")
for report in claims(results, flagged):
    st.subheader(report.claim)
    st.markdown(f"**Verdict: {ICON[report.verdict]}** — {report.test}")
    if report.findings:
        st.dataframe(pd.DataFrame([{"hardware class": f.hardware_class, "verdict": f.verdict, "numbers": f.numbers,
                                    "runs": f.n_runs} for f in report.findings]), hide_index=True, width="stretch",
                     column_config={"numbers": st.column_config.TextColumn(width="large"),
                                    "verdict": st.column_config.TextColumn(width="small"),
                                    "runs": st.column_config.NumberColumn(width="small")})
    st.caption(f"Query: {report.query}")
