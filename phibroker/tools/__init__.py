"""What people look at and start by hand: the live view, diagnostics, the dev server."""
