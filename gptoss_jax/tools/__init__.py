"""Built-in tools for the harmony tool loop (placeholder, filled below)."""
