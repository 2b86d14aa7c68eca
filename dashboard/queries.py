"""Every query the dashboard makes, cached with a time-to-live, returned as DataFrames.

Pages never write SQL; they call these. The database is opened read-only where the engine
allows it (SQLite `mode=ro`), and the ranking logic is the orchestrator's, shared with the CLI.
"""

from __future__ import annotations

import pandas as pd
import streamlit as st
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine, make_url

from orchestrator.ranking import leaderboard
from orchestrator.store import load_results
from orchestrator.db import session_scope
from worker.settings import load_settings

TTL_S = 30


@st.cache_resource
def engine() -> Engine:
    url = make_url(load_settings().effective_database_url)
    if url.get_backend_name() == "sqlite" and url.database:
        # Read-only at the driver level: the dashboard can never change a result.
        return create_engine(f"sqlite:///file:{url.database}?mode=ro&uri=true")
    return create_engine(url, pool_pre_ping=True, execution_options={"postgresql_readonly": True})


@st.cache_data(ttl=TTL_S)
def leaderboard_frame(tier_gb: int | None) -> pd.DataFrame:
    try:
        with session_scope(engine()) as session:
            results = load_results(session, status="ok")
    except Exception as exc:  # no database yet: the page shows the empty state
        if "no such table" in str(exc) or "does not exist" in str(exc) or "unable to open" in str(exc):
            return pd.DataFrame()
        raise
    return pd.DataFrame([row.as_dict() for row in leaderboard(results, tier_gb)])
