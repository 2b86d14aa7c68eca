"""The dashboard's entry script: it only routes. Pages live in dashboard/views/, one per file (paths relative to this script).

Every page has its own address (/leaderboard, /techniques, ...). Streamlit serves the default page
at / and ignores its url_path, so the default is a hidden page that only forwards to /leaderboard.
"""

import streamlit as st

st.set_page_config(page_title="tokenfarm", layout="wide")
PAGES = [
    st.Page("views/leaderboard.py", title="Leaderboard by VRAM tier", url_path="leaderboard"),
    st.Page("views/pareto.py", title="Pareto: speed vs quality", url_path="pareto"),
    st.Page("views/recommend.py", title="What should I run?", url_path="recommend"),
    st.Page("views/claims.py", title="The 2026 claims, measured", url_path="claims"),
    st.Page("views/techniques.py", title="Techniques", url_path="techniques"),
    st.Page("views/prefill_decode.py", title="Prefill vs decode", url_path="prefill-decode"),
    st.Page("views/roofline.py", title="MoE and the roofline", url_path="roofline"),
    st.Page("views/levers.py", title="Levers: cost and savings", url_path="levers"),
    st.Page("views/workers.py", title="Workers and sweeps", url_path="workers"),
    st.Page("views/result_detail.py", title="Result detail", url_path="result"),
]


def _home() -> None:
    st.switch_page(PAGES[0])


page = st.navigation([st.Page(_home, title="tokenfarm", url_path="home", default=True, visibility="hidden"),
                      *PAGES])
page.run()
