"""tokenfarm orchestrator: the control plane. Expands sweeps, dispatches jobs, collects and ranks results.

It is the only process that holds database credentials, and it never imports an engine.
"""
