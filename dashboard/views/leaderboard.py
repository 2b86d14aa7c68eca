"""Leaderboard page: the fastest model x quant x technique that fits each VRAM tier."""

import streamlit as st

from dashboard.queries import leaderboard_frame
from orchestrator.ranking import TIERS_GB

st.title("Leaderboard by VRAM tier")
tier = st.selectbox("VRAM", TIERS_GB, index=len(TIERS_GB) - 1, format_func=lambda gb: f"{gb} GB" + (" and above" if gb == 80 else ""))
frame = leaderboard_frame(tier)
if frame.empty:
    st.info("No results yet: run `tokenfarm sweep submit examples/demo.yaml --wait` (or `make demo`).")
else:
    st.caption("Memory is estimated from the model file size; decode and prefill are mean tok/s ± stddev.")
    columns = ["rank", "tier_gb", "model", "quant", "technique", "backend", "model_type",
               "tg_test", "tg_ts", "tg_stddev_ts", "pp_test", "pp_ts", "pp_stddev_ts", "n_results", "hardware"]
    st.dataframe(frame[columns], hide_index=True, use_container_width=True)
