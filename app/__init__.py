"""Shedder Studio's Streamlit glue: session state, cached model loading, plotting helpers.

Every number the pages show comes from the engine in ``shedder``; this package only decides what
to ask the engine, remembers the answers per browser session, and draws them.
"""
