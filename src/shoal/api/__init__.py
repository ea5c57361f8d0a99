"""The node's HTTP API (FastAPI, served by uvicorn inside the node's event loop)."""
