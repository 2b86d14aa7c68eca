"""Dashboard pages, one per file; routed by dashboard/app.py."""
