"""The dashboard's entry script: it only routes. Pages live in dashboard/views/, one per file (paths relative to this script)."""

import streamlit as st

st.set_page_config(page_title="tokenfarm", layout="wide")
page = st.navigation([
    st.Page("views/leaderboard.py", title="Leaderboard by VRAM tier", url_path="leaderboard", default=True),
    st.Page("views/techniques.py", title="Techniques", url_path="techniques"),
    st.Page("views/prefill_decode.py", title="Prefill vs decode", url_path="prefill-decode"),
    st.Page("views/roofline.py", title="MoE and the roofline", url_path="roofline"),
    st.Page("views/workers.py", title="Workers and sweeps", url_path="workers"),
    st.Page("views/result_detail.py", title="Result detail", url_path="result"),
])
page.run()
