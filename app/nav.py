"""The app's pages, in one place, so the entry script and page links agree on them."""
from pathlib import Path

import streamlit as st

PAGES_DIR = Path(__file__).resolve().parent.parent / "pages"
_PAGES = {  # key: (file, title, icon)
    "model": ("1_Model.py", "Model", ":material/memory:"),
    "importance": ("2_Importance.py", "Importance", ":material/grid_on:"),
    "prune": ("3_Prune.py", "Prune", ":material/content_cut:"),
    "search": ("4_Search_and_frontier.py", "Search & frontier", ":material/show_chart:"),
    "export": ("5_Export.py", "Export", ":material/download:"),
    "recover": ("6_Recover.py", "Recover", ":material/healing:"),
}


def page(key: str) -> st.Page:
    file, title, icon = _PAGES[key]
    return st.Page(PAGES_DIR / file, title=title, icon=icon, default=key == "model")


def pages() -> list[st.Page]:
    return [page(k) for k in _PAGES]
