"""tokenfarm dashboard: a Streamlit app over the orchestrator database, read-only."""
