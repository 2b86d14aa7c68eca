"""The dashboard's entry script: it only routes. Pages live in dashboard/views/, one per file."""

from pathlib import Path

import streamlit as st

VIEWS = Path(__file__).parent / "views"

st.set_page_config(page_title="tokenfarm", layout="wide")
page = st.navigation([
    st.Page(VIEWS / "leaderboard.py", title="Leaderboard by VRAM tier", default=True),
])
page.run()
